//! The nginx-independent core: data structures that live in one shared
//! memory region, addressed by offsets, usable from any process that maps it.
//! Nothing here calls nginx; `cargo test` exercises it over `mmap(MAP_SHARED)`.

pub mod claims;
pub mod header;
pub mod idle;
pub mod kv;
pub mod lease;
pub mod lifecycle;
pub mod lock;
pub mod pgbus;
pub mod pid;
pub mod ring;
pub mod sync;
