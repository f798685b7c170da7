//! The C ABI that lib/resty/*.lua reach through LuaJIT's FFI. Every symbol
//! starts with `workerbus_`; lib/resty/workerbus.lua checks ABI_VERSION
//! before it uses any other. Functions never panic and never unwind: bad
//! input comes back as a negative code or an error string.

use core::ffi::c_int;

use crate::module::local::local;

/// Bumped on any change of a signature or structure below.
pub const ABI_VERSION: c_int = 1;

#[unsafe(no_mangle)]
pub extern "C" fn workerbus_abi_version() -> c_int {
    ABI_VERSION
}

/// Writes the status document (JSON) into `buf`; returns its full length,
/// which may exceed `cap` (then call again with a larger buffer).
///
/// # Safety
/// `buf` must be writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn workerbus_status_json(buf: *mut u8, cap: usize) -> usize {
    let doc = serde_json::to_vec(&crate::module::status::snapshot()).unwrap_or_default();
    if doc.len() <= cap && !buf.is_null() {
        // SAFETY: the caller guarantees cap writable bytes at buf.
        unsafe { core::ptr::copy_nonoverlapping(doc.as_ptr(), buf, doc.len()) };
    }
    doc.len()
}

/// Generation of this process's configuration (0 outside nginx workers).
#[unsafe(no_mangle)]
pub extern "C" fn workerbus_generation() -> u64 {
    local().generation
}
