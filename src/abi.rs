//! The C ABI's version and its one argument rule, apart from nginx so that
//! `cargo test` and the fuzz target (fuzz/) exercise it alone.
//!
//! The rule, for every exported `workerbus_*` function: its raw arguments
//! become typed values here, at the top of the function, before anything
//! else runs. A NULL out-pointer, a NULL pointer with a non-zero length, a
//! length no allocation can have, a misaligned pointer, a negative index,
//! and a NaN, infinite, negative or huge number of seconds or milliseconds
//! are refused with an `ArgError`, which the function turns into its error
//! result and `workerbus_last_error` text. Out-of-range zone, instance,
//! task and record indexes are refused by the lookup that follows (each
//! names the index). Nothing is undefined behaviour, nothing panics.

use core::ffi::c_int;
use core::fmt;

/// Bumped on any change of an exported signature or structure; checked by
/// lib/resty/workerbus.lua before it calls anything else.
pub const ABI_VERSION: c_int = 6;

/// The flags word of an event-ring record. The module stores and returns
/// it as is; lib/resty/workerbus/record.lua (which reads these values
/// through `workerbus_constants`) encodes and decodes events with it, and
/// the PostgreSQL bridge checks a cluster event's flags against it.
pub mod record {
    /// Bits 0-1: how the data is encoded.
    pub const KIND_MASK: u32 = 3;
    /// A Lua string, as is.
    pub const KIND_RAW: u32 = 0;
    /// cjson text.
    pub const KIND_JSON: u32 = 1;
    /// nil (no data bytes).
    pub const KIND_NIL: u32 = 2;
    /// LuaJIT's string.buffer serialization (resty.events).
    pub const KIND_SBUF: u32 = 3;
    /// Bit 2: posted through resty.events (its unique timeout, its own unique keys).
    pub const FLAG_EVENTS: u32 = 4;
    /// Bit 3: posted from the stream subsystem's Lua VM (stream-lua).
    pub const FLAG_STREAM: u32 = 8;
    /// Bits 4-15: the resty.events bus (its `listening` path, numbered by
    /// resty.events; 0: none, as for resty.worker.events).
    pub const BUS_SHIFT: u32 = 4;
    pub const BUS_MASK: u32 = 0xfff << BUS_SHIFT;
    /// Bits 16-31: the poster's ngx.worker.id() + 1 (0: unknown; 0xffff:
    /// the privileged agent, whose id lua-resty-events calls -1).
    pub const WID_SHIFT: u32 = 16;
}

/// Longest period accepted, in milliseconds: 100 years (beyond that a
/// timeout is a mistake, and sums with a clock could overflow).
pub const MAX_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq)]
pub enum ArgError {
    /// A required pointer (an out-pointer, a record) is NULL.
    Null(&'static str),
    /// A buffer is NULL but its length is not 0.
    NullWithLength(&'static str, usize),
    /// A length larger than any allocation (over isize::MAX bytes).
    TooLong(&'static str, usize),
    /// A pointer not aligned for its type.
    Misaligned(&'static str),
    /// A negative index.
    Negative(&'static str, c_int),
    /// A number of seconds or milliseconds that is NaN, infinite, negative or too large.
    Period(&'static str),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ArgError::Null(what) => write!(f, "{what} is NULL"),
            ArgError::NullWithLength(what, len) => write!(f, "{what} is NULL but its length is {len}"),
            ArgError::TooLong(what, len) => write!(f, "{what} has an impossible length {len}"),
            ArgError::Misaligned(what) => write!(f, "{what} is misaligned"),
            ArgError::Negative(what, i) => write!(f, "bad {what} {i}"),
            ArgError::Period(what) => {
                write!(f, "{what} must be a number from 0 to {} seconds", MAX_MS / 1000)
            }
        }
    }
}

fn length_ok(what: &'static str, p_null: bool, len: usize) -> Result<(), ArgError> {
    if len > isize::MAX as usize {
        return Err(ArgError::TooLong(what, len));
    }
    if p_null && len > 0 {
        return Err(ArgError::NullWithLength(what, len));
    }
    Ok(())
}

/// Bytes the caller passes in: `len` bytes at `p` (`p` may be NULL when
/// `len` is 0).
///
/// # Safety
/// A non-NULL `p` must be readable for `len` bytes for `'a`.
pub unsafe fn input<'a>(p: *const u8, len: usize, what: &'static str) -> Result<&'a [u8], ArgError> {
    length_ok(what, p.is_null(), len)?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: non-NULL (checked), readable for len (the caller), len <= isize::MAX.
    Ok(unsafe { core::slice::from_raw_parts(p, len) })
}

/// A buffer the function writes into: `cap` bytes at `p` (`p` may be NULL
/// when `cap` is 0).
///
/// # Safety
/// A non-NULL `p` must be writable for `cap` bytes for `'a`, and not aliased.
pub unsafe fn output<'a>(p: *mut u8, cap: usize, what: &'static str) -> Result<&'a mut [u8], ArgError> {
    length_ok(what, p.is_null(), cap)?;
    if cap == 0 {
        return Ok(&mut []);
    }
    // SAFETY: non-NULL (checked), writable for cap (the caller), cap <= isize::MAX.
    Ok(unsafe { core::slice::from_raw_parts_mut(p, cap) })
}

/// A required out-pointer to one `T`.
///
/// # Safety
/// A non-NULL `p` must be valid for writes of a `T` for `'a`, and not aliased.
pub unsafe fn out<'a, T>(p: *mut T, what: &'static str) -> Result<&'a mut T, ArgError> {
    if p.is_null() {
        return Err(ArgError::Null(what));
    }
    if !p.is_aligned() {
        return Err(ArgError::Misaligned(what));
    }
    // SAFETY: non-NULL and aligned (checked), valid for writes (the caller).
    Ok(unsafe { &mut *p })
}

/// A required out-array of `n` values of `T`.
///
/// # Safety
/// A non-NULL `p` must be valid for writes of `n` values for `'a`, and not aliased.
pub unsafe fn out_array<'a, T>(p: *mut T, n: usize, what: &'static str) -> Result<&'a mut [T], ArgError> {
    if p.is_null() {
        return Err(ArgError::Null(what));
    }
    if !p.is_aligned() {
        return Err(ArgError::Misaligned(what));
    }
    // SAFETY: non-NULL and aligned (checked), valid for n writes (the caller).
    Ok(unsafe { core::slice::from_raw_parts_mut(p, n) })
}

/// A non-negative index (its upper bound is the lookup's to check).
pub fn index(i: c_int, what: &'static str) -> Result<usize, ArgError> {
    usize::try_from(i).map_err(|_| ArgError::Negative(what, i))
}

/// Seconds as Lua passes them, in milliseconds: finite, 0 or more, at most MAX_MS.
pub fn seconds(s: f64, what: &'static str) -> Result<u64, ArgError> {
    let ms = s * 1000.0;
    if !(ms.is_finite() && ms >= 0.0 && ms <= MAX_MS as f64) {
        return Err(ArgError::Period(what));
    }
    Ok(ms as u64)
}

/// Milliseconds as an integer: at most MAX_MS.
pub fn millis(ms: u64, what: &'static str) -> Result<u64, ArgError> {
    if ms > MAX_MS {
        return Err(ArgError::Period(what));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_null_only_when_empty() {
        let b = [1u8, 2, 3];
        // SAFETY: b is readable for 3 bytes.
        unsafe {
            assert_eq!(input(b.as_ptr(), 3, "key"), Ok(&b[..]));
            assert_eq!(input(core::ptr::null(), 0, "key"), Ok(&[][..]));
            assert_eq!(input(core::ptr::null(), 2, "key"), Err(ArgError::NullWithLength("key", 2)));
            assert_eq!(input(b.as_ptr(), usize::MAX, "key"), Err(ArgError::TooLong("key", usize::MAX)));
            assert_eq!(output(core::ptr::null_mut(), 0, "buf").map(|s| s.len()), Ok(0));
            assert_eq!(
                output(core::ptr::null_mut(), 9, "buf").map(|s| s.len()),
                Err(ArgError::NullWithLength("buf", 9))
            );
        }
        assert_eq!(ArgError::NullWithLength("key", 2).to_string(), "key is NULL but its length is 2");
    }

    #[test]
    fn out_pointers_must_be_there_and_aligned() {
        let mut v = [0u64; 2];
        // SAFETY: v is writable; the misaligned pointer is refused before any use.
        unsafe {
            assert!(out(v.as_mut_ptr(), "len").is_ok());
            assert_eq!(out(core::ptr::null_mut::<u64>(), "len").err(), Some(ArgError::Null("len")));
            let odd = (v.as_mut_ptr() as *mut u8).add(1) as *mut u64;
            assert_eq!(out(odd, "len").err(), Some(ArgError::Misaligned("len")));
            assert_eq!(out_array(core::ptr::null_mut::<i64>(), 3, "out").err(), Some(ArgError::Null("out")));
        }
        assert_eq!(ArgError::Null("len").to_string(), "len is NULL");
    }

    #[test]
    fn indexes_and_periods() {
        assert_eq!(index(3, "task index"), Ok(3));
        assert_eq!(index(-1, "task index").unwrap_err().to_string(), "bad task index -1");
        assert_eq!(seconds(1.5, "ttl"), Ok(1500));
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e300] {
            assert_eq!(seconds(bad, "ttl"), Err(ArgError::Period("ttl")), "{bad}");
        }
        assert_eq!(
            millis(MAX_MS + 1, "interval").unwrap_err().to_string(),
            "interval must be a number from 0 to 3153600000 seconds"
        );
    }
}
