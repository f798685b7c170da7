//! The core module's hooks, and the top of the glue's call graph: each hook
//! calls the parts that own the work (conf, preload, zone, ring_glue, wake,
//! heartbeat, extensions), and none of them calls back up here. A generation
//! per configuration load (master), a lifecycle record per worker.

use core::ffi::{c_char, c_void};

use nginx_sys::{
    NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_OK, NGX_PROCESS_HELPER, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
    ngx_cycle_t, ngx_int_t, ngx_log_t, ngx_uint_t,
};

use crate::shm::lifecycle::{AGENT_SLOT, pid_alive};

use super::process_state::this_process;
use super::time::{mono_ms, now_ms};
use super::{conf, extension, heartbeat, hop, pid, preload, ring_glue, wake, wake_fd, zone};

fn cycle_log(cycle: *mut ngx_cycle_t) -> *mut ngx_log_t {
    // SAFETY: nginx passes a live cycle to every process hook.
    unsafe { (*cycle).log }
}

/// A configuration load begins (master): init_by_lua may run before init_module.
pub unsafe extern "C" fn create_conf(cycle: *mut ngx_cycle_t) -> *mut c_void {
    let p = conf::create(cycle);
    if !p.is_null() {
        preload::begin(p);
    }
    p.cast()
}

pub unsafe extern "C" fn init_conf(cycle: *mut ngx_cycle_t, cc: *mut c_void) -> *mut c_char {
    // SAFETY: cc is what create_conf returned for this cycle.
    conf::finish(cycle, unsafe { &mut *(cc as *mut conf::CoreConf) })
}

/// Master, once per configuration load (also in single-process mode).
pub unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: a global nginx sets before configuration.
    if unsafe { nginx_sys::ngx_test_config } != 0 {
        return NGX_OK as ngx_int_t;
    }
    hop::init();
    let zones = zone::of_cycle(cycle);
    let Some(primary) = zones.first().copied() else {
        preload::flush(&[], cycle);
        return NGX_OK as ngx_int_t;
    };
    let workers = conf::worker_processes(cycle);
    let generation = primary.header().lifecycle.begin_generation(pid(), workers, now_ms());
    wake_fd::begin_generation(cycle, generation, workers);
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
    preload::flush(&zones, cycle);
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

/// Whether this process is OpenResty's privileged agent: a helper process
/// (like nginx's cache manager) for which OpenResty's nginx patch sets
/// `ngx_is_privileged_agent`. Looked up with dlsym: nginx exports its
/// symbols to dynamic modules, and an nginx without the patch has none.
pub fn is_privileged_agent() -> bool {
    // SAFETY: a global nginx sets at process start.
    if unsafe { nginx_sys::ngx_process } as u32 != NGX_PROCESS_HELPER {
        return false;
    }
    // SAFETY: dlsym with a NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"ngx_is_privileged_agent".as_ptr()) };
    // SAFETY: the patch declares it `ngx_uint_t ngx_is_privileged_agent`,
    // set before the agent runs any module's init_process.
    !p.is_null() && unsafe { *(p as *const ngx_uint_t) } != 0
}

fn worker_start(cycle: *mut ngx_cycle_t) {
    // SAFETY: globals nginx sets before calling init_process.
    let (process, slot) = unsafe { (nginx_sys::ngx_process as u32, nginx_sys::ngx_worker as u32) };
    let agent = is_privileged_agent();
    if process != NGX_PROCESS_WORKER && process != NGX_PROCESS_SINGLE && !agent {
        return;
    }
    // The agent has no worker slot: its record says what it is.
    let slot = if agent { AGENT_SLOT } else { slot };
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
    let Some(primary) = l.primary() else { return };
    let lc = &primary.header().lifecycle;
    let generation = l.generation.get();
    if process == NGX_PROCESS_WORKER || agent {
        // SAFETY: getppid has no preconditions; a worker's (and the agent's) parent is its master.
        let master = unsafe { libc::getppid() };
        lc.set_master_pid(generation, l.master_pid_seen.get(), master);
    }
    let registered = lc.register(generation, slot, pid(), mono_ms(), pid_alive, |f| heartbeat::report(log, f, pid()));
    let respawned = registered.is_some_and(|r| r.respawn);
    l.record.set(registered.map(|r| r.index));
    let what = if agent { "privileged agent process" } else { "worker process" };
    if registered.is_none() {
        ngx::ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "workerbus: {what} {} not tracked: the lifecycle table is full of live workers",
            pid()
        );
    }
    if agent {
        ngx::ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "workerbus: privileged agent process {} started, generation {generation} ({} live workers)",
            pid(),
            lc.live_count(generation)
        );
    } else {
        ngx::ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "workerbus: worker process {} started in slot {slot}, generation {generation} ({} live)",
            pid(),
            lc.live_count(generation)
        );
    }
    if l.record.get().is_some() {
        ring_glue::init_worker(respawned);
        wake::register(cycle);
    }
    // The parts that run on a worker (the PostgreSQL bridge's holder) stay
    // on workers: the agent only reads and posts events.
    if !agent {
        extension::each(|e| (e.worker_start)(cycle));
    }
    heartbeat::start(log);
}

/// Worker exit through nginx (graceful stop, reload, quit).
pub unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    extension::each(|e| (e.worker_exit)());
    // Stop reading (release the ring readers), close the wake-up socket.
    ring_glue::release_all_readers();
    wake::unregister();
    let l = this_process();
    let Some(primary) = l.primary() else { return };
    let Some(index) = l.record.get() else { return };
    let Some(slab) = primary.slab() else { return };
    let lc = &primary.header().lifecycle;
    // Exits serialized on the zone's mutex (nginx frees it if we die holding
    // it): workers leaving at the same instant each log a distinct count,
    // and the last one logs 0.
    let live = {
        let _locked = slab.lock();
        lc.exit_worker(index, pid(), mono_ms());
        lc.live_count(l.generation.get())
    };
    l.record.set(None);
    if l.slot.get() == AGENT_SLOT {
        ngx::ngx_log_error!(
            NGX_LOG_INFO,
            cycle_log(cycle),
            "workerbus: privileged agent process {} exited, generation {} ({live} live workers)",
            pid(),
            l.generation.get()
        );
        return;
    }
    ngx::ngx_log_error!(
        NGX_LOG_INFO,
        cycle_log(cycle),
        "workerbus: worker process {} exited from slot {}, generation {} ({live} live)",
        pid(),
        l.slot.get(),
        l.generation.get()
    );
}
