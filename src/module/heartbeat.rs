//! The worker's heartbeat: a timer that stamps this worker's lifecycle
//! record, judges the other workers (crashed, hung), and gives every zone's
//! ring its periodic care (ring_glue::on_heartbeat). Its period and the hang
//! timeout are read from the running cycle's configuration at each tick.

use core::sync::atomic::Ordering;

use nginx_sys::{NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_LOG_WARN, ngx_event_t, ngx_log_t};

use crate::shm::lifecycle::{Finding, pid_alive};

use super::event::Event;
use super::one_thread::OneThread;
use super::process_state::this_process;
use super::time::mono_ms;
use super::{conf, pid, ring_glue};

static HEARTBEAT: OneThread<Event> = OneThread::new(Event::new());

/// Worker start: arm the timer.
pub fn start(log: *mut ngx_log_t) {
    let ev = HEARTBEAT.get();
    ev.init(log, beat);
    ev.add_timer(conf::heartbeat_ms());
}

unsafe extern "C" fn beat(_ev: *mut ngx_event_t) {
    let l = this_process();
    let log = HEARTBEAT.get().log();
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
        let hang_ms = match lc.hang_timeout_ms.load(Ordering::Relaxed) {
            0 => conf::hang_timeout_ms(conf::running()),
            ms => ms,
        };
        lc.check(now, hang_ms, pid_alive, |f| report(log, f, pid()));
    }
    for z in &l.zones() {
        ring_glue::on_heartbeat(z, log, now);
    }
    HEARTBEAT.get().add_timer(conf::heartbeat_ms());
}

/// Counts and logs a worker found crashed or hung (by `me`).
pub fn report(log: *mut ngx_log_t, f: Finding, me: i32) {
    if let Some(primary) = this_process().primary() {
        let h = primary.header();
        let counter = match f {
            Finding::Crashed { .. } => &h.crashes_seen,
            Finding::Hung { .. } => &h.hangs_seen,
        };
        // Relaxed: a statistic; each finding is reported once (its state change is a CAS).
        counter.fetch_add(1, Ordering::Relaxed);
    }
    let agent = |slot: u32| slot == crate::shm::lifecycle::AGENT_SLOT;
    match f {
        Finding::Crashed { pid, slot, generation } if agent(slot) => {
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "workerbus: privileged agent process {pid} (generation {generation}) crashed: \
                 gone without exiting, seen by {me}"
            );
        }
        Finding::Hung { pid, slot, generation, late_ms } if agent(slot) => {
            ngx::ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "workerbus: privileged agent process {pid} (generation {generation}) hung: \
                 no heartbeat for {late_ms} ms, seen by {me}"
            );
        }
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
