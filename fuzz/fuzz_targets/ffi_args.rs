//! The C ABI's argument rule (src/abi.rs) on arbitrary arguments of every
//! kind the exported functions take: pointers (NULL, into a live buffer, or
//! misaligned), lengths, indexes and periods. Each check must accept
//! exactly what the rule allows, refuse the rest with an error whose text
//! names the argument, and never panic.

#![no_main]

use core::ffi::c_int;

use libfuzzer_sys::fuzz_target;
use workerbus::abi::{self, ArgError, MAX_MS};

fn word<const N: usize>(it: &mut impl Iterator<Item = u8>) -> [u8; N] {
    let mut b = [0u8; N];
    for x in &mut b {
        *x = it.next().unwrap_or(0);
    }
    b
}

fuzz_target!(|input: &[u8]| {
    let mut it = input.iter().copied();
    let mut backing = [0u64; 8];
    let bytes_len = core::mem::size_of_val(&backing);
    while let Some(op) = it.next() {
        let len = usize::from_le_bytes(word(&mut it));
        let kind = it.next().unwrap_or(0);
        let base = backing.as_mut_ptr() as *mut u8;
        // A pointer as a careless caller passes it: NULL, into the buffer
        // (then the length is what it really holds), or one byte in.
        let (p, real_len): (*mut u8, usize) = match kind % 3 {
            0 => (core::ptr::null_mut(), len),
            1 => (base, len % (bytes_len + 1)),
            // SAFETY: one byte into an 64-byte buffer.
            _ => (unsafe { base.add(1) }, len % bytes_len),
        };
        match op % 7 {
            0 => {
                // SAFETY: p is NULL or readable for real_len bytes.
                let r = unsafe { abi::input(p, real_len, "source") };
                check_buffer(r.map(|s| (s.as_ptr() as usize, s.len())), p, real_len, "source");
            }
            1 => {
                // SAFETY: p is NULL or writable for real_len bytes, not aliased.
                let r = unsafe { abi::output(p, real_len, "buf") };
                check_buffer(r.map(|s| (s.as_ptr() as usize, s.len())), p, real_len, "buf");
            }
            2 => {
                // SAFETY: p is NULL, misaligned or valid for a usize write.
                let r = unsafe { abi::out(p as *mut usize, "need") };
                match r {
                    Ok(v) => {
                        assert!(!p.is_null() && (p as usize).is_multiple_of(align_of::<usize>()));
                        *v = len;
                    }
                    Err(ArgError::Null(w)) => assert!(p.is_null() && w == "need"),
                    Err(ArgError::Misaligned(w)) => assert!(!p.is_null() && w == "need"),
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            3 => {
                // Three i64s fit the 64-byte buffer from its start, or from one byte in (then misaligned).
                // SAFETY: p is NULL, misaligned, or valid for 3 i64 writes.
                let r = unsafe { abi::out_array(p as *mut i64, 3, "out") };
                match r {
                    Ok(v) => {
                        assert_eq!(v.len(), 3);
                        v.copy_from_slice(&[1, 2, 3]);
                    }
                    Err(e) => assert!(p.is_null() || !(p as usize).is_multiple_of(8), "{e}"),
                }
            }
            4 => {
                let i = c_int::from_le_bytes(word(&mut it));
                match abi::index(i, "sync task index") {
                    Ok(u) => assert_eq!(u as i64, i64::from(i)),
                    Err(e) => assert_eq!(e.to_string(), format!("bad sync task index {i}")),
                }
            }
            5 => {
                let s = f64::from_le_bytes(word(&mut it));
                match abi::seconds(s, "timeout") {
                    Ok(ms) => assert!(s.is_finite() && s >= 0.0 && ms <= MAX_MS, "{s} -> {ms}"),
                    Err(e) => {
                        assert!(!(s.is_finite() && s >= 0.0 && s * 1000.0 <= MAX_MS as f64), "{s} refused");
                        assert!(e.to_string().starts_with("timeout must be"));
                    }
                }
            }
            _ => {
                let ms = u64::from_le_bytes(word(&mut it));
                assert_eq!(abi::millis(ms, "lease").is_ok(), ms <= MAX_MS);
            }
        }
    }
});

/// What input/output must do: empty for length 0, the caller's bytes for a
/// live pointer, an error for NULL with a length.
fn check_buffer(r: Result<(usize, usize), ArgError>, p: *mut u8, len: usize, what: &str) {
    match r {
        Ok((ptr, n)) => {
            assert_eq!(n, len);
            if len > 0 {
                assert_eq!(ptr, p as usize);
            }
        }
        Err(ArgError::NullWithLength(w, n)) => assert!(p.is_null() && n == len && len > 0 && w == what),
        Err(ArgError::TooLong(w, n)) => assert!(n > isize::MAX as usize && w == what),
        Err(e) => panic!("unexpected {e:?}"),
    }
}
