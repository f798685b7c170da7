//! FFI for resty.worker.manager: the node-wide callback lock, the counts
//! its callbacks receive, this worker's marks in the lifecycle table, and
//! the once-per-generation master callbacks. All of it lives in the primary zone.
//!
//! Conventions as in the rest of the C ABI: a negative result is an error
//! explained by `workerbus_last_error`; nothing here blocks.

use core::ffi::c_int;
use core::sync::atomic::Ordering;

use crate::module::pid;
use crate::module::process::ensure_worker_started;
use crate::module::process_state::this_process;
use crate::module::time::mono_ms;
use crate::shm::lifecycle::{Lifecycle, pid_alive};
use crate::shm::manager::{FLAG_LEFT, FLAG_MANAGED};

use super::{arg, fail};
use crate::abi;

fn no_zone() -> &'static str {
    if crate::module::preload::in_config_phase() {
        crate::module::preload::NOT_HERE
    } else {
        "no workerbus zone in this process"
    }
}
const NO_RECORD: &str = "this worker is not in the lifecycle table (not a worker process, or the table is full)";

fn lifecycle() -> Option<&'static Lifecycle> {
    if crate::module::preload::in_config_phase() {
        return None;
    }
    ensure_worker_started();
    this_process().primary().map(|z| &z.header().lifecycle)
}

/// Sets FLAG_* bits on this worker's own record.
fn mark(bits: u32) -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, no_zone()) };
    let Some(index) = this_process().record.get() else { return fail(-1, NO_RECORD) };
    lc.set_flags(index, pid(), bits);
    0
}

/// Tries the manager lock: 1 taken, 0 held by a live process (this one
/// included: the lock is not reentrant), -1 error. A dead owner's lock is
/// taken over.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_lock() -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, no_zone()) };
    c_int::from(lc.try_lock(pid(), pid_alive))
}

/// Releases the manager lock if this process holds it.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_unlock() {
    if let Some(lc) = lifecycle() {
        lc.unlock(pid());
    }
}

/// pid holding the manager lock, 0 when free, -1 error.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_lock_owner() -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, no_zone()) };
    lc.lock_owner()
}

/// Writes n_prev, n_mine, n_next for `generation` into `out` (-1 = nil).
/// `failed_sec` > 0: workers of `generation` that died less than that long
/// ago still count in n_mine (worker start); 0: only the living (exits).
///
/// # Safety
/// `out` must be writable for 3 values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_lc_counts(generation: u64, failed_sec: f64, out: *mut i64) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::out_array.
    let out = arg!(unsafe { abi::out_array(out, 3, "out") }, -1);
    let failed_ms = arg!(abi::seconds(failed_sec, "failed"), -1);
    let Some(lc) = lifecycle() else { return fail(-1, no_zone()) };
    let (prev, mine, next) = lc.manager_counts(generation, mono_ms(), failed_ms, pid_alive);
    out.copy_from_slice(&[prev.map_or(-1, i64::from), i64::from(mine), next.map_or(-1, i64::from)]);
    0
}

/// Marks this worker's start as seen by the manager (it now counts in n_mine).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_mark_started() -> c_int {
    mark(FLAG_MANAGED)
}

/// This worker ran its manager exit: from now on it counts in no one's
/// n_prev, n_mine or n_next, although the process may still drain requests
/// (the module's own state stays "running" until exit_process).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_leave() -> c_int {
    mark(FLAG_LEFT)
}

/// 1 for the one caller that runs the master-start callback of `generation`, else 0.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_take_master_start(generation: u64) -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, no_zone()) };
    c_int::from(lc.take_master_start(generation))
}

/// 1 for the one caller that runs the master-exit callback of `generation`, else 0.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_take_master_exit(generation: u64) -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, no_zone()) };
    c_int::from(lc.take_master_exit(generation))
}

/// GEN_* bits of `generation` (1 master start taken, 2 master exit
/// taken); -2 when that generation is not in the table; -1 error.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_gen_flags(generation: u64) -> c_int {
    let Some(lc) = lifecycle() else { return fail(-1, no_zone()) };
    lc.gen_flags(generation).map_or(-2, |f| f as c_int)
}

/// Sets the hang timeout the heartbeat judges by (0 restores the
/// directive's). Every configuration load resets it.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_set_hang_timeout(sec: f64) -> c_int {
    let ms = arg!(abi::seconds(sec, "hang timeout"), -1);
    let Some(lc) = lifecycle() else { return fail(-1, no_zone()) };
    // Relaxed: a setting read by the heartbeat.
    lc.hang_timeout_ms.store(ms, Ordering::Relaxed);
    0
}

/// Newest generation whose master-start callback has been taken.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_master_started() -> u64 {
    // Acquire: pairs with take_once's AcqRel.
    lifecycle().map_or(0, |lc| lc.master_started.load(Ordering::Acquire))
}

/// Newest generation of the node (greater than this worker's after a reload).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_lc_current_generation() -> u64 {
    lifecycle().map_or(0, |lc| lc.current_generation())
}

/// For the master start callback, in init_by_lua (the configuration phase
/// only): writes the id of the configuration being loaded (its generation:
/// 1 on a fresh start, one more per reload) into `id`, and n_prev (-1 = nil
/// on a fresh start; else the workers still running), n_mine (0) and
/// n_next (-1) into `out`. On a reload the zones of the running
/// configuration are still mapped in the master, so the count is exact.
///
/// # Safety
/// `id` must be writable, `out` writable for 3 values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_lc_master_counts(id: *mut u64, out: *mut i64) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi.
    let (id, out) = unsafe { (arg!(abi::out(id, "id"), -1), arg!(abi::out_array(out, 3, "out"), -1)) };
    if !crate::module::preload::in_config_phase() {
        return fail(-1, "only in init_by_lua, while a configuration loads");
    }
    let l = this_process();
    // The running configuration's primary zone (none on a fresh start).
    let running = if l.generation.get() == 0 { None } else { l.primary().map(|z| &z.header().lifecycle) };
    let (generation, prev) = match running {
        Some(lc) => {
            let next = lc.current_generation() + 1;
            (next, lc.manager_counts(next, mono_ms(), 0, pid_alive).0.map_or(-1, i64::from))
        }
        None => (1, -1),
    };
    *id = generation;
    out.copy_from_slice(&[prev, 0, -1]);
    0
}
