//! The zone header: the first allocation in every workerbus zone, reached
//! from the slab pool's `data`. It names the layout so that a zone kept
//! across a reload by a different build of the module is refused, not
//! misread, and it holds offsets (never pointers) to the zone's other parts.

use core::sync::atomic::AtomicU64;

use super::kv::Kv;
use super::lifecycle::{Lifecycle, MAX_GENERATIONS};

pub const MAGIC: u64 = u64::from_be_bytes(*b"wrkrbus\0");
/// Bumped whenever any `#[repr(C)]` structure kept in a zone changes.
/// (9: the ring has a reader per worker record and Lua VM, see lifecycle::READERS_PER_RECORD.)
pub const LAYOUT: u32 = 9;

#[repr(C)]
pub struct ZoneHeader {
    pub magic: u64,
    pub layout: u32,
    pub _pad: u32,
    /// Zone size in bytes, as configured.
    pub size: u64,
    /// Event ring: byte offset from the header and length (0 = none).
    pub ring_off: u64,
    pub ring_len: u64,
    /// Unique-event claims: byte offset from the header and length.
    pub claims_off: u64,
    pub claims_len: u64,
    /// Ring head when each generation began (by generation % MAX_GENERATIONS):
    /// where that generation's workers start reading. The one home of a
    /// generation's first event: the status document reads it here too.
    pub first_seq: [AtomicU64; MAX_GENERATIONS],
    pub kv: Kv,
    pub lifecycle: Lifecycle,
    /// Worker crashes and hangs detected on this node since the zone was
    /// made (primary zone), each counted once by the worker that saw it:
    /// the history table recycles records, so counting them would not do.
    pub crashes_seen: AtomicU64,
    pub hangs_seen: AtomicU64,
    /// PostgreSQL bridge state (shm::pgbus): byte offset from the header and length.
    pub pg_off: u64,
    pub pg_len: u64,
    /// resty.sync's table (instances, leases, tasks): offset (0 = not made
    /// yet: the first sync.new on the zone makes it, so zones that never
    /// sync spend nothing on it) and length. The length is stored first; the
    /// offset (Release) publishes both.
    pub sync_off: AtomicU64,
    pub sync_len: AtomicU64,
}

impl ZoneHeader {
    /// Why an existing header cannot be used by this build, if it cannot.
    pub fn check(&self, size: u64) -> Result<(), String> {
        if self.magic != MAGIC {
            return Err("holds no workerbus data".into());
        }
        if self.layout != LAYOUT {
            return Err(format!("has layout {} but this module uses layout {LAYOUT}", self.layout));
        }
        if self.size != size {
            return Err(format!("was made for {} bytes, not {size}", self.size));
        }
        Ok(())
    }

    /// Part of the zone at `off` from the header, if it was laid out.
    pub fn part(&self, off: u64, len: u64) -> Option<(*mut u8, usize)> {
        if off == 0 || len == 0 {
            return None;
        }
        let base = self as *const ZoneHeader as *mut u8;
        Some((base.wrapping_add(off as usize), len as usize))
    }
}
