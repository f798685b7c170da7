//! FFI for the event ring (resty.worker.events, resty.events). The contract
//! is written out in lib/resty/workerbus.lua's cdef block, which declares
//! the whole C ABI.

use core::ffi::{c_int, c_void};

use crate::module::hop;
use crate::module::pid;
use crate::module::process_state::this_process;
use crate::module::ring_glue as ev;
use crate::module::sema::{self, Vm};
use crate::module::time::mono_ms;
use crate::module::wake;
use crate::shm::ring::{Next, RecordIn, RecordOut};

use super::{arg, fail, zone};
use crate::abi::{self, ArgError};

/// # Safety
/// Every pointer must be readable for its length.
#[allow(clippy::too_many_arguments)]
unsafe fn record<'a>(
    src: *const u8,
    slen: usize,
    event: *const u8,
    elen: usize,
    uniq: *const u8,
    ulen: usize,
    data: *const u8,
    dlen: usize,
    flags: u32,
) -> Result<RecordIn<'a>, ArgError> {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    unsafe {
        Ok(RecordIn {
            source: abi::input(src, slen, "source")?,
            event: abi::input(event, elen, "event")?,
            unique: abi::input(uniq, ulen, "unique")?,
            data: abi::input(data, dlen, "data")?,
            pid: pid(),
            flags,
        })
    }
}

/// Appends one event; returns its seq (> 0) or -1. In init_by_lua the
/// event is held until the workers of the generation start (returns 0).
///
/// # Safety
/// Every pointer must be readable for its length.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_ev_post(
    zone_index: c_int,
    src: *const u8,
    slen: usize,
    event: *const u8,
    elen: usize,
    uniq: *const u8,
    ulen: usize,
    data: *const u8,
    dlen: usize,
    flags: u32,
) -> i64 {
    // SAFETY: guaranteed by the caller; checked in record().
    let rec = arg!(unsafe { record(src, slen, event, elen, uniq, ulen, data, dlen, flags) }, -1);
    if crate::module::preload::in_config_phase() {
        return crate::module::preload::hold(zone_index, &rec).unwrap_or_else(|e| fail(-1, e) as i64);
    }
    let Some(z) = zone(zone_index) else { return -1 };
    match ev::post(zone_index as usize, &z, &rec) {
        Ok(seq) => seq as i64,
        Err(e) => fail(-1, e) as i64,
    }
}

/// The VM behind the `vm` argument (0 http, 1 stream), or the reason.
fn vm_arg(vm: c_int) -> Result<Vm, String> {
    Vm::from_index(vm).ok_or_else(|| format!("bad vm {vm} (0: http, 1: stream)"))
}

/// Next event for VM `vm` of this process: 1 record, 3 record after a gap (`out.missed`
/// were lost right before it: Lua reads that 64-bit field only then), 0
/// none, 2 lagged with no record after the gap yet, -2 buffer too small,
/// -1 error.
///
/// # Safety
/// `out` and `need` writable, `buf` writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_ev_next(
    zone_index: c_int,
    vm: c_int,
    out: *mut RecordOut,
    buf: *mut u8,
    cap: usize,
    need: *mut usize,
) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi.
    let (out, buf, need) = unsafe {
        (arg!(abi::out(out, "out"), -1), arg!(abi::output(buf, cap, "buf"), -1), arg!(abi::out(need, "need"), -1))
    };
    hop::on_read();
    crate::module::wake::on_read();
    let vm = match vm_arg(vm) {
        Ok(vm) => vm,
        Err(e) => return fail(-1, e),
    };
    let Some(z) = zone(zone_index) else { return -1 };
    let Some(r) = ev::ring(&z) else { return fail(-1, "the zone has no event ring") };
    let Some(rd) = this_process().record.get().and_then(|i| ev::reader_of(&r, i, vm)) else {
        return fail(-1, "this process reads no events (not an nginx worker, or not tracked)");
    };
    match rd.next(out, buf) {
        Next::Record if out.missed > 0 => 3,
        Next::Record => 1,
        Next::Empty => 0,
        Next::Lagged(missed) => {
            out.missed = missed;
            2
        }
        Next::TooSmall(n) => {
            *need = n;
            -2
        }
    }
}

/// VM `vm`'s poller is about to sleep: 1 if events are already pending,
/// else 0 (its reader is then flagged idle, and the next post wakes it).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_ev_idle(zone_index: c_int, vm: c_int) -> c_int {
    let vm = match vm_arg(vm) {
        Ok(vm) => vm,
        Err(e) => return fail(-1, e),
    };
    let Some(z) = zone(zone_index) else { return -1 };
    let Some(rd) = ev::my_reader(&z, vm) else { return 0 };
    c_int::from(!rd.set_idle(true))
}

/// Registers VM `vm`'s ngx.semaphore, posted on wake-up (NULL
/// unregisters), and attaches that VM's readers. Returns 1 when posters can
/// wake this process (the poller may then sleep without a timeout), 0 when
/// it must poll, -1 when the VM's semaphores cannot be posted (its module's
/// post function is missing; nothing is attached then).
///
/// `sem` is an `ngx_http_lua_sema_t *` (vm 0) or `ngx_stream_lua_sema_t *`
/// (vm 1) that the caller keeps alive until it registers another one or
/// NULL (module::sema states the contract; the address is also forgotten
/// at worker exit).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_ev_set_sema(vm: c_int, sem: *mut c_void) -> c_int {
    let vm = match vm_arg(vm) {
        Ok(vm) => vm,
        Err(e) => return fail(-1, e),
    };
    crate::module::process::ensure_worker_started();
    if let Err(e) = sema::register(vm, sem) {
        return fail(-1, e);
    }
    if sem.is_null() {
        ev::release_readers(vm);
        return 0;
    }
    ev::attach_readers(vm);
    c_int::from(wake::available() && this_process().record.get().is_some())
}

/// Test hook for the "writer killed mid-post" path: takes the zone's lock,
/// writes half a record of 64 bytes, and kills this process with SIGKILL
/// there, lock held. Used by t/102; never returns. Only in a module built
/// with the `test-hooks` feature (`make test`), never in `make build`'s.
#[cfg(feature = "test-hooks")]
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_test_die_mid_post(zone_index: c_int) -> c_int {
    let Some(z) = zone(zone_index) else { return -1 };
    let Some(r) = ev::ring(&z) else { return fail(-1, "the zone has no event ring") };
    let data = [b'x'; 64];
    let rec = RecordIn { source: b"test", event: b"cut", unique: b"", data: &data, pid: pid(), flags: 0 };
    let _ = r.post_partial_for_test(&z.lock(), &rec);
    // SAFETY: kill has no memory preconditions; this process dies here.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    -1
}

/// Trace hook (bench/hops): stamps "handler called" for this worker's
/// reader and writes its last wake-up's hop times (CLOCK_MONOTONIC ns, 0
/// where a hop was not passed; module::hop lists them) into `out[0..7]`,
/// then clears them. Returns 7, or 0 when nothing is traced. Only in a
/// module built with the `hop-trace` feature (`make bench-hops`).
///
/// # Safety
/// `out` writable for 7 values.
#[cfg(feature = "hop-trace")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_hop_row(out: *mut u64) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi.
    let out = arg!(unsafe { abi::output(out.cast::<u8>(), 8 * hop::HOPS, "out") }, -1);
    let mut row = [0u64; hop::HOPS];
    if !hop::take_row(&mut row) {
        return 0;
    }
    for (d, v) in out.chunks_exact_mut(8).zip(row) {
        d.copy_from_slice(&v.to_ne_bytes());
    }
    hop::HOPS as c_int
}

/// Unique events: 1 first claimer, 0 already claimed within ttl, -1 error.
///
/// # Safety
/// `key` readable for `klen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_ev_claim(zone_index: c_int, key: *const u8, klen: usize, ttl_sec: f64) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let key = arg!(unsafe { abi::input(key, klen, "unique key") }, -1);
    let ttl_ms = arg!(abi::seconds(ttl_sec, "timeout"), -1);
    let Some(z) = zone(zone_index) else { return -1 };
    if key.is_empty() {
        return fail(-1, "empty unique key");
    }
    let Some(c) = ev::claims(&z) else { return fail(-1, "the zone has no claim table") };
    c_int::from(c.claim(&z.lock(), key, mono_ms(), ttl_ms))
}

/// Largest source+event+unique+data accepted in one event.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_ev_max_payload(zone_index: c_int) -> usize {
    if crate::module::preload::in_config_phase() {
        return crate::module::preload::max_payload(zone_index);
    }
    zone(zone_index).and_then(|z| ev::ring(&z)).map_or(0, |r| r.max_record_payload())
}

/// Next seq the ring will assign.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_ev_head(zone_index: c_int) -> u64 {
    zone(zone_index).map_or(0, |z| ev::head_seq(&z))
}

/// VM `vm`'s next seq to read in this process (0: it has no reader).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_ev_cursor(zone_index: c_int, vm: c_int) -> u64 {
    let Ok(vm) = vm_arg(vm).map_err(|e| fail(-1, e)) else { return 0 };
    zone(zone_index).and_then(|z| ev::my_reader(&z, vm)).map_or(0, |rd| rd.cursor())
}

/// 1 when this process is OpenResty's privileged agent (tracked by the
/// lifecycle table as such), else 0.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_is_privileged_agent() -> c_int {
    c_int::from(crate::module::process::is_privileged_agent())
}

/// The module's heartbeat period in ms: it wakes a poller that has events
/// waiting, so a poller needs no shorter timeout of its own than this.
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_heartbeat_ms() -> u64 {
    crate::module::process::ensure_worker_started();
    crate::module::conf::heartbeat_ms() as u64
}
