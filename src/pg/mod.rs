//! The PostgreSQL LISTEN/NOTIFY bridge (docs/postgres.md): one connection
//! per node, held by one worker under a lease in the zone, on nginx's event
//! loop. `config`, `wire`, `error` and `session` (the protocol, sans I/O)
//! are pure Rust, tested without nginx; the rest is the nginx side.

pub mod config;
pub mod error;
pub mod session;
pub mod wire;

#[cfg(feature = "nginx")]
pub mod conn;
#[cfg(feature = "nginx")]
pub mod driver;
#[cfg(feature = "nginx")]
pub mod glue;
