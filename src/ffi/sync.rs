//! FFI for resty.sync. The contract is written out in lib/resty/workerbus.lua's
//! cdef block (the whole C ABI's). Instances and tasks are passed as indexes
//! into the zone's sync table, never as pointers (except the read-only
//! sequence word).

use core::ffi::c_int;
use core::sync::atomic::Ordering;

use crate::module::pid;
use crate::module::sync::{self as sy, ZoneSlab};
use crate::module::time::now_ms;
use crate::shm::lease::Role;
use crate::shm::sync::BlockHead;

use super::{arg, fail, zone};
use crate::abi;

/// Index of the instance named `key` (made on first use), or -1.
///
/// # Safety
/// `key` readable for `klen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_sync_instance(
    zone_index: c_int,
    key: *const u8,
    klen: usize,
    interval_ms: u64,
) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let key = arg!(unsafe { abi::input(key, klen, "key") }, -1);
    let interval_ms = arg!(abi::millis(interval_ms, "interval"), -1);
    let Some(z) = zone(zone_index) else { return -1 };
    let Some(t) = sy::table_or_make(&z) else {
        return fail(-1, "no room in the zone for resty.sync's table");
    };
    match t.instance(&z.lock(), key) {
        Ok(i) => {
            // Relaxed: a figure for status.
            t.instances[i].interval_ms.store(interval_ms, Ordering::Relaxed);
            i as c_int
        }
        Err(e) => fail(-1, e.to_string()),
    }
}

/// Index of task `tag` of instance `inst` (made on first use), or -1.
///
/// # Safety
/// `tag` readable for `tlen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_sync_task(zone_index: c_int, inst: c_int, tag: *const u8, tlen: usize) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let tag = arg!(unsafe { abi::input(tag, tlen, "tag") }, -1);
    let inst = arg!(abi::index(inst, "sync instance index"), -1);
    let Some(z) = zone(zone_index) else { return -1 };
    let Some(t) = sy::table(&z) else { return fail(-1, "the zone has no sync table") };
    match t.task(&z.lock(), inst, tag) {
        Ok(i) => i as c_int,
        Err(e) => fail(-1, e.to_string()),
    }
}

/// The task's update sequence word (its low 32 bits change on every
/// update); Lua reads it directly to learn whether to copy. NULL on error.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_sync_seq_ptr(zone_index: c_int, task: c_int) -> *const u32 {
    let task = arg!(abi::index(task, "sync task index"), core::ptr::null());
    let Some(z) = zone(zone_index) else { return core::ptr::null() };
    let Some(t) = sy::table(&z) else {
        fail(-1, "the zone has no sync table");
        return core::ptr::null();
    };
    let p = t.seq_ptr(task);
    if p.is_null() {
        fail(-1, format!("bad sync task index {task}"));
    }
    p
}

/// One tick of the instance's runner lease: 1 this worker is the runner
/// (start runs), 2 it is but must start nothing (old generation, exiting),
/// 0 another worker is, -1 error.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_sync_tick(zone_index: c_int, inst: c_int, lease_ms: u64, exiting: c_int) -> c_int {
    let inst = arg!(abi::index(inst, "sync instance index"), -1);
    let lease_ms = arg!(abi::millis(lease_ms, "lease"), -1);
    let Some(z) = zone(zone_index) else { return -1 };
    match sy::tick(&z, inst, lease_ms, exiting != 0) {
        Some(Role::Owner | Role::TookOver { .. }) => 1,
        Some(Role::Retiring) => 2,
        Some(Role::Other { .. }) => 0,
        None => fail(-1, "bad sync instance"),
    }
}

/// The instance's runner pid (0: none).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_sync_runner(zone_index: c_int, inst: c_int) -> c_int {
    let inst = arg!(abi::index(inst, "sync instance index"), 0);
    let Some(t) = zone(zone_index).and_then(|z| sy::table(&z)) else { return 0 };
    t.instances.get(inst).map_or_else(|| fail(0, format!("bad sync instance index {inst}")), |i| i.lease.owner())
}

/// A run starts: 1 if this worker still holds the lease (the run is then
/// counted in it until workerbus_sync_end_run), else 0.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_sync_begin_run(zone_index: c_int, inst: c_int) -> c_int {
    let inst = arg!(abi::index(inst, "sync instance index"), 0);
    let Some(t) = zone(zone_index).and_then(|z| sy::table(&z)) else { return 0 };
    t.instances
        .get(inst)
        .map_or_else(|| fail(0, format!("bad sync instance index {inst}")), |i| c_int::from(i.lease.begin_run(pid())))
}

#[unsafe(no_mangle)]
pub extern "C" fn workerbus_sync_end_run(zone_index: c_int, inst: c_int) {
    let inst = arg!(abi::index(inst, "sync instance index"));
    if let Some(i) = zone(zone_index).and_then(|z| sy::table(&z)).and_then(|t| t.instances.get(inst)) {
        i.lease.end_run(pid());
    }
}

/// Publishes an update of `task`: version and data with their Lua type
/// tags, as one unit. Returns its sequence (> 0) or -1 (nothing changed).
///
/// # Safety
/// `v` readable for `vlen`, `d` for `dlen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_sync_publish(
    zone_index: c_int,
    task: c_int,
    vtype: u32,
    v: *const u8,
    vlen: usize,
    dtype: u32,
    d: *const u8,
    dlen: usize,
) -> i64 {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let (v, d) = unsafe { (arg!(abi::input(v, vlen, "version"), -1), arg!(abi::input(d, dlen, "data"), -1)) };
    let task = arg!(abi::index(task, "sync task index"), -1);
    let Some(z) = zone(zone_index) else { return -1 };
    let Some(t) = sy::table(&z) else { return fail(-1, "the zone has no sync table") as i64 };
    let slab = ZoneSlab(&z);
    // Wall clock: the update's last-modified time (unix time for
    // get_last_modified_time and the status), never judged.
    match t.publish(&z.lock(), &slab, task, pid(), sy::alive, vtype, v, dtype, d, now_ms()) {
        Ok(seq) => seq as i64,
        Err(e) => fail(-1, e.to_string()) as i64,
    }
}

/// Copies the task's published update: `head` gets its head, `buf` its
/// version then data bytes. 1 copied, 0 nothing published yet, -2 `buf` too
/// small (head then holds the lengths: call again with vlen + dlen bytes).
///
/// # Safety
/// `head` writable, `buf` writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_sync_read(
    zone_index: c_int,
    task: c_int,
    head: *mut BlockHead,
    buf: *mut u8,
    cap: usize,
) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi.
    let (head, buf) = unsafe { (arg!(abi::out(head, "head"), -1), arg!(abi::output(buf, cap, "buf"), -1)) };
    let task = arg!(abi::index(task, "sync task index"), -1);
    let Some(z) = zone(zone_index) else { return -1 };
    let Some(t) = sy::table(&z) else { return fail(-1, "the zone has no sync table") };
    if t.task_ref(task).is_none() {
        return fail(-1, format!("bad sync task index {task}"));
    }
    let slab = ZoneSlab(&z);
    let r = t.read(&z.lock(), &slab, task, |h, v, d| {
        *head = *h;
        let Some(dst) = buf.get_mut(..v.len() + d.len()) else { return -2 };
        let (dv, dd) = dst.split_at_mut(v.len());
        dv.copy_from_slice(v);
        dd.copy_from_slice(d);
        1
    });
    r.unwrap_or(0)
}

/// Counts a finished run (its error, if any, is kept for the status).
/// `started_ms` is on the monotonic clock (`ngx_current_msec`, as
/// resty.core.time's monotonic_msec returns it): the schedule that
/// workerbus_sync_last_run_ms gives back to a new runner.
///
/// # Safety
/// `err` readable for `elen` (NULL: the run succeeded).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_sync_record_run(
    zone_index: c_int,
    task: c_int,
    started_ms: u64,
    duration_us: u64,
    err: *const u8,
    elen: usize,
) {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let e = if err.is_null() && elen == 0 { None } else { Some(arg!(unsafe { abi::input(err, elen, "error") })) };
    let task = arg!(abi::index(task, "sync task index"));
    let Some(z) = zone(zone_index) else { return };
    let Some(t) = sy::table(&z) else { return };
    t.record_run(&z.lock(), task, started_ms, duration_us, e);
}

/// When the task's last counted run started (monotonic ms, as passed to
/// workerbus_sync_record_run; 0: never), so that a new runner keeps the
/// schedule of the previous one.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_sync_last_run_ms(zone_index: c_int, task: c_int) -> u64 {
    let task = arg!(abi::index(task, "sync task index"), 0);
    let Some(t) = zone(zone_index).and_then(|z| sy::table(&z)) else { return 0 };
    // Relaxed: a schedule hint.
    t.task_ref(task).map_or(0, |t| t.last_run_ms.load(Ordering::Relaxed))
}

/// Asks for a run of `task` at once (resty.sync's trigger): the request
/// stays in the zone until the instance's runner takes it, so that a
/// trigger made while no live runner holds the lease reaches the next one.
/// 1 asked, -1 error.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_sync_trigger(zone_index: c_int, task: c_int) -> c_int {
    let task = arg!(abi::index(task, "sync task index"), -1);
    let Some(t) = zone(zone_index).and_then(|z| sy::table(&z)) else { return fail(-1, "the zone has no sync table") };
    if t.trigger(task) { 1 } else { fail(-1, format!("bad sync task index {task}")) }
}

/// Whether a run of `task` was asked for (1) or not (0), the request
/// cleared when `take` is non-zero; -1 error.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_sync_triggered(zone_index: c_int, task: c_int, take: c_int) -> c_int {
    let task = arg!(abi::index(task, "sync task index"), -1);
    let Some(t) = zone(zone_index).and_then(|z| sy::table(&z)) else { return fail(-1, "the zone has no sync table") };
    if t.task_ref(task).is_none() {
        return fail(-1, format!("bad sync task index {task}"));
    }
    c_int::from(t.take_trigger(task, take != 0))
}
