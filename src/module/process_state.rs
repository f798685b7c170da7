//! Who this process is: its zones and its lifecycle identity. The master
//! fills it in init_module and its workers inherit it through fork; each
//! worker completes it when it starts (process.rs).
//!
//! What else a process keeps lives with its owner: the wake-up socket and
//! the deferred wake-up in wake.rs, the heartbeat timer in heartbeat.rs, the
//! init_by_lua hold in preload.rs, the poller's semaphore in sema.rs. The
//! configuration is read from the cycle when needed (conf.rs), never copied
//! here; what a zone's init needs travels in the zone's own data (zone.rs).
//!
//! Ownership: the one `ProcessState` below owns all of it, and the rest of
//! the module only ever holds a shared reference (`this_process()`). Fields
//! are `Cell`s, read and written by copy; the zone list is replaced whole
//! and read by copy (a `Zone` is a few addresses), so no reference into the
//! state outlives the call that made it, and a handler that re-enters
//! module code (a Lua FFI call from inside a wake-up, say) cannot alias a
//! live borrow.

use core::cell::{Cell, UnsafeCell};

use super::one_thread::OneThread;
use super::zone::Zone;

pub struct ProcessState {
    /// This process's zones, the primary (lifecycle-carrying) one first.
    zones: UnsafeCell<Vec<Zone>>,
    /// Generation of the configuration this process runs.
    pub generation: Cell<u64>,
    /// Master pid recorded in init_module (before nginx daemonizes).
    pub master_pid_seen: Cell<i32>,
    /// This worker's record in the primary zone's lifecycle table, which is
    /// also the index of its reader in every zone's ring.
    pub record: Cell<Option<usize>>,
    pub slot: Cell<u32>,
    pub is_worker: Cell<bool>,
    /// The worker's start ran (from init_process or from the first FFI call).
    pub worker_started: Cell<bool>,
}

static STATE: OneThread<ProcessState> = OneThread::new(ProcessState {
    zones: UnsafeCell::new(Vec::new()),
    generation: Cell::new(0),
    master_pid_seen: Cell::new(0),
    record: Cell::new(None),
    slot: Cell::new(0),
    is_worker: Cell::new(false),
    worker_started: Cell::new(false),
});

/// This process's state (shared: see the module's comment).
pub fn this_process() -> &'static ProcessState {
    STATE.get()
}

impl ProcessState {
    /// Replaces the zone list (init_module, once per configuration load).
    pub fn set_zones(&self, zones: Vec<Zone>) {
        // SAFETY: no reference into the list ever leaves this impl (readers
        // copy), so nothing borrows it while it is replaced.
        let old = unsafe { core::mem::replace(&mut *self.zones.get(), zones) };
        drop(old);
    }

    /// The list, for the copies below (private: no reference leaves the impl).
    fn list(&self) -> &Vec<Zone> {
        // SAFETY: the list is only replaced by set_zones, and no borrow made
        // here outlives the method that made it (each copies out).
        unsafe { &*self.zones.get() }
    }

    /// A copy of the zone list, for walks that may call back into module code.
    pub fn zones(&self) -> Vec<Zone> {
        self.list().clone()
    }

    /// The zone at `index` of the list (Lua's zone handle).
    pub fn zone_at(&self, index: usize) -> Option<Zone> {
        self.list().get(index).copied()
    }

    /// The primary zone: the first one declared, which carries the lifecycle table.
    pub fn primary(&self) -> Option<Zone> {
        self.zone_at(0)
    }
}
