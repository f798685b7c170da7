//! The C ABI that lib/resty/*.lua reach through LuaJIT's FFI. Every symbol
//! starts with `workerbus_`; lib/resty/workerbus.lua checks ABI_VERSION
//! before it uses any other. Functions never panic and never unwind: a
//! negative result means failure, and `workerbus_last_error` says why.
//! Zones are passed as indexes from `workerbus_zone`, never as pointers.

use core::cell::RefCell;
use core::ffi::c_int;

use crate::module::preload;
use crate::module::process_state::this_process;
use crate::module::zone::Zone;

pub mod lifecycle;
pub mod pg;
pub mod ring;
pub mod sync;

/// Bumped on any change of a signature or structure below.
pub const ABI_VERSION: c_int = 2;

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

/// # Safety
/// `p` must be readable for `len` bytes (or `len` must be 0).
pub unsafe fn bytes<'a>(p: *const u8, len: usize) -> &'a [u8] {
    if p.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts(p, len) }
}

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

/// The message of the last failed call; valid until the next call.
///
/// # Safety
/// `len` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_last_error(len: *mut usize) -> *const u8 {
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        // SAFETY: guaranteed by the caller.
        unsafe { *len = e.len() };
        e.as_ptr()
    })
}

/// Index of the zone named `name` (the primary zone when `len` is 0), or -1.
///
/// # Safety
/// `name` must be readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_zone(name: *const u8, len: usize) -> c_int {
    // SAFETY: guaranteed by the caller.
    let name = unsafe { bytes(name, len) };
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

/// Writes the status document (JSON) into `buf`; returns its full length,
/// which may exceed `cap` (then call again with a larger buffer).
///
/// # Safety
/// `buf` must be writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_status_json(buf: *mut u8, cap: usize) -> usize {
    if preload::in_config_phase() {
        fail(-1, preload::NOT_HERE);
        return 0;
    }
    crate::module::process::ensure_worker_started();
    let doc = serde_json::to_vec(&crate::module::status::snapshot()).unwrap_or_default();
    if doc.len() <= cap && !buf.is_null() {
        // SAFETY: the caller guarantees cap writable bytes at buf.
        unsafe { core::ptr::copy_nonoverlapping(doc.as_ptr(), buf, doc.len()) };
    }
    doc.len()
}

/// The same snapshot as Prometheus text (what `workerbus_metrics` serves):
/// its length; copied to `buf` when it fits in `cap`.
///
/// # Safety
/// `buf` must be writable for `cap` bytes (or NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_metrics_text(buf: *mut u8, cap: usize) -> usize {
    crate::module::process::ensure_worker_started();
    let text = crate::module::metrics::text();
    if text.len() <= cap && !buf.is_null() {
        // SAFETY: the caller guarantees cap writable bytes at buf.
        unsafe { core::ptr::copy_nonoverlapping(text.as_ptr(), buf, text.len()) };
    }
    text.len()
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
    let Some(z) = zone(zone_index) else { return -1 };
    // SAFETY: guaranteed by the caller.
    let (k, v) = unsafe { (bytes(key, klen), bytes(val, vlen)) };
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
    let Some(z) = zone(zone_index) else { return -1 };
    // SAFETY: guaranteed by the caller.
    let k = unsafe { bytes(key, klen) };
    let mut out = Vec::new();
    if !z.header().kv.get(k, &mut out) {
        return 0;
    }
    // SAFETY: guaranteed by the caller.
    unsafe { *vlen = out.len() };
    if out.len() > cap {
        return -2;
    }
    // SAFETY: buf has cap >= out.len() writable bytes.
    unsafe { core::ptr::copy_nonoverlapping(out.as_ptr(), buf, out.len()) };
    1
}
