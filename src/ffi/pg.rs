//! FFI for the PostgreSQL bridge (lib/resty/workerbus.lua declares it, with
//! the rest of the C ABI).
//! Added in ABI 1 without changing any existing signature; the Lua side
//! checks for these symbols before using them.

use core::ffi::c_int;

use crate::pg::glue;

use super::{arg, fail};
use crate::abi;

/// 1 and the limits when the bridge is configured, else 0.
///
/// # Safety
/// `max_channel` and `max_payload` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_pg_limits(max_channel: *mut usize, max_payload: *mut usize) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::out.
    let (mc, mp) =
        unsafe { (arg!(abi::out(max_channel, "max_channel"), -1), arg!(abi::out(max_payload, "max_payload"), -1)) };
    match glue::limits() {
        Some((c, p)) => {
            (*mc, *mp) = (c, p);
            1
        }
        None => 0,
    }
}

/// Queues a post for every node: 0, or -1 (`workerbus_last_error` says why).
///
/// # Safety
/// Pointers readable for their lengths.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_pg_post(ch: *const u8, clen: usize, payload: *const u8, plen: usize) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let (c, p) = unsafe { (arg!(abi::input(ch, clen, "channel"), -1), arg!(abi::input(payload, plen, "payload"), -1)) };
    match glue::post(c, p) {
        Ok(()) => 0,
        Err(e) => fail(-1, e),
    }
}

/// Queues a worker event for every worker of every node: 0 or -1.
///
/// # Safety
/// Pointers readable for their lengths.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_pg_post_event(
    src: *const u8,
    slen: usize,
    ev: *const u8,
    elen: usize,
    data: *const u8,
    dlen: usize,
    flags: u32,
) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let (s, e, d) = unsafe {
        (
            arg!(abi::input(src, slen, "source"), -1),
            arg!(abi::input(ev, elen, "event"), -1),
            arg!(abi::input(data, dlen, "data"), -1),
        )
    };
    match glue::post_event(s, e, d, flags) {
        Ok(()) => 0,
        Err(e) => fail(-1, e),
    }
}

/// A light thread starts (+1) or stops (-1) waiting on / subscribing to a
/// channel: 1 if the node already listens to it, 0 if not yet, -1 error.
///
/// # Safety
/// `ch` readable for `clen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_pg_listen(ch: *const u8, clen: usize, delta: c_int) -> c_int {
    // SAFETY: guaranteed by the caller; checked by abi::input.
    let c = arg!(unsafe { abi::input(ch, clen, "channel") }, -1);
    match glue::listen(c, delta) {
        Ok(l) => c_int::from(l),
        Err(e) => fail(-1, e),
    }
}
