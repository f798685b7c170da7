//! Byte copies into and out of shared memory that another process may be
//! writing at the same time.
//!
//! The ring's payloads and kv's keys and values are read without a lock
//! while a writer may be overwriting them; the reader validates its copy
//! afterwards (the ring's tail re-check, kv's sequence count) and throws a
//! torn one away. With plain `memcpy` that read would still be a data race,
//! which Rust (like C++) makes undefined behaviour whatever is done with
//! the result. So these bytes live in `AtomicU64` words and both sides copy
//! them with Relaxed word loads and stores, the seqlock pattern crossbeam
//! uses: a racing load returns some bytes (maybe a mix of old and new), and
//! the caller's fences order the copy before its re-check. A Relaxed load is
//! a plain `mov` on x86-64 and aarch64, so this costs what a word-wise copy
//! costs. The words of the ring's data area are also, at other times, record
//! headers (narrower atomic fields): a race between accesses of different
//! sizes is one Rust's model leaves to the hardware, which gives some bytes
//! just the same; the re-check discards them too.

use core::sync::atomic::{AtomicU64, Ordering};

/// Words that hold `len` bytes.
pub const fn words_for(len: usize) -> usize {
    len.div_ceil(8)
}

/// Stores `parts`, one after the other, into `words` from its first word
/// on; bytes of the last word past the end are zeroed. Stops at the end of
/// `words` (callers size it with `words_for`).
pub fn store(words: &[AtomicU64], parts: &[&[u8]]) {
    let mut dst = words.iter();
    // Relaxed (every store here): the caller's protocol orders them (the
    // ring's tail and head, kv's sequence count). Words are composed as
    // little-endian values and stored as `to_le`, so that memory holds the
    // bytes in order on any platform.
    let mut put = |v: u64| dst.next().map(|w| w.store(v.to_le(), Ordering::Relaxed)).is_some();
    // The first `n` bytes of the next word (a part's length need not be a
    // multiple of 8): one shift per word, not a byte loop, keeps this as
    // fast as a word-wise memcpy.
    let (mut acc, mut n) = (0u64, 0u32);
    for part in parts {
        let (whole, rest) = part.as_chunks::<8>();
        for c in whole {
            let x = u64::from_le_bytes(*c);
            let word = if n == 0 { x } else { acc | (x << (8 * n)) };
            acc = if n == 0 { 0 } else { x >> (64 - 8 * n) };
            if !put(word) {
                return;
            }
        }
        for &b in rest {
            acc |= u64::from(b) << (8 * n);
            n += 1;
            if n == 8 {
                if !put(acc) {
                    return;
                }
                (acc, n) = (0, 0);
            }
        }
    }
    if n > 0 {
        put(acc);
    }
}

/// Copies the first `out.len()` bytes held by `words` into `out` (fewer
/// if `words` is shorter: the rest of `out` is left as it was).
pub fn load(words: &[AtomicU64], out: &mut [u8]) {
    let mut src = words.iter();
    let (whole, rest) = out.as_chunks_mut::<8>();
    for c in whole {
        let Some(w) = src.next() else { return };
        // Relaxed (every load here): validated by the caller's re-check,
        // after its Acquire fence.
        *c = w.load(Ordering::Relaxed).to_ne_bytes();
    }
    if !rest.is_empty()
        && let Some(w) = src.next()
    {
        for (o, b) in rest.iter_mut().zip(w.load(Ordering::Relaxed).to_ne_bytes()) {
            *o = b;
        }
    }
}

/// `load` into a vector of `len` bytes (at most what `words` holds).
pub fn load_vec(words: &[AtomicU64], len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.resize(len.min(words.len() * 8), 0);
    load(words, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(u64::MAX)).collect()
    }

    #[test]
    fn parts_of_any_length_round_trip_and_zero_the_tail() {
        let src: Vec<u8> = (1..=40).collect();
        for split in [0, 1, 3, 7, 8, 9, 15, 16, 17] {
            for len in [0, 1, 5, 8, 13, 24, 33, 40] {
                let (a, b) = src[..len].split_at(split.min(len));
                let (b, c) = b.split_at(b.len() / 2);
                let w = words(6);
                store(&w, &[a, b, c]);
                let mut out = vec![];
                load_vec(&w, len, &mut out);
                assert_eq!(out, &src[..len], "split {split} len {len}");
                // The bytes after `len` in its last word are zero.
                let mut whole = vec![0xaa; words_for(len) * 8];
                load(&w, &mut whole);
                assert!(whole[len..].iter().all(|&x| x == 0), "split {split} len {len}");
                if words_for(len) < 6 {
                    assert_eq!(w[words_for(len)].load(Ordering::Relaxed), u64::MAX, "nothing stored past the bytes");
                }
            }
        }
    }

    #[test]
    fn copies_stop_at_the_end_of_the_words() {
        let w = words(2);
        store(&w, &[&[1u8; 20]]);
        let mut out = vec![];
        load_vec(&w, 20, &mut out);
        assert_eq!(out, [1u8; 16]);
        let mut buf = [9u8; 20];
        load(&w, &mut buf);
        assert_eq!((&buf[..16], &buf[16..]), (&[1u8; 16][..], &[9u8; 4][..]));
    }
}
