//! The event ring: a multi-writer, multi-reader broadcast log of
//! variable-size records in one preallocated shared region.
//!
//! - Writers serialize through a `ShmLock` and never wait for readers. When
//!   the data area is full, what happens depends on the ring's `Overflow`
//!   setting: `Refuse` (the default) refuses the post while a responsive
//!   reader (one that `attach`ed to its slot and whose caller-judged liveness
//!   holds) still has to read a record the post would overwrite; lapped,
//!   hung or dead readers never block. `Overwrite` always moves the tail
//!   past the oldest records before writing over them.
//! - Positions are monotonically increasing byte offsets (`pos % capacity`
//!   indexes the data area); every record carries its sequence number, so a
//!   reader that was lapped learns exactly how many records it lost, once
//!   per gap: laps met before the next record is read add up.
//! - The publication point is `head_pos`, stored with Release after the
//!   whole record is written. A writer that dies inside its critical section
//!   therefore leaves nothing readers can see: no half record, no seq gap.
//!   The next writer notices (`in_post` still set), counts it and goes on.
//! - Readers take no lock. They copy a record, then re-check that the tail
//!   has not passed it (seqlock style); a torn copy is discarded. Payload
//!   bytes are copied in and out with racy.rs's word-wise atomic copies, so
//!   that the race the re-check resolves is not undefined behaviour.
//!
//! Region layout (the caller provides it, `ALIGN`-aligned):
//! `RingHeader | ReaderSlot × max_readers | data area (capacity bytes)`.
//! Records are `RecHeader` + payload (source|event|unique|data), 8-byte
//! aligned, never split at the end of the data area: a record that does not
//! fit is preceded by a padding record (or, when fewer than `HDR` bytes
//! remain, by an implicit gap that needs no header).
//!
//! One idea per file: `record.rs` the record format and the region checks,
//! `writer.rs` posting (overflow policy, dead-writer recovery),
//! `reader.rs` the reader's cursor and lap accounting, `guard.rs` the
//! liveness guard of unread records, `idle.rs` the idle/wake flags. This
//! file holds the layout of the region's header and slots and the `Ring`
//! handle: laying a ring out, attaching to one, its figures.

mod guard;
mod idle;
mod reader;
mod record;
mod writer;

pub use reader::{Next, Reader};
pub use record::{HDR, MAX_FIELD, PostError, RecordIn, RecordOut, RingError};

use core::mem::size_of;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering, fence};

use crossbeam_utils::CachePadded;

use record::{check_base, data_offset};

pub const RING_MAGIC: u64 = u64::from_be_bytes(*b"wbring\0\0");
/// Bumped whenever `RingHeader`, `ReaderSlot` or `RecHeader` changes.
pub const RING_LAYOUT: u32 = 3;
/// Alignment the region's base needs (the cache-padded parts).
pub const ALIGN: usize = align_of::<CachePadded<u64>>();
pub const MIN_CAPACITY: usize = 1024;
pub const MAX_CAPACITY: usize = 1 << 32;
pub const MAX_READERS: usize = 2048;

/// No record written yet.
const NO_POS: u64 = u64::MAX;

/// Written by writers only (under the lock); read by everyone.
#[repr(C)]
struct WriterState {
    /// End of the last published record: the publication point.
    head_pos: AtomicU64,
    /// Start of the oldest intact record.
    tail_pos: AtomicU64,
    /// Next seq to assign (seqs start at 1).
    head_seq: AtomicU64,
    /// Start of the newest record written, published or not (`NO_POS`).
    last_pos: AtomicU64,
    /// 1 while a writer is inside its critical section: still 1 when the
    /// next writer gets the lock means the previous holder died there.
    in_post: AtomicU32,
    in_post_pid: AtomicI32,
    posted: AtomicU64,
    /// Records dropped from the tail to make room.
    overwritten: AtomicU64,
    /// Posts cut short by a writer's death; and the last such writer.
    abandoned: AtomicU64,
    abandoned_pid: AtomicI32,
    _pad: u32,
    /// Posts refused (too large, field too long).
    rejected: AtomicU64,
    /// Invalid headers met (memory corruption): the ring was reset past them.
    corrupt: AtomicU64,
    /// A lower bound of the positions of the attached readers that were
    /// responsive at the last scan: evicting below it needs no scan.
    /// Readers lower it (`fetch_min`) when they attach, beat or move back.
    guard_pos: AtomicU64,
    /// Posts refused because a responsive reader had not read yet.
    refused: AtomicU64,
    /// `abandoned` as of the last `unreported_abandoned` (logged once each).
    reported: AtomicU64,
    /// `Overflow` as u32; set by the owner of the configuration on each load.
    overflow: AtomicU32,
    /// 1 + the highest reader index ever attached: posters' scans (idle
    /// flags, guarded readers) stop there instead of at `max_readers`.
    readers_hi: AtomicU32,
    _pad2: u32,
    /// Idle readers woken by posters (each reader's share is in its slot).
    wakeups: AtomicU64,
}

/// What a post does when the ring is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refused while a responsive reader still has to read what it would overwrite.
    Refuse = 0,
    /// Overwrites the oldest records; lapped readers are told how many they lost.
    Overwrite = 1,
}

#[repr(C)]
pub struct RingHeader {
    magic: AtomicU64,
    layout: AtomicU32,
    max_readers: AtomicU32,
    capacity: AtomicU64,
    /// The `len` given to `init`.
    region_len: AtomicU64,
    w: CachePadded<WriterState>,
}

/// One reader's state, on its own cache line(s). Written by its reader,
/// except `idle`/`wakeups`, which posters touch when they wake it.
#[repr(C)]
pub struct ReaderSlot {
    /// Position of the next record to read, and the seq expected there.
    pos: AtomicU64,
    seq: AtomicU64,
    delivered: AtomicU64,
    /// Records lost because the ring lapped this reader.
    missed: AtomicU64,
    wakeups: AtomicU64,
    idle: AtomicU32,
    /// Pid of the process reading this slot with a poller (0: none): its
    /// unread records are guarded, and `nonce` with it names its wake-up address.
    owner: AtomicI32,
    nonce: AtomicU64,
    /// The owner's last sign of life, in the caller's clock (ms).
    beat: AtomicU64,
    /// Records lost in laps not yet reported (reported with the next record).
    owed: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    pub capacity: u64,
    pub max_record_payload: u64,
    pub max_readers: u32,
    /// Bytes between tail and head (records, padding and gaps).
    pub used: u64,
    /// Next seq to be assigned.
    pub head_seq: u64,
    /// Seq of the oldest record still present (`head_seq` when empty).
    pub oldest_seq: u64,
    pub posted: u64,
    pub overwritten: u64,
    pub abandoned: u64,
    pub abandoned_pid: i32,
    pub rejected: u64,
    pub corrupt: u64,
    pub refused: u64,
    /// Idle readers woken (`wake_idle`), all readers together.
    pub wakeups: u64,
    pub overwrite: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Seq of the next record this reader expects.
    pub cursor: u64,
    pub delivered: u64,
    pub missed: u64,
    pub wakeups: u64,
    pub idle: bool,
    /// Pid of the process polling this slot (0: none).
    pub owner: i32,
}

/// A handle to a ring in a mapped region; all state lives in the region.
#[derive(Clone, Copy)]
pub struct Ring {
    base: *mut u8,
    data: *mut u8,
    cap: u64,
    max_readers: usize,
}

// SAFETY: the handle holds only the region's address and immutable sizes;
// every shared field is an atomic, and raw payload copies are validated.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

impl Ring {
    /// Bytes of region needed for `capacity` bytes of records and `max_readers` slots.
    pub const fn region_size(capacity: usize, max_readers: usize) -> usize {
        data_offset(max_readers) + capacity
    }

    /// Lays out a fresh ring.
    ///
    /// # Safety
    /// `base..base+len` is writable memory, shared with the other processes
    /// that will use the ring, mapped for as long as any handle is used, and
    /// not in use by anyone else during `init`.
    pub unsafe fn init(base: *mut u8, len: usize, capacity: usize, max_readers: usize) -> Result<Ring, RingError> {
        check_base(base)?;
        if !capacity.is_multiple_of(8) || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(RingError::BadCapacity(capacity));
        }
        if !(1..=MAX_READERS).contains(&max_readers) {
            return Err(RingError::BadReaders(max_readers));
        }
        let need = Ring::region_size(capacity, max_readers);
        if len < need {
            return Err(RingError::RegionTooSmall { need, have: len });
        }
        let ring = Ring { base, data: base.wrapping_add(data_offset(max_readers)), cap: capacity as u64, max_readers };
        let h = ring.header();
        // Relaxed: nobody else uses the region during init; `magic` publishes.
        h.layout.store(RING_LAYOUT, Ordering::Relaxed);
        h.max_readers.store(max_readers as u32, Ordering::Relaxed);
        h.capacity.store(capacity as u64, Ordering::Relaxed);
        h.region_len.store(len as u64, Ordering::Relaxed);
        let w = &*h.w;
        for a in [
            &w.head_pos,
            &w.tail_pos,
            &w.posted,
            &w.overwritten,
            &w.abandoned,
            &w.rejected,
            &w.corrupt,
            &w.refused,
            &w.reported,
            &w.guard_pos,
            &w.wakeups,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        w.overflow.store(Overflow::Refuse as u32, Ordering::Relaxed);
        w.readers_hi.store(0, Ordering::Relaxed);
        w.head_seq.store(1, Ordering::Relaxed);
        w.last_pos.store(NO_POS, Ordering::Relaxed);
        w.in_post.store(0, Ordering::Relaxed);
        w.in_post_pid.store(0, Ordering::Relaxed);
        w.abandoned_pid.store(0, Ordering::Relaxed);
        for i in 0..max_readers {
            if let Some(s) = ring.slot(i) {
                for a in [&s.pos, &s.delivered, &s.missed, &s.wakeups, &s.nonce, &s.beat, &s.owed] {
                    a.store(0, Ordering::Relaxed);
                }
                s.seq.store(1, Ordering::Relaxed);
                s.idle.store(0, Ordering::Relaxed);
                s.owner.store(0, Ordering::Relaxed);
            }
        }
        // Release: a process that sees the magic sees the fields above.
        h.magic.store(RING_MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// A ring laid out earlier (by `init`, maybe in another process or by
    /// an earlier configuration): checks magic, layout and region size.
    ///
    /// # Safety
    /// As for `init`, except that the region is in use by others.
    pub unsafe fn attach(base: *mut u8, len: usize) -> Result<Ring, RingError> {
        check_base(base)?;
        if len < size_of::<RingHeader>() {
            return Err(RingError::RegionTooSmall { need: size_of::<RingHeader>(), have: len });
        }
        // SAFETY: `base` is aligned and the region holds at least a header
        // (checked above); every field is an atomic, valid for any bits.
        let h = unsafe { &*(base as *const RingHeader) };
        // Acquire: pairs with the Release in `init`.
        if h.magic.load(Ordering::Acquire) != RING_MAGIC {
            return Err(RingError::NotARing);
        }
        // Relaxed (here and below): written once before the magic.
        let layout = h.layout.load(Ordering::Relaxed);
        if layout != RING_LAYOUT {
            return Err(RingError::Layout { found: layout, expected: RING_LAYOUT });
        }
        let region_len = h.region_len.load(Ordering::Relaxed);
        if region_len != len as u64 {
            return Err(RingError::RegionSize { found: region_len, expected: len as u64 });
        }
        let cap = h.capacity.load(Ordering::Relaxed);
        let readers = h.max_readers.load(Ordering::Relaxed) as usize;
        let capacity = usize::try_from(cap).unwrap_or(usize::MAX);
        if !capacity.is_multiple_of(8) || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(RingError::BadCapacity(capacity));
        }
        if !(1..=MAX_READERS).contains(&readers) {
            return Err(RingError::BadReaders(readers));
        }
        let need = Ring::region_size(capacity, readers);
        if need > len {
            return Err(RingError::RegionTooSmall { need, have: len });
        }
        Ok(Ring { base, data: base.wrapping_add(data_offset(readers)), cap, max_readers: readers })
    }

    fn header(&self) -> &RingHeader {
        // SAFETY: `init`/`attach` checked alignment and size; the caller keeps
        // the region mapped; every field is an atomic.
        unsafe { &*(self.base as *const RingHeader) }
    }

    fn w(&self) -> &WriterState {
        &self.header().w
    }

    fn slot(&self, i: usize) -> Option<&ReaderSlot> {
        if i >= self.max_readers {
            return None;
        }
        let off = size_of::<RingHeader>() + i * size_of::<CachePadded<ReaderSlot>>();
        // SAFETY: slot `i` lies inside the region (region_size covers
        // max_readers slots), is aligned (the header and each slot are
        // multiples of ALIGN), and holds only atomics.
        Some(unsafe { &*(self.base.add(off) as *const CachePadded<ReaderSlot>) })
    }

    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    pub fn max_readers(&self) -> usize {
        self.max_readers
    }

    pub fn set_overflow(&self, mode: Overflow) {
        // Relaxed: a setting; a post racing with the change may use either.
        self.w().overflow.store(mode as u32, Ordering::Relaxed);
    }

    pub fn overflow(&self) -> Overflow {
        // Relaxed: as above.
        match self.w().overflow.load(Ordering::Relaxed) {
            1 => Overflow::Overwrite,
            _ => Overflow::Refuse,
        }
    }

    /// The next seq to be assigned.
    pub fn head_seq(&self) -> u64 {
        // Acquire: pairs with the writer's Release.
        self.w().head_seq.load(Ordering::Acquire)
    }

    /// Seq of the oldest record still present, or `head_seq` if none.
    pub fn oldest_seq(&self) -> u64 {
        let w = self.w();
        for _ in 0..16 {
            // Acquire (head): the records below it are complete.
            let head = w.head_pos.load(Ordering::Acquire);
            let next = self.head_seq();
            // Acquire (tail): as in Reader::next.
            let t = self.skip_gap(w.tail_pos.load(Ordering::Acquire));
            if t >= head {
                return next;
            }
            let Some(h) = self.rec(t) else { return next };
            // Relaxed: validated by the re-check below.
            let seq = h.seq.load(Ordering::Relaxed);
            // Acquire fence: the load above completes before the re-check.
            fence(Ordering::Acquire);
            if w.tail_pos.load(Ordering::Relaxed) <= t {
                return seq;
            }
        }
        self.head_seq()
    }

    pub fn stats(&self) -> RingStats {
        let w = self.w();
        // Relaxed (all): a status snapshot; figures may be a post apart.
        let head = w.head_pos.load(Ordering::Relaxed);
        let tail = w.tail_pos.load(Ordering::Relaxed);
        RingStats {
            capacity: self.cap,
            max_record_payload: self.max_record_payload() as u64,
            max_readers: self.max_readers as u32,
            used: head.saturating_sub(tail),
            head_seq: self.head_seq(),
            oldest_seq: self.oldest_seq(),
            posted: w.posted.load(Ordering::Relaxed),
            overwritten: w.overwritten.load(Ordering::Relaxed),
            abandoned: w.abandoned.load(Ordering::Relaxed),
            abandoned_pid: w.abandoned_pid.load(Ordering::Relaxed),
            rejected: w.rejected.load(Ordering::Relaxed),
            corrupt: w.corrupt.load(Ordering::Relaxed),
            refused: w.refused.load(Ordering::Relaxed),
            wakeups: w.wakeups.load(Ordering::Relaxed),
            overwrite: self.overflow() == Overflow::Overwrite,
        }
    }

    /// Slots a scan for attached (or idle) readers must cover.
    fn readers_hi(&self) -> usize {
        // Acquire: pairs with the attach's AcqRel fetch_max.
        (self.w().readers_hi.load(Ordering::Acquire) as usize).min(self.max_readers)
    }
}

/// The unit tests' ring (in a fresh shared mapping), records and reads.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::shm::lock::NoLock;
    use crate::shm::testing::Shm;

    pub(super) fn ring(cap: usize, readers: usize) -> (Shm, Ring) {
        let r = Shm::new(Ring::region_size(cap, readers));
        let len = r.len;
        // SAFETY: the mapping is ours, page-aligned, and lives as long as the test's handle.
        let ring = unsafe { Ring::init(r.ptr, len, cap, readers) }.unwrap();
        (r, ring)
    }

    pub(super) fn rec<'a>(event: &'a [u8], data: &'a [u8]) -> RecordIn<'a> {
        RecordIn { source: b"src", event, unique: b"", data, pid: 7, flags: 0 }
    }

    pub(super) fn read(r: &Reader) -> (Next, RecordOut, Vec<u8>) {
        let mut out = RecordOut::default();
        let mut buf = vec![0u8; 4096];
        let n = r.next(&mut out, &mut buf);
        let len = (out.source_len + out.event_len + out.unique_len + out.data_len) as usize;
        buf.truncate(if n == Next::Record { len } else { 0 });
        (n, out, buf)
    }

    /// 100 records of 56 bytes in the ring: 1024 / 56 = 18 fit.
    pub(super) fn fill(ring: &Ring, n: usize, responsive: &dyn Fn(i32, u64) -> bool) -> Vec<Result<u64, PostError>> {
        (0..n).map(|_| ring.post_checked(&NoLock, &rec(b"e", &[1; 20]), responsive)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;
    use crate::shm::ring::fixtures::rec;
    use crate::shm::testing::Shm;

    #[test]
    fn init_and_attach_check_the_region() {
        let r = Shm::new(Ring::region_size(8192, 4) + 256);
        let (p, len) = (r.ptr, r.len);
        // SAFETY (all calls): the region is ours and aligned; misaligned and
        // short inputs are refused before any access.
        unsafe {
            assert_eq!(Ring::attach(p, len).err(), Some(RingError::NotARing));
            assert_eq!(Ring::init(p.add(8), len - 8, 8192, 4).err(), Some(RingError::Misaligned { align: ALIGN }));
            assert_eq!(Ring::init(p, len, 1000, 4).err(), Some(RingError::BadCapacity(1000)));
            assert_eq!(Ring::init(p, len, 8192, 0).err(), Some(RingError::BadReaders(0)));
            assert!(matches!(Ring::init(p, 100, 8192, 4), Err(RingError::RegionTooSmall { .. })));
            let ring = Ring::init(p, len, 8192, 4).unwrap();
            ring.post(&NoLock, &rec(b"kept", b"")).unwrap();
            let again = Ring::attach(p, len).unwrap();
            assert_eq!(again.head_seq(), 2, "attach keeps the contents");
            assert_eq!((again.capacity(), again.max_readers()), (8192, 4));
            assert_eq!(
                Ring::attach(p, len - 128).err(),
                Some(RingError::RegionSize { found: len as u64, expected: len as u64 - 128 })
            );
            (*(p as *const RingHeader)).layout.store(RING_LAYOUT + 1, Ordering::Relaxed);
            assert_eq!(
                Ring::attach(p, len).err().map(|e| e.to_string()),
                Some(format!("ring has layout {} but this module uses layout {RING_LAYOUT}", RING_LAYOUT + 1))
            );
        }
    }
}
