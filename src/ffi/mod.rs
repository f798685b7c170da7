//! The C ABI that lib/resty/*.lua reach through LuaJIT's FFI. Every symbol
//! starts with `workerbus_`; lib/resty/workerbus.lua checks ABI_VERSION
//! (crate::abi) before it uses any other. Functions never panic and never
//! unwind: a negative result means failure, and `workerbus_last_error`
//! says why. Zones are passed as indexes from `workerbus_zone`, never as
//! pointers.
//!
//! Arguments: every function first turns its raw arguments into typed
//! values through crate::abi (the rule is written there: NULL out-pointers,
//! NULL with a length, impossible lengths, negative indexes and bad periods
//! are errors, never undefined behaviour). A function whose result cannot
//! say "error" (a length, a sequence number, a pointer) returns 0 or NULL
//! then, with the reason in `workerbus_last_error`.

use core::cell::RefCell;
use core::ffi::c_int;

use crate::abi::{self, ABI_VERSION};

use crate::module::preload;
use crate::module::process_state::this_process;
use crate::module::zone::Zone;

pub mod lifecycle;
pub mod pg;
pub mod ring;
pub mod sync;

thread_local! {
    static LAST_ERROR: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Records why the current call failed; returns `code` for convenience.
pub fn fail(code: c_int, msg: impl AsRef<str>) -> c_int {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        e.clear();
        e.extend_from_slice(msg.as_ref().as_bytes());
    });
    code
}

/// The value of a checked argument, or, for an `abi::ArgError`, the
/// reason recorded for `workerbus_last_error` and `$ret` (or nothing) returned.
macro_rules! arg {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                $crate::ffi::fail(-1, e.to_string());
                return;
            }
        }
    };
    ($e:expr, $ret:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                $crate::ffi::fail(-1, e.to_string());
                return $ret;
            }
        }
    };
}
pub(crate) use arg;

/// The zone behind an index from `workerbus_zone`; None with the reason
/// recorded (see `workerbus_last_error`).
pub fn zone(index: c_int) -> Option<Zone> {
    if preload::in_config_phase() {
        fail(-1, preload::NOT_HERE);
        return None;
    }
    crate::module::process::ensure_worker_started();
    let z = usize::try_from(index).ok().and_then(|i| this_process().zone_at(i));
    if z.is_none() {
        fail(-1, format!("bad zone index {index}"));
    }
    z
}

#[unsafe(no_mangle)]
pub extern "C" fn workerbus_abi_version() -> c_int {
    ABI_VERSION
}

/// The constants the Lua side must agree with, as one JSON object (flat,
/// upper-case names): the event-ring record's flags (crate::abi::record),
/// resty.sync's value types (module::sync) and the ring source of
/// PostgreSQL bus notifications (pg::wire). Its length in `*len`; the bytes
/// stay valid while the process runs. NULL when `len` is NULL or misaligned.
///
/// # Safety
/// `len` must be writable (or NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_constants(len: *mut usize) -> *const u8 {
    use crate::abi::record as r;
    use crate::module::sync as sy;
    static TEXT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    // SAFETY: guaranteed by the caller; checked by abi::out.
    let Ok(len) = (unsafe { abi::out(len, "len") }) else { return core::ptr::null() };
    let text = TEXT.get_or_init(|| {
        let doc = serde_json::json!({
            "KIND_MASK": r::KIND_MASK,
            "KIND_RAW": r::KIND_RAW,
            "KIND_JSON": r::KIND_JSON,
            "KIND_NIL": r::KIND_NIL,
            "KIND_SBUF": r::KIND_SBUF,
            "FLAG_EVENTS": r::FLAG_EVENTS,
            "FLAG_STREAM": r::FLAG_STREAM,
            "BUS_SHIFT": r::BUS_SHIFT,
            "BUS_MASK": r::BUS_MASK,
            "WID_SHIFT": r::WID_SHIFT,
            "SYNC_T_STRING": sy::T_STRING,
            "SYNC_T_NUMBER": sy::T_NUMBER,
            "SYNC_T_BOOLEAN": sy::T_BOOLEAN,
            "SYNC_T_TABLE": sy::T_TABLE,
            "PG_RING_SOURCE": String::from_utf8_lossy(crate::pg::wire::RING_SOURCE),
        });
        serde_json::to_vec(&doc).unwrap_or_default()
    });
    *len = text.len();
    text.as_ptr()
}

/// The message of the last failed call (its length in `*len`); valid until
/// the next call. NULL when `len` is NULL or misaligned: there is nowhere to
/// say how long the message is.
///
/// # Safety
/// `len` must be writable (or NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_last_error(len: *mut usize) -> *const u8 {
    // SAFETY: guaranteed by the caller; checked by abi::out.
    let Ok(len) = (unsafe { abi::out(len, "len") }) else { return core::ptr::null() };
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        *len = e.len();
        e.as_ptr()
    })
}

/// Index of the zone named `name` (the primary zone when `len` is 0), or -1.
///
/// # Safety
/// `name` must be readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_zone(name: *const u8, len: usize) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let name = arg!(unsafe { abi::input(name, len, "zone name") }, -1);
    if preload::in_config_phase() {
        return preload::zone_index(name).unwrap_or_else(|e| fail(-1, e));
    }
    crate::module::process::ensure_worker_started();
    let zones = this_process().zones();
    if zones.is_empty() {
        return fail(-1, "no workerbus zone in this process (called outside an nginx worker?)");
    }
    if name.is_empty() {
        return 0;
    }
    match zones.iter().position(|z| z.name() == name) {
        Some(i) => i as c_int,
        None => {
            let known: Vec<String> = zones.iter().map(|z| String::from_utf8_lossy(z.name()).into_owned()).collect();
            fail(
                -1,
                format!(
                    "no workerbus zone \"{}\" (zones: {}); declare it with \"workerbus_zone {} <size>;\"",
                    String::from_utf8_lossy(name),
                    known.join(", "),
                    String::from_utf8_lossy(name)
                ),
            )
        }
    }
}

/// The name of zone `index` (its bytes stay valid while the process runs;
/// the length in `*len`), or NULL with the reason in `workerbus_last_error`.
///
/// # Safety
/// `len` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_zone_name(index: c_int, len: *mut usize) -> *const u8 {
    // SAFETY: guaranteed by the caller; checked by abi::out.
    let len = arg!(unsafe { abi::out(len, "len") }, core::ptr::null());
    let Some(z) = zone(index) else { return core::ptr::null() };
    let name = z.name();
    *len = name.len();
    name.as_ptr()
}

/// Writes the status document (JSON) into `buf`; returns its full length,
/// which may exceed `cap` (then call again with a larger buffer); 0 on error.
///
/// # Safety
/// `buf` must be writable for `cap` bytes (or NULL with `cap` 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_status_json(buf: *mut u8, cap: usize) -> usize {
    // SAFETY: guaranteed by the caller; checked by abi::output.
    let buf = arg!(unsafe { abi::output(buf, cap, "buf") }, 0);
    if preload::in_config_phase() {
        fail(-1, preload::NOT_HERE);
        return 0;
    }
    crate::module::process::ensure_worker_started();
    let doc = serde_json::to_vec(&crate::module::status::snapshot()).unwrap_or_default();
    copy_if_fits(&doc, buf)
}

/// Copies `src` into `buf` when it fits; returns `src`'s length either way.
fn copy_if_fits(src: &[u8], buf: &mut [u8]) -> usize {
    if let Some(dst) = buf.get_mut(..src.len()) {
        dst.copy_from_slice(src);
    }
    src.len()
}

/// The same snapshot as Prometheus text (what `workerbus_metrics` serves):
/// its length; copied to `buf` when it fits in `cap`.
///
/// # Safety
/// `buf` must be writable for `cap` bytes (or NULL with `cap` 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_metrics_text(buf: *mut u8, cap: usize) -> usize {
    // SAFETY: guaranteed by the caller; checked by abi::output.
    let buf = arg!(unsafe { abi::output(buf, cap, "buf") }, 0);
    crate::module::process::ensure_worker_started();
    copy_if_fits(crate::module::metrics::text().as_bytes(), buf)
}

/// Generation of this process's configuration (0 outside nginx workers).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_generation() -> u64 {
    this_process().generation.get()
}

/// Stores a small named value in the zone (see shm::kv for the limits).
///
/// # Safety
/// `key` and `val` must be readable for their lengths.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_kv_set(
    zone_index: c_int,
    key: *const u8,
    klen: usize,
    val: *const u8,
    vlen: usize,
) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let k = arg!(unsafe { abi::input(key, klen, "key") }, -1);
    // SAFETY: as above.
    let v = arg!(unsafe { abi::input(val, vlen, "value") }, -1);
    let Some(z) = zone(zone_index) else { return -1 };
    match z.header().kv.set(&z.lock(), k, v) {
        Ok(()) => 0,
        Err(e) => fail(-1, e.to_string()),
    }
}

/// Copies the value of `key` into `buf`: 1 found, 0 absent, -2 `buf` too
/// small (`*vlen` then holds the size needed), -1 error.
///
/// # Safety
/// `key` readable for `klen`, `buf` writable for `cap`, `vlen` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_kv_get(
    zone_index: c_int,
    key: *const u8,
    klen: usize,
    buf: *mut u8,
    cap: usize,
    vlen: *mut usize,
) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi.
    let (k, buf, vlen) = unsafe {
        (
            arg!(abi::input(key, klen, "key"), -1),
            arg!(abi::output(buf, cap, "buf"), -1),
            arg!(abi::out(vlen, "vlen"), -1),
        )
    };
    let Some(z) = zone(zone_index) else { return -1 };
    let mut out = Vec::new();
    if !z.header().kv.get(k, &mut out) {
        return 0;
    }
    *vlen = out.len();
    if copy_if_fits(&out, buf) > buf.len() {
        return -2;
    }
    1
}
