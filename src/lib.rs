//! workerbus: an nginx module that lets worker processes and nodes work together.
//!
//! - `shm`: the nginx-independent core kept in shared zones;
//! - `module`: the nginx glue (directives, zones, process hooks, status);
//! - `ffi`: the C ABI for the Lua modules in lib/resty/;
//! - `abi`: that ABI's version and argument rule (nginx-independent);
//! - `prom`: the status document as Prometheus metrics;
//! - `pg`: the PostgreSQL LISTEN/NOTIFY bridge between nodes;
//! - `modules`: the nginx module tables `load_module` reads.

#![recursion_limit = "256"]

pub mod abi;
#[cfg(feature = "nginx")]
pub mod ffi;
#[cfg(feature = "nginx")]
pub mod module;
#[cfg(feature = "nginx")]
pub mod modules;
pub mod pg;
pub mod prom;
pub mod shm;
