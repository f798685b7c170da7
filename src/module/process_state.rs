//! State private to one nginx process. The master fills it in init_module
//! and its workers inherit it through fork; each worker completes it in
//! init_process. nginx runs every handler of a process on one thread, so the
//! state is reached without locking, one handler at a time.

use core::cell::UnsafeCell;

use core::ffi::c_void;

use nginx_sys::{ngx_connection_t, ngx_event_t, ngx_msec_t};

use super::wake::SemaPost;
use super::zone::Zone;

pub struct Local {
    /// This process's zones, the primary (lifecycle-carrying) one first.
    pub zones: Vec<Zone>,
    /// Generation of the configuration this process runs.
    pub generation: u64,
    /// Master pid recorded in init_module (before nginx daemonizes).
    pub master_pid_seen: i32,
    /// This worker's record in the primary zone's lifecycle table.
    pub record: Option<usize>,
    pub slot: u32,
    pub is_worker: bool,
    /// worker_start() ran (from init_process or from the first FFI call).
    pub worker_started: bool,
    pub heartbeat_ms: ngx_msec_t,
    pub hang_timeout_ms: ngx_msec_t,
    pub heartbeat: ngx_event_t,
    /// What timer events' `data` points at (fd -1), for nginx's debug logging.
    pub dummy_conn: ngx_connection_t,
    /// This worker's own wake-up socket in its event loop, and the nonce in its name.
    pub wake_conn: *mut ngx_connection_t,
    pub wake_nonce: u64,
    /// Unbound socket this process sends wake-ups from (-1 until needed).
    pub send_fd: i32,
    pub wakeups_received: u64,
    /// The Lua poller's ngx.semaphore (ngx_http_lua_sema_t *), posted on wake-up.
    pub sema: *mut c_void,
    pub sema_post: Option<SemaPost>,
    /// Deferred wake-up: posted once per event-loop iteration, for these zones (bits).
    pub wake_ev: ngx_event_t,
    pub wake_zones: u32,
    /// Ring reader slot of this worker (its lifecycle record index).
    pub reader: Option<usize>,
    /// worker_processes of the configuration being loaded (master, from
    /// init_conf to zone init): sizes the lifecycle table of fresh zones.
    pub conf_workers: usize,
    /// Between create_conf and init_module (master): the configuration
    /// phase, where init_by_lua runs; its configuration, and the events
    /// posted there (see preload.rs).
    pub loading: bool,
    pub loading_conf: *mut super::conf::CoreConf,
    pub held: Vec<super::preload::Held>,
}

struct ProcessCell(UnsafeCell<Local>);

// SAFETY: nginx calls module code of a process from its one event-loop thread only.
unsafe impl Sync for ProcessCell {}

static LOCAL: ProcessCell = ProcessCell(UnsafeCell::new(Local {
    zones: Vec::new(),
    generation: 0,
    master_pid_seen: 0,
    record: None,
    slot: 0,
    is_worker: false,
    worker_started: false,
    heartbeat_ms: 1000,
    hang_timeout_ms: 5000,
    // SAFETY: an all-zero ngx_event_t is nginx's own "unused event" state.
    heartbeat: unsafe { core::mem::zeroed() },
    // SAFETY: an all-zero connection is only ever read for its fd field.
    dummy_conn: unsafe { core::mem::zeroed() },
    wake_conn: core::ptr::null_mut(),
    wake_nonce: 0,
    send_fd: -1,
    wakeups_received: 0,
    sema: core::ptr::null_mut(),
    sema_post: None,
    // SAFETY: as for the heartbeat event.
    wake_ev: unsafe { core::mem::zeroed() },
    wake_zones: 0,
    reader: None,
    conf_workers: 1,
    loading: false,
    loading_conf: core::ptr::null_mut(),
    held: Vec::new(),
}));

/// The process's state. Callers must not hold the reference across a call
/// that may re-enter module code (none of nginx's calls made here do).
#[allow(clippy::mut_from_ref)]
pub fn local() -> &'static mut Local {
    // SAFETY: single-threaded access per process, see ProcessCell.
    unsafe { &mut *LOCAL.0.get() }
}

impl Local {
    pub fn primary(&self) -> Option<&Zone> {
        self.zones.first()
    }

    pub fn zone(&self, name: &[u8]) -> Option<&Zone> {
        if name.is_empty() {
            return self.primary();
        }
        self.zones.iter().find(|z| z.name() == name)
    }
}
