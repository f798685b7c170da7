//! FFI for resty.worker.manager: the node-wide callback lock, the counts
//! its callbacks receive, and this worker's marks in the lifecycle table.
//! All of it lives in the primary zone.

use core::ffi::c_int;
use core::sync::atomic::Ordering;

use crate::module::local::local;
use crate::module::process::ensure_worker_started;
use crate::module::time::now_ms;
use crate::shm::lifecycle::{FLAG_MANAGED, Lifecycle, pid_alive};

use super::fail;

fn lifecycle() -> Option<&'static Lifecycle> {
    ensure_worker_started();
    local().primary().map(|z| &z.header().lifecycle)
}

fn pid() -> i32 {
    // SAFETY: set by nginx at process start.
    unsafe { nginx_sys::ngx_pid }
}

/// Tries the manager lock: 1 taken, 0 held by another live worker, -1 error.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_lock() -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, "no workerbus zone in this process") };
    c_int::from(lc.try_lock(pid(), pid_alive))
}

#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_unlock() {
    if let Some(lc) = lifecycle() {
        lc.unlock(pid());
    }
}

/// Writes n_prev, n_mine, n_next for `generation` into `out` (-1 = none).
///
/// # Safety
/// `out` must be writable for 3 values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_lc_counts(generation: u64, failed_sec: f64, out: *mut i64) -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, "no workerbus zone in this process") };
    let failed_ms = if failed_sec.is_finite() && failed_sec > 0.0 { (failed_sec * 1000.0) as u64 } else { 0 };
    let (prev, mine, next) = lc.manager_counts(generation, now_ms(), failed_ms);
    // SAFETY: guaranteed by the caller.
    unsafe {
        *out = prev.map_or(-1, i64::from);
        *out.add(1) = i64::from(mine);
        *out.add(2) = next.map_or(-1, i64::from);
    }
    0
}

/// Marks this worker's start as seen by the manager (it now counts in n_mine).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_mark_started() -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, "no workerbus zone in this process") };
    let Some(index) = local().record else { return fail(-1, "this worker is not in the lifecycle table") };
    lc.set_flags(index, pid(), FLAG_MANAGED);
    0
}

/// This worker leaves now (its exit callback ran), before nginx's exit_process.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_leave() -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, "no workerbus zone in this process") };
    let Some(index) = local().record else { return fail(-1, "this worker is not in the lifecycle table") };
    lc.exit_worker(index, pid(), now_ms());
    0
}

/// 1 for the one caller that runs the master-start callback of `generation`.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_claim_master_start(generation: u64) -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, "no workerbus zone in this process") };
    c_int::from(lc.claim_master_start(generation))
}

/// Sets the hang timeout the heartbeat judges by (0 restores the directive's).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_set_hang_timeout(sec: f64) -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, "no workerbus zone in this process") };
    if !(sec.is_finite() && sec >= 0.0) {
        return fail(-1, "hang timeout must be a non-negative number");
    }
    // Relaxed: a setting read by the heartbeat.
    lc.hang_timeout_ms.store((sec * 1000.0) as u64, Ordering::Relaxed);
    0
}

/// Newest generation whose master-start callback has been claimed.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_master_started() -> u64 {
    // Acquire: pairs with the claim's AcqRel.
    lifecycle().map_or(0, |lc| lc.master_started.load(Ordering::Acquire))
}

/// Newest generation of the node (greater than this worker's after a reload).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_current_generation() -> u64 {
    lifecycle().map_or(0, |lc| lc.current_generation())
}
