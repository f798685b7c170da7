//! The zone header's wake-up counters. Which pollers sleep is no longer
//! kept here: each worker's ring reader has its own idle flag (see
//! `ring::Reader::set_idle` and src/module/wake.rs), because one bit per
//! worker slot was shared by the two generations of a reload, and one could
//! take the other's wake-up. The bit words stay, unused, so that the zone
//! header keeps its layout.

use core::sync::atomic::AtomicU64;

/// Worker slots the former per-slot mask covered (kept for the layout).
pub const MAX_WAKE_SLOTS: usize = 128;

#[repr(C)]
pub struct IdleMask {
    /// Unused (was: one idle bit per worker slot).
    pub bits: [AtomicU64; MAX_WAKE_SLOTS / 64],
    /// Wake-ups sent by every poster of the zone, for the status document.
    pub wakeups_sent: AtomicU64,
}
