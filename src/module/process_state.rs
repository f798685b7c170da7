//! State private to one nginx process. The master fills it in init_module
//! and its workers inherit it through fork; each worker completes it in
//! init_process.
//!
//! Ownership: the one `ProcessState` below owns all of it, and the rest of
//! the module only ever holds a shared reference (`this_process()`). Fields
//! are `Cell`s, read and written by copy; the zone list is replaced whole
//! and read by copy (a `Zone` is a few addresses), so no reference into the
//! state outlives the call that made it, and a handler that re-enters
//! module code (a Lua FFI call from inside a wake-up, say) cannot alias a
//! live borrow. The events nginx keeps pointers to live in `UnsafeCell`s
//! and are handed out as raw pointers only.

use core::cell::{Cell, UnsafeCell};

use nginx_sys::{ngx_connection_t, ngx_event_t, ngx_msec_t};

use super::conf::CoreConf;
use super::one_thread::OneThread;
use super::preload::Held;
use super::zone::Zone;

pub struct ProcessState {
    /// This process's zones, the primary (lifecycle-carrying) one first.
    zones: UnsafeCell<Vec<Zone>>,
    /// Generation of the configuration this process runs.
    pub generation: Cell<u64>,
    /// Master pid recorded in init_module (before nginx daemonizes).
    pub master_pid_seen: Cell<i32>,
    /// This worker's record in the primary zone's lifecycle table.
    pub record: Cell<Option<usize>>,
    pub slot: Cell<u32>,
    pub is_worker: Cell<bool>,
    /// worker_start() ran (from init_process or from the first FFI call).
    pub worker_started: Cell<bool>,
    pub heartbeat_ms: Cell<ngx_msec_t>,
    pub hang_timeout_ms: Cell<ngx_msec_t>,
    heartbeat: UnsafeCell<ngx_event_t>,
    /// What timer events' `data` points at (fd -1), for nginx's debug logging.
    dummy_conn: UnsafeCell<ngx_connection_t>,
    /// This worker's own wake-up socket in its event loop, and the nonce in its name.
    pub wake_conn: Cell<*mut ngx_connection_t>,
    pub wake_nonce: Cell<u64>,
    /// Unbound socket this process sends wake-ups from (-1 until needed).
    pub send_fd: Cell<i32>,
    pub wakeups_received: Cell<u64>,
    /// Deferred wake-up: posted once per event-loop iteration, for these zones (bits).
    wake_ev: UnsafeCell<ngx_event_t>,
    pub wake_zones: Cell<u32>,
    /// Ring reader slot of this worker (its lifecycle record index).
    pub reader: Cell<Option<usize>>,
    /// worker_processes of the configuration being loaded (master, from
    /// init_conf to zone init): sizes the lifecycle table of fresh zones.
    pub conf_workers: Cell<usize>,
    /// Between create_conf and init_module (master): the configuration
    /// phase, where init_by_lua runs; its configuration, and the events
    /// posted there (see preload.rs).
    pub loading: Cell<bool>,
    pub loading_conf: Cell<*mut CoreConf>,
    held: Cell<Vec<Held>>,
}

static STATE: OneThread<ProcessState> = OneThread::new(ProcessState {
    zones: UnsafeCell::new(Vec::new()),
    generation: Cell::new(0),
    master_pid_seen: Cell::new(0),
    record: Cell::new(None),
    slot: Cell::new(0),
    is_worker: Cell::new(false),
    worker_started: Cell::new(false),
    heartbeat_ms: Cell::new(1000),
    hang_timeout_ms: Cell::new(5000),
    // SAFETY: an all-zero ngx_event_t is nginx's own "unused event" state.
    heartbeat: UnsafeCell::new(unsafe { core::mem::zeroed() }),
    // SAFETY: an all-zero connection is only ever read for its fd field.
    dummy_conn: UnsafeCell::new(unsafe { core::mem::zeroed() }),
    wake_conn: Cell::new(core::ptr::null_mut()),
    wake_nonce: Cell::new(0),
    send_fd: Cell::new(-1),
    wakeups_received: Cell::new(0),
    // SAFETY: as for the heartbeat event.
    wake_ev: UnsafeCell::new(unsafe { core::mem::zeroed() }),
    wake_zones: Cell::new(0),
    reader: Cell::new(None),
    conf_workers: Cell::new(1),
    loading: Cell::new(false),
    loading_conf: Cell::new(core::ptr::null_mut()),
    held: Cell::new(Vec::new()),
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

    /// The heartbeat timer event (nginx keeps its address while it is armed).
    pub fn heartbeat_event(&self) -> *mut ngx_event_t {
        self.heartbeat.get()
    }

    /// The deferred wake-up event (posted to nginx's queue, so address-stable).
    pub fn wake_event(&self) -> *mut ngx_event_t {
        self.wake_ev.get()
    }

    /// The connection timer events point `data` at (fd -1).
    pub fn dummy_connection(&self) -> *mut ngx_connection_t {
        self.dummy_conn.get()
    }

    /// Works on the events held during configuration (taken out for the
    /// call and put back after it, so no borrow of the state is open).
    pub fn with_held<R>(&self, f: impl FnOnce(&mut Vec<Held>) -> R) -> R {
        let mut held = self.held.take();
        let r = f(&mut held);
        self.held.set(held);
        r
    }

    /// The events held so far, handed over once.
    pub fn take_held(&self) -> Vec<Held> {
        self.held.take()
    }
}
