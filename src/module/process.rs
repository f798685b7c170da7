//! Process hooks: a generation per configuration load (master), a lifecycle
//! record per worker, and the heartbeat timer that stamps it and judges the
//! other workers.

use core::ffi::c_void;

use crate::shm::lock::ShmLock;
use nginx_sys::{
    NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_OK, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
    ngx_core_conf_t, ngx_cycle_t, ngx_event_t, ngx_int_t, ngx_log_t,
};

use crate::shm::lifecycle::{Finding, pid_alive};

use super::conf::CoreConf;
use super::pid;
use super::process_state::this_process;
use super::time::{mono_ms, now_ms};
use super::{ngx_workerbus_module, preload, ring_glue, wake, zone};

fn cycle_log(cycle: *mut ngx_cycle_t) -> *mut ngx_log_t {
    // SAFETY: nginx passes a live cycle to every process hook.
    unsafe { (*cycle).log }
}

/// This module's configuration in `cycle`.
pub fn core_conf(cycle: *const ngx_cycle_t) -> Option<&'static CoreConf> {
    // SAFETY: conf_ctx has an entry per module index; ours was made by create_conf.
    unsafe {
        let ctx = (*cycle).conf_ctx;
        let module = &raw const ngx_workerbus_module;
        let p = *ctx.add((*module).index);
        (p as *const CoreConf).as_ref()
    }
}

pub fn worker_processes(cycle: *const ngx_cycle_t) -> u32 {
    // SAFETY: the core module's configuration always exists in a configured cycle.
    unsafe {
        let ctx = (*cycle).conf_ctx;
        let ccf = *ctx.add(nginx_sys::ngx_core_module.index) as *const ngx_core_conf_t;
        ccf.as_ref().map_or(1, |c| c.worker_processes.max(1) as u32)
    }
}

/// Master, once per configuration load (also in single-process mode).
pub unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: a global nginx sets before configuration.
    if unsafe { nginx_sys::ngx_test_config } != 0 {
        return NGX_OK as ngx_int_t;
    }
    let zones = zone::of_cycle(cycle);
    let Some(primary) = zones.first().copied() else {
        preload::flush(&[], cycle_log(cycle));
        return NGX_OK as ngx_int_t;
    };
    let workers = worker_processes(cycle);
    let generation = primary.header().lifecycle.begin_generation(pid(), workers, now_ms());
    let names: Vec<String> =
        zones.iter().map(|z| format!("\"{}\" {}k", String::from_utf8_lossy(z.name()), z.size() / 1024)).collect();
    ngx::ngx_log_error!(
        NGX_LOG_NOTICE,
        cycle_log(cycle),
        "workerbus: generation {generation} begins: master pid {}, {workers} worker processes, zones {}",
        pid(),
        names.join(", ")
    );
    ring_glue::begin_generation(&zones, generation);
    // Events posted in init_by_lua: after the generation's first event.
    preload::flush(&zones, cycle_log(cycle));
    let l = this_process();
    l.generation.set(generation);
    l.master_pid_seen.set(pid());
    l.set_zones(zones);
    NGX_OK as ngx_int_t
}

/// Worker start: take a lifecycle record, start the heartbeat.
pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    worker_start(cycle);
    NGX_OK as ngx_int_t
}

/// From the C ABI: the Lua module's init_process (which runs
/// init_worker_by_lua) comes before ours when it was loaded first, so the
/// first FFI call of a worker may arrive before init_process; it then does
/// the worker's start itself. Idempotent and cheap once done.
pub fn ensure_worker_started() {
    if !this_process().worker_started.get() {
        // SAFETY: ngx_cycle is the running cycle of this process.
        worker_start(unsafe { nginx_sys::ngx_cycle });
    }
}

fn worker_start(cycle: *mut ngx_cycle_t) {
    // SAFETY: globals nginx sets before calling init_process.
    let (process, slot) = unsafe { (nginx_sys::ngx_process as u32, nginx_sys::ngx_worker as u32) };
    if process != NGX_PROCESS_WORKER && process != NGX_PROCESS_SINGLE {
        return;
    }
    // init_by_lua in the master (or a single process) before init_module:
    // starting here would leave every forked worker believing it started.
    if preload::in_config_phase() {
        return;
    }
    let l = this_process();
    if l.worker_started.replace(true) {
        return;
    }
    let log = cycle_log(cycle);
    l.set_zones(zone::of_cycle(cycle));
    l.is_worker.set(true);
    l.slot.set(slot);
    if let Some(cc) = core_conf(cycle) {
        l.heartbeat_ms.set(cc.heartbeat_ms);
        l.hang_timeout_ms.set(cc.hang_timeout_ms);
    }
    let Some(primary) = l.primary() else { return };
    let lc = &primary.header().lifecycle;
    let generation = l.generation.get();
    if process == NGX_PROCESS_WORKER {
        // SAFETY: getppid has no preconditions; a worker's parent is its master.
        let master = unsafe { libc::getppid() };
        lc.set_master_pid(generation, l.master_pid_seen.get(), master);
    }
    let registered = lc.register(generation, slot, pid(), mono_ms(), pid_alive, |f| report(log, f, pid()));
    let respawned = registered.is_some_and(|r| r.respawn);
    l.record.set(registered.map(|r| r.index));
    if registered.is_none() {
        ngx::ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "workerbus: worker process {} not tracked: the lifecycle table is full of live workers",
            pid()
        );
    }
    ngx::ngx_log_error!(
        NGX_LOG_INFO,
        log,
        "workerbus: worker process {} started in slot {slot}, generation {generation} ({} live)",
        pid(),
        lc.live_count(generation)
    );
    ring_glue::init_worker(cycle, respawned);
    super::extension::each(|e| (e.worker_start)(cycle));
    start_heartbeat(log);
}

/// Worker exit through nginx (graceful stop, reload, quit).
pub unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    super::extension::each(|e| (e.worker_exit)());
    wake::unregister();
    let l = this_process();
    let Some(primary) = l.primary() else { return };
    let Some(index) = l.record.get() else { return };
    let lc = &primary.header().lifecycle;
    // Exits serialized on the zone's mutex (nginx frees it if we die holding
    // it): workers leaving at the same instant each log a distinct count,
    // and the last one logs 0.
    let lock = primary.lock();
    lock.lock();
    lc.exit_worker(index, pid(), mono_ms());
    let live = lc.live_count(l.generation.get());
    lock.unlock();
    l.record.set(None);
    ngx::ngx_log_error!(
        NGX_LOG_INFO,
        cycle_log(cycle),
        "workerbus: worker process {} exited from slot {}, generation {} ({live} live)",
        pid(),
        l.slot.get(),
        l.generation.get()
    );
}

fn report(log: *mut ngx_log_t, f: Finding, me: i32) {
    if let Some(primary) = this_process().primary() {
        let h = primary.header();
        let counter = match f {
            Finding::Crashed { .. } => &h.crashes_seen,
            Finding::Hung { .. } => &h.hangs_seen,
        };
        // Relaxed: a statistic; each finding is reported once (its state change is a CAS).
        counter.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    }
    match f {
        Finding::Crashed { pid, slot, generation } => {
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "workerbus: worker process {pid} (slot {slot}, generation {generation}) crashed: \
                 gone without exiting, seen by {me}"
            );
        }
        Finding::Hung { pid, slot, generation, late_ms } => {
            ngx::ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "workerbus: worker process {pid} (slot {slot}, generation {generation}) hung: \
                 no heartbeat for {late_ms} ms, seen by {me}"
            );
        }
    }
}

fn start_heartbeat(log: *mut ngx_log_t) {
    let l = this_process();
    let ev = l.heartbeat_event();
    // SAFETY: the event and the dummy connection live in process-static
    // memory for the life of the process, touched by this thread only.
    unsafe {
        (*ev).handler = Some(heartbeat);
        (*ev).log = log;
        // nginx's timer code logs ev->data as a connection's fd at debug
        // level: point it at a dummy connection, as nginx's own timers do.
        (*l.dummy_connection()).fd = -1;
        (*ev).data = l.dummy_connection().cast::<c_void>();
        // A cancelable timer does not hold up a graceful shutdown.
        (*ev).set_cancelable(1);
        nginx_sys::ngx_add_timer(ev, l.heartbeat_ms.get());
    }
}

unsafe extern "C" fn heartbeat(ev: *mut ngx_event_t) {
    let l = this_process();
    // SAFETY: the event is the heartbeat event, with its log set in start_heartbeat.
    let log = unsafe { (*ev).log };
    let now = mono_ms();
    if let (Some(primary), Some(index)) = (l.primary(), l.record.get()) {
        let lc = &primary.header().lifecycle;
        if lc.heartbeat(index, pid(), now) {
            ngx::ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "workerbus: worker process {} (slot {}, generation {}) recovered: heartbeat resumed",
                pid(),
                l.slot.get(),
                l.generation.get()
            );
        }
        // Relaxed: a setting, set once from Lua.
        let hang_ms = match lc.hang_timeout_ms.load(core::sync::atomic::Ordering::Relaxed) {
            0 => l.hang_timeout_ms.get() as u64,
            ms => ms,
        };
        lc.check(now, hang_ms, pid_alive, |f| report(log, f, pid()));
    }
    for z in &l.zones() {
        ring_glue::on_heartbeat(z);
    }
    // SAFETY: as in start_heartbeat.
    unsafe { nginx_sys::ngx_add_timer(ev, l.heartbeat_ms.get()) };
}
