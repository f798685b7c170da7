//! The record format and the region checks: what a record is in the data
//! area (`RecHeader` + payload, padding, the implicit gap at the end), what
//! a post hands in and a reader gets out, and the bounds checks that keep
//! every position and length read from shared memory inside the region
//! (`RingError`: why a region holds no usable ring).

use core::fmt;
use core::mem::size_of;
use core::sync::atomic::{AtomicI32, AtomicU16, AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use super::{ALIGN, MAX_CAPACITY, MAX_READERS, MIN_CAPACITY, ReaderSlot, Ring, RingHeader};
use crate::shm::racy;

/// Longest source, event or unique field.
pub const MAX_FIELD: usize = u16::MAX as usize;

pub(super) const KIND_RECORD: u32 = 0x5245_4331; // "REC1"
pub(super) const KIND_PAD: u32 = 0x5041_4431; // "PAD1"

/// Record header, in the data area. The same 8 bytes of a record can be
/// read by a lapped reader while a writer reuses them, so every field is an
/// atomic; payload bytes are atomic words too (racy.rs), validated by the
/// tail re-check.
#[repr(C)]
pub(super) struct RecHeader {
    /// Records: their seq. Padding: the seq of the record that follows.
    pub(super) seq: AtomicU64,
    pub(super) payload_len: AtomicU32,
    pub(super) kind: AtomicU32,
    pub(super) pid: AtomicI32,
    pub(super) flags: AtomicU32,
    pub(super) source_len: AtomicU16,
    pub(super) event_len: AtomicU16,
    pub(super) unique_len: AtomicU16,
    pub(super) _pad: AtomicU16,
}

/// Record header size: the smallest record, and the smallest tail of the
/// data area that can hold a padding record.
pub const HDR: usize = size_of::<RecHeader>();
const _: () = assert!(HDR == 32 && HDR.is_multiple_of(8));

pub(super) const fn align_up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

pub(super) const fn data_offset(max_readers: usize) -> usize {
    align_up(size_of::<RingHeader>() + max_readers * size_of::<CachePadded<ReaderSlot>>(), ALIGN)
}

pub(super) fn align8(n: u64) -> u64 {
    n.saturating_add(7) & !7
}

pub(super) fn check_base(base: *mut u8) -> Result<(), RingError> {
    if base.is_null() || !(base as usize).is_multiple_of(ALIGN) {
        return Err(RingError::Misaligned { align: ALIGN });
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    Misaligned { align: usize },
    BadCapacity(usize),
    BadReaders(usize),
    RegionTooSmall { need: usize, have: usize },
    NotARing,
    Layout { found: u32, expected: u32 },
    RegionSize { found: u64, expected: u64 },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Misaligned { align } => write!(f, "ring region is not {align}-byte aligned"),
            RingError::BadCapacity(c) => {
                write!(f, "ring capacity {c} is not a multiple of 8 between {MIN_CAPACITY} and {MAX_CAPACITY}")
            }
            RingError::BadReaders(n) => write!(f, "ring readers {n} is not between 1 and {MAX_READERS}"),
            RingError::RegionTooSmall { need, have } => {
                write!(f, "ring region of {have} bytes is smaller than the {need} bytes needed")
            }
            RingError::NotARing => write!(f, "region holds no event ring"),
            RingError::Layout { found, expected } => {
                write!(f, "ring has layout {found} but this module uses layout {expected}")
            }
            RingError::RegionSize { found, expected } => {
                write!(f, "ring was made for a {found}-byte region, not {expected}")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostError {
    /// `size`: payload bytes (all four fields); `max`: `max_record_payload()`.
    TooLarge {
        size: usize,
        max: usize,
    },
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// The ring is full and reader `slot` (process `pid`), responsive,
    /// has not read the last `behind` records yet.
    Full {
        slot: usize,
        pid: i32,
        behind: u64,
    },
}

impl fmt::Display for PostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostError::TooLarge { size, max } => {
                write!(f, "event of {size} bytes is larger than the ring's maximum of {max}")
            }
            PostError::FieldTooLong { field, len, max } => write!(f, "{field} of {len} bytes is longer than {max}"),
            PostError::Full { slot, pid, behind } => write!(
                f,
                "the event ring is full: worker process {pid} (reader {slot}) has not read the last {behind} \
                 events yet and this one would overwrite the oldest of them"
            ),
        }
    }
}

pub struct RecordIn<'a> {
    pub source: &'a [u8],
    pub event: &'a [u8],
    pub unique: &'a [u8],
    pub data: &'a [u8],
    pub pid: i32,
    pub flags: u32,
}

/// A record's metadata; its bytes (source|event|unique|data) go to the
/// caller's buffer. `#[repr(C)]`: handed to LuaJIT FFI as-is.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecordOut {
    pub seq: u64,
    pub pid: i32,
    pub flags: u32,
    pub source_len: u32,
    pub event_len: u32,
    pub unique_len: u32,
    pub data_len: u32,
    /// Records lost (the ring lapped this reader) right before this one, or,
    /// on `Lagged(n)`, n (and `seq` is where reading resumes). Else 0.
    pub missed: u64,
}

impl Ring {
    /// The record header at `pos`, if a header fits there before the end
    /// of the data area.
    pub(super) fn rec(&self, pos: u64) -> Option<&RecHeader> {
        let idx = pos % self.cap;
        // Positions we produce are multiples of 8; a garbage one is refused
        // rather than turned into a misaligned reference.
        if self.cap - idx < HDR as u64 || !idx.is_multiple_of(8) {
            return None;
        }
        // SAFETY: idx + HDR <= capacity, so the header lies in the data area,
        // 8-aligned (the data area is ALIGN-aligned); it holds only atomics.
        Some(unsafe { &*(self.data.add(idx as usize) as *const RecHeader) })
    }

    /// The words holding the payload of `plen` bytes of the record at `pos`
    /// (empty if they would not lie inside the data area: a garbage length).
    pub(super) fn payload(&self, pos: u64, plen: usize) -> &[AtomicU64] {
        let idx = (pos % self.cap) as usize + HDR;
        let words = racy::words_for(plen);
        if !idx.is_multiple_of(8) || idx.saturating_add(words.saturating_mul(8)) > self.cap as usize {
            return &[];
        }
        // SAFETY: idx + 8 * words <= capacity (checked), so the words lie in
        // the data area, 8-aligned (it is ALIGN-aligned, idx a multiple of
        // 8), which holds only atomically accessed bytes (racy.rs).
        unsafe { core::slice::from_raw_parts(self.data.add(idx) as *const AtomicU64, words) }
    }

    /// `pos`, or the start of the next lap when no header fits before the end.
    pub(super) fn skip_gap(&self, pos: u64) -> u64 {
        let room = self.cap - pos % self.cap;
        if room < HDR as u64 { pos.saturating_add(room) } else { pos }
    }

    /// Largest record, header included: the writer never evicts more than
    /// a quarter of the ring for one record.
    pub(super) fn max_record(&self) -> u64 {
        (self.cap / 4) & !7
    }

    pub fn max_record_payload(&self) -> usize {
        (self.max_record() - HDR as u64) as usize
    }

    /// The record at `pos`'s length in the ring and kind, if its header is
    /// sane. Values may be torn; callers validate with the tail re-check.
    pub(super) fn rec_len(&self, h: &RecHeader, pos: u64) -> Option<(u32, u64)> {
        // Relaxed: validated by the caller (tail re-check or lock).
        let kind = h.kind.load(Ordering::Relaxed);
        let plen = h.payload_len.load(Ordering::Relaxed) as u64;
        let room = self.cap - pos % self.cap;
        let len = match kind {
            KIND_RECORD => {
                let len = align8(HDR as u64 + plen);
                if len > self.max_record() || len > room {
                    return None;
                }
                len
            }
            // Padding always runs to the end of the data area.
            KIND_PAD if HDR as u64 + plen == room => room,
            _ => return None,
        };
        Some((kind, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;
    use crate::shm::ring::Next;
    use crate::shm::ring::fixtures::{read, rec, ring};

    #[test]
    fn record_out_carries_every_field() {
        let (_r, ring) = ring(4096, 2);
        let rd = ring.reader(1).unwrap();
        rd.set_cursor(ring.head_seq());
        assert_eq!(read(&rd).0, Next::Empty);
        let rec = RecordIn { source: b"worker", event: b"ev", unique: b"u1", data: b"payload!", pid: 42, flags: 3 };
        assert_eq!(ring.post(&NoLock, &rec), Ok(1));
        let (n, out, bytes) = read(&rd);
        assert_eq!(n, Next::Record);
        assert_eq!(
            out,
            RecordOut { seq: 1, pid: 42, flags: 3, source_len: 6, event_len: 2, unique_len: 2, data_len: 8, missed: 0 }
        );
        assert_eq!(bytes, b"workerevu1payload!");
        assert_eq!(read(&rd).0, Next::Empty);
        assert_eq!(rd.stats().delivered, 1);
        assert_eq!(size_of::<RecordOut>(), 40, "the FFI struct's size is part of the Lua ABI");
    }

    #[test]
    fn garbage_in_the_data_area_never_panics() {
        let (r, ring) = ring(1024, 1);
        let rd = ring.reader(0).unwrap();
        for _ in 0..10 {
            ring.post(&NoLock, &rec(b"e", &[1; 30])).unwrap();
        }
        let data_off = data_offset(1);
        // Scribble over the data area; readers and writers must carry on.
        let base = r.ptr;
        for i in 0..1024 {
            // SAFETY: inside the region we own.
            unsafe { *base.add(data_off + i) = (i * 7919) as u8 };
        }
        let mut out = RecordOut::default();
        let mut buf = [0u8; 64];
        for _ in 0..50 {
            let _ = rd.next(&mut out, &mut buf);
            let _ = ring.post(&NoLock, &rec(b"e", &[2; 30]));
        }
        assert!(ring.stats().corrupt > 0);
        ring.reader(0).unwrap().set_cursor(ring.head_seq());
        ring.post(&NoLock, &rec(b"e", b"ok")).unwrap();
        assert_eq!(rd.next(&mut out, &mut buf), Next::Record);
    }
}
