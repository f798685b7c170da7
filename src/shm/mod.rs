//! The nginx-independent core: data structures that live in one shared
//! memory region, addressed by offsets, usable from any process that maps it.
//! Nothing here calls nginx; `cargo test` exercises it over `mmap(MAP_SHARED)`.

pub mod claims;
pub mod header;
pub mod kv;
pub mod lease;
pub mod lifecycle;
pub mod lock;
pub mod manager;
pub mod pgbus;
pub mod pid;
pub mod racy;
pub mod ring;
pub mod sync;

/// The tests' shared mapping and fork helpers: one file, used by the unit
/// tests here and by the fork tests in tests/ (as their `support` module).
#[cfg(test)]
#[path = "../../tests/support/mod.rs"]
pub(crate) mod testing;
