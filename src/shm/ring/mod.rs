//! The event ring: a multi-writer, multi-reader broadcast log of
//! variable-size records in one preallocated shared region.
//!
//! - Writers serialize through a `ShmLock` and never wait for readers. When
//!   the data area is full, what happens depends on the ring's `Overflow`
//!   setting: `Refuse` (the default) refuses the post while a responsive
//!   reader (one that `claim`ed its slot and whose caller-judged liveness
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

use core::fmt;
use core::mem::size_of;
use core::sync::atomic::{AtomicI32, AtomicU16, AtomicU32, AtomicU64, Ordering, fence};

use crossbeam_utils::CachePadded;

use super::lock::ShmLock;
use super::racy;

pub const RING_MAGIC: u64 = u64::from_be_bytes(*b"wbring\0\0");
/// Bumped whenever `RingHeader`, `ReaderSlot` or `RecHeader` changes.
pub const RING_LAYOUT: u32 = 3;
/// Alignment the region's base needs (the cache-padded parts).
pub const ALIGN: usize = align_of::<CachePadded<u64>>();
pub const MIN_CAPACITY: usize = 1024;
pub const MAX_CAPACITY: usize = 1 << 32;
pub const MAX_READERS: usize = 1024;
/// Longest source, event or unique field.
pub const MAX_FIELD: usize = u16::MAX as usize;

const KIND_RECORD: u32 = 0x5245_4331; // "REC1"
const KIND_PAD: u32 = 0x5041_4431; // "PAD1"
/// No record written yet.
const NO_POS: u64 = u64::MAX;
/// Steps (pads, lapped restarts, records before the cursor) per `next` call.
const MAX_STEPS: usize = 256;

/// Record header, in the data area. The same 8 bytes of a record can be
/// read by a lapped reader while a writer reuses them, so every field is an
/// atomic; payload bytes are atomic words too (racy.rs), validated by the
/// tail re-check.
#[repr(C)]
struct RecHeader {
    /// Records: their seq. Padding: the seq of the record that follows.
    seq: AtomicU64,
    payload_len: AtomicU32,
    kind: AtomicU32,
    pid: AtomicI32,
    flags: AtomicU32,
    source_len: AtomicU16,
    event_len: AtomicU16,
    unique_len: AtomicU16,
    _pad: AtomicU16,
}

/// Record header size: the smallest record, and the smallest tail of the
/// data area that can hold a padding record.
pub const HDR: usize = size_of::<RecHeader>();
const _: () = assert!(HDR == 32 && HDR.is_multiple_of(8));

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
    /// A lower bound of the positions of the claimed readers that were
    /// responsive at the last scan: evicting below it needs no scan.
    /// Readers lower it (`fetch_min`) when they claim, beat or move back.
    guard_pos: AtomicU64,
    /// Posts refused because a responsive reader had not read yet.
    refused: AtomicU64,
    /// `abandoned` as of the last `unreported_abandoned` (logged once each).
    reported: AtomicU64,
    /// `Overflow` as u32; set by the owner of the configuration on each load.
    overflow: AtomicU32,
    /// 1 + the highest reader index ever claimed: posters' scans (idle
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

const fn align_up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

const fn data_offset(max_readers: usize) -> usize {
    align_up(size_of::<RingHeader>() + max_readers * size_of::<CachePadded<ReaderSlot>>(), ALIGN)
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// `out` and the buffer are filled; the cursor moved past the record.
    Record,
    /// Nothing published at the cursor yet.
    Empty,
    /// The buffer must hold this many bytes; the cursor did not move.
    TooSmall(usize),
    /// The ring lapped this reader: exactly this many records are gone, and
    /// no record could be read after them yet (usually a lap is reported
    /// with the record that follows it, in `RecordOut::missed`).
    Lagged(u64),
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

fn align8(n: u64) -> u64 {
    n.saturating_add(7) & !7
}

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

    /// The record header at `pos`, if a header fits there before the end
    /// of the data area.
    fn rec(&self, pos: u64) -> Option<&RecHeader> {
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
    fn payload(&self, pos: u64, plen: usize) -> &[AtomicU64] {
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
    fn skip_gap(&self, pos: u64) -> u64 {
        let room = self.cap - pos % self.cap;
        if room < HDR as u64 { pos.saturating_add(room) } else { pos }
    }

    /// Largest record, header included: the writer never evicts more than
    /// a quarter of the ring for one record.
    fn max_record(&self) -> u64 {
        (self.cap / 4) & !7
    }

    pub fn max_record_payload(&self) -> usize {
        (self.max_record() - HDR as u64) as usize
    }

    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    pub fn max_readers(&self) -> usize {
        self.max_readers
    }

    /// The record at `pos`'s length in the ring and kind, if its header is
    /// sane. Values may be torn; callers validate with the tail re-check.
    fn rec_len(&self, h: &RecHeader, pos: u64) -> Option<(u32, u64)> {
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

    /// Publishes one record; returns its seq. Claimed readers count as responsive.
    pub fn post<L: ShmLock>(&self, lock: &L, rec: &RecordIn) -> Result<u64, PostError> {
        self.post_checked(lock, rec, &|_, _| true)
    }

    /// Publishes one record; returns its seq. With `Overflow::Refuse`, a
    /// claimed reader blocks the post only if `responsive(pid, beat)`.
    pub fn post_checked<L: ShmLock>(
        &self,
        lock: &L,
        rec: &RecordIn,
        responsive: &dyn Fn(i32, u64) -> bool,
    ) -> Result<u64, PostError> {
        let need = self.check(rec)?;
        lock.lock();
        let r = self.post_locked(rec, need, true, responsive);
        lock.unlock();
        r
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

    /// Posts cut off by a dying writer since the last call, and the last
    /// such writer's pid: exactly one caller gets each, to log it once.
    pub fn unreported_abandoned(&self) -> Option<(u64, i32)> {
        let w = self.w();
        // Relaxed: counters; the CAS makes one caller own each increment.
        let done = w.reported.load(Ordering::Relaxed);
        let now = w.abandoned.load(Ordering::Relaxed);
        if now <= done {
            return None;
        }
        w.reported.compare_exchange(done, now, Ordering::Relaxed, Ordering::Relaxed).ok()?;
        Some((now - done, w.abandoned_pid.load(Ordering::Relaxed)))
    }

    /// Test hook: takes the lock and stops half way through a post, as a
    /// writer killed there would: space reserved, tail moved, header and half
    /// the payload written, nothing published, lock still held.
    #[doc(hidden)]
    pub fn post_partial_for_test<L: ShmLock>(&self, lock: &L, rec: &RecordIn) -> Result<u64, PostError> {
        let need = self.check(rec)?;
        lock.lock();
        self.post_locked(rec, need, false, &|_, _| true)
    }

    /// The record's length in the ring, or why it cannot be posted.
    fn check(&self, rec: &RecordIn) -> Result<u64, PostError> {
        let r = self.check_sizes(rec);
        if r.is_err() {
            // Relaxed: a statistic.
            self.w().rejected.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn check_sizes(&self, rec: &RecordIn) -> Result<u64, PostError> {
        for (field, f) in [("source", rec.source), ("event", rec.event), ("unique", rec.unique)] {
            if f.len() > MAX_FIELD {
                return Err(PostError::FieldTooLong { field, len: f.len(), max: MAX_FIELD });
            }
        }
        let max = self.max_record_payload();
        let size = [rec.source, rec.event, rec.unique, rec.data]
            .iter()
            .try_fold(0usize, |a, f| a.checked_add(f.len()))
            .unwrap_or(usize::MAX);
        if size > max {
            return Err(PostError::TooLarge { size, max });
        }
        Ok(align8((HDR + size) as u64))
    }

    /// If the previous lock holder died inside its critical section: count
    /// it and make `head_seq` agree with the last published record. Lock held.
    fn recover(&self) -> Option<i32> {
        let w = self.w();
        // Relaxed (in this function): the lock orders us after the previous holder.
        if w.in_post.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let pid = w.in_post_pid.load(Ordering::Relaxed);
        let head = w.head_pos.load(Ordering::Relaxed);
        let last = w.last_pos.load(Ordering::Relaxed);
        // `last` below `head`: the dead writer published (its own record or
        // not) but may not have stored head_seq. Otherwise its record is
        // invisible and head_seq was never advanced for it.
        if last != NO_POS
            && last < head
            && let Some(h) = self.rec(last)
            && let Some((KIND_RECORD, _)) = self.rec_len(h, last)
        {
            w.head_seq.store(h.seq.load(Ordering::Relaxed).saturating_add(1), Ordering::Release);
        }
        w.abandoned.fetch_add(1, Ordering::Relaxed);
        w.abandoned_pid.store(pid, Ordering::Relaxed);
        w.in_post.store(0, Ordering::Relaxed);
        Some(pid)
    }

    /// For a periodic timer: takes the lock and accounts for a writer that
    /// died mid-post. Returns its pid if there was one. Readers never wait on
    /// such a writer (its record was never published); this only makes the
    /// death visible in the stats without waiting for the next post.
    pub fn repair<L: ShmLock>(&self, lock: &L) -> Option<i32> {
        lock.lock();
        let r = self.recover();
        lock.unlock();
        r
    }

    /// Where the tail must move for `end - tail <= capacity`, and how many
    /// records that drops. Lock held. Stops at `head` (empty ring) on a bad header.
    fn evict(&self, mut tail: u64, head: u64, end: u64) -> (u64, u64) {
        let w = self.w();
        let mut dropped = 0;
        while end.saturating_sub(tail) > self.cap {
            tail = self.skip_gap(tail);
            if tail >= head {
                tail = head;
                break;
            }
            let Some((kind, len)) = self.rec(tail).and_then(|h| self.rec_len(h, tail)) else {
                // Relaxed: a statistic.
                w.corrupt.fetch_add(1, Ordering::Relaxed);
                tail = head;
                break;
            };
            tail += len;
            dropped += (kind == KIND_RECORD) as u64;
        }
        (tail.min(head), dropped)
    }

    /// With `Overflow::Refuse`: the first responsive claimed reader that has
    /// not read past `new_tail`. Lock held.
    fn blocker(&self, tail: u64, new_tail: u64, responsive: &dyn Fn(i32, u64) -> bool) -> Result<(), PostError> {
        let w = self.w();
        // Acquire: pairs with the AcqRel fetch_min of readers that claim or beat.
        let guard = w.guard_pos.load(Ordering::Acquire);
        if new_tail <= guard {
            return Ok(());
        }
        let mut min = u64::MAX;
        for i in 0..self.readers_hi() {
            let Some(s) = self.slot(i) else { break };
            // Acquire: a reader's claim (owner) comes with its position and beat.
            let owner = s.owner.load(Ordering::Acquire);
            if owner == 0 {
                continue;
            }
            // Relaxed: a reader only moves forward; a stale value is conservative.
            let p = self.skip_gap(s.pos.load(Ordering::Relaxed));
            if p < tail {
                continue; // lapped already (it was not responsive): it has been told
            }
            if p >= new_tail {
                min = min.min(p); // unaffected; responsive or not, a lower bound is safe
                continue;
            }
            // Only a reader this post would lap costs a liveness check (a syscall).
            if responsive(owner, s.beat.load(Ordering::Relaxed)) {
                let behind = self.w().head_seq.load(Ordering::Relaxed).saturating_sub(s.seq.load(Ordering::Relaxed));
                return Err(PostError::Full { slot: i, pid: owner, behind });
            }
        }
        // AcqRel: a reader that lowered the bound meanwhile keeps its value.
        let _ = w.guard_pos.compare_exchange(guard, min, Ordering::AcqRel, Ordering::Relaxed);
        Ok(())
    }

    fn post_locked(
        &self,
        rec: &RecordIn,
        need: u64,
        publish: bool,
        responsive: &dyn Fn(i32, u64) -> bool,
    ) -> Result<u64, PostError> {
        let w = self.w();
        self.recover();
        // Relaxed (writer fields): only the lock holder writes them; the lock orders holders.
        w.in_post_pid.store(rec.pid, Ordering::Relaxed);
        w.in_post.store(1, Ordering::Relaxed);
        let head = w.head_pos.load(Ordering::Relaxed);
        let seq = w.head_seq.load(Ordering::Relaxed);
        let room = self.cap - head % self.cap;
        let (pad, pos) = if room >= need { (0, head) } else { (room, head + room) };
        let end = pos + need;
        let tail = w.tail_pos.load(Ordering::Relaxed);
        if end.saturating_sub(tail) > self.cap {
            let (t, dropped) = self.evict(tail, head, end);
            if self.overflow() == Overflow::Refuse
                && let Err(e) = self.blocker(tail, t, responsive)
            {
                // Nothing was written: the ring is as before this call.
                w.in_post.store(0, Ordering::Relaxed);
                w.refused.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            // Relaxed: a statistic.
            w.overwritten.fetch_add(dropped, Ordering::Relaxed);
            // Relaxed + the Release fence below: a reader that sees any byte
            // written after the fence also sees this tail (seqlock writer).
            w.tail_pos.store(t, Ordering::Relaxed);
        }
        fence(Ordering::Release);
        if pad >= HDR as u64
            && let Some(h) = self.rec(head)
        {
            // Relaxed: published by head_pos below.
            h.seq.store(seq, Ordering::Relaxed);
            h.payload_len.store((pad - HDR as u64) as u32, Ordering::Relaxed);
            h.kind.store(KIND_PAD, Ordering::Relaxed);
        }
        let plen = rec.source.len() + rec.event.len() + rec.unique.len() + rec.data.len();
        if let Some(h) = self.rec(pos) {
            // Relaxed: published by head_pos below.
            h.seq.store(seq, Ordering::Relaxed);
            h.payload_len.store(plen as u32, Ordering::Relaxed);
            h.kind.store(KIND_RECORD, Ordering::Relaxed);
            h.pid.store(rec.pid, Ordering::Relaxed);
            h.flags.store(rec.flags, Ordering::Relaxed);
            h.source_len.store(rec.source.len() as u16, Ordering::Relaxed);
            h.event_len.store(rec.event.len() as u16, Ordering::Relaxed);
            h.unique_len.store(rec.unique.len() as u16, Ordering::Relaxed);
            let fields = [rec.source, rec.event, rec.unique, rec.data];
            let fields = if publish { &fields[..] } else { &fields[..2] };
            // Atomic stores (racy.rs): a lapped reader may be copying these
            // bytes right now; it discards its copy (tail re-check).
            racy::store(self.payload(pos, plen), fields);
        }
        w.last_pos.store(pos, Ordering::Relaxed);
        if !publish {
            return Ok(seq);
        }
        // Release: publishes the record (and padding) to readers' Acquire of head_pos.
        w.head_pos.store(end, Ordering::Release);
        // Release: whoever sees the new head_seq finds the record below head_pos.
        w.head_seq.store(seq.wrapping_add(1), Ordering::Release); // wraps only in a corrupt zone
        w.posted.fetch_add(1, Ordering::Relaxed);
        w.in_post.store(0, Ordering::Relaxed);
        Ok(seq)
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

    /// Slots a scan for claimed (or idle) readers must cover.
    fn readers_hi(&self) -> usize {
        // Acquire: pairs with the claim's AcqRel fetch_max.
        (self.w().readers_hi.load(Ordering::Acquire) as usize).min(self.max_readers)
    }

    /// The reader in `slot`, if it exists. One process uses a slot at a time.
    pub fn reader(&self, slot: usize) -> Option<Reader> {
        let s = self.slot(slot)?;
        Some(Reader { ring: *self, slot: s, index: slot })
    }

    /// After a post: signals every idle reader once (`signal(slot, owner
    /// pid, nonce)`: the address its owner registered with `claim`).
    pub fn wake_idle(&self, mut signal: impl FnMut(usize, i32, u64)) {
        // SeqCst fence: the published head is ordered before the idle flags
        // are read; pairs with the fence in Reader::set_idle (Dekker).
        fence(Ordering::SeqCst);
        for i in 0..self.readers_hi() {
            let Some(s) = self.slot(i) else { break };
            // Relaxed probe: in a burst nobody is idle, and this costs no write.
            if s.idle.load(Ordering::Relaxed) != 0 && s.idle.swap(0, Ordering::AcqRel) != 0 {
                // Acquire: the claim that set these came before the idle flag.
                signal(i, s.owner.load(Ordering::Acquire), s.nonce.load(Ordering::Relaxed));
                // Relaxed: statistics.
                s.wakeups.fetch_add(1, Ordering::Relaxed);
                self.w().wakeups.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn check_base(base: *mut u8) -> Result<(), RingError> {
    if base.is_null() || !(base as usize).is_multiple_of(ALIGN) {
        return Err(RingError::Misaligned { align: ALIGN });
    }
    Ok(())
}

/// One reader's view of the ring: a cursor and counters in its slot.
#[derive(Clone, Copy)]
pub struct Reader {
    ring: Ring,
    slot: *const ReaderSlot,
    index: usize,
}

// SAFETY: as for Ring; a slot is used by one process (thread) at a time.
unsafe impl Send for Reader {}

impl Reader {
    fn slot(&self) -> &ReaderSlot {
        // SAFETY: made by Ring::reader from a checked slot index; the region
        // stays mapped (init/attach contract); the slot holds only atomics.
        unsafe { &*self.slot }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Seq of the next record this reader expects.
    pub fn cursor(&self) -> u64 {
        // Relaxed: the slot's own reader is its only writer.
        self.slot().seq.load(Ordering::Relaxed)
    }

    /// Reads from `seq` on: records before it are skipped; if it is older
    /// than the oldest record present, the next `next()` reports Lagged.
    pub fn set_cursor(&self, seq: u64) {
        let ring = &self.ring;
        let w = ring.w();
        let slot = self.slot();
        let mut found = None;
        'attempt: for _ in 0..8 {
            // Acquire (both): records below head are complete; tail as in next().
            let head = w.head_pos.load(Ordering::Acquire);
            let mut p = w.tail_pos.load(Ordering::Acquire);
            loop {
                p = ring.skip_gap(p);
                if p >= head {
                    found = Some(head);
                    break 'attempt;
                }
                let Some(h) = ring.rec(p) else { break 'attempt };
                let len = ring.rec_len(h, p);
                // Relaxed: validated by the re-check below.
                let s = h.seq.load(Ordering::Relaxed);
                // Acquire fence: the loads above complete before the re-check.
                fence(Ordering::Acquire);
                if w.tail_pos.load(Ordering::Relaxed) > p {
                    continue 'attempt; // overwritten under us: start again from the tail
                }
                let Some((kind, len)) = len else { break 'attempt };
                if kind == KIND_RECORD && s >= seq {
                    found = Some(p);
                    break 'attempt;
                }
                p = p.wrapping_add(len); // as in next(): corrupt lengths wrap, never trap
            }
        }
        // Not found (racing writers, bad header): the tail; next() skips
        // the records before `seq` itself.
        // Acquire: as above.
        let pos = found.unwrap_or_else(|| w.tail_pos.load(Ordering::Acquire));
        // Relaxed: the slot's own reader is its only writer.
        slot.pos.store(pos, Ordering::Relaxed);
        slot.seq.store(seq, Ordering::Relaxed);
        // AcqRel: writers that evict past `pos` rescan the readers.
        w.guard_pos.fetch_min(pos, Ordering::AcqRel);
    }

    /// This process now reads the slot with a poller: its unread records
    /// are guarded (with `Overflow::Refuse`) while the caller judges it
    /// responsive from `beat`, and posters wake it at (pid, nonce).
    pub fn claim(&self, pid: i32, nonce: u64, now: u64) {
        let slot = self.slot();
        // Relaxed: published by the Release store of owner.
        slot.beat.store(now, Ordering::Relaxed);
        slot.nonce.store(nonce, Ordering::Relaxed);
        slot.owner.store(pid, Ordering::Release);
        // AcqRel: posters that see the new bound see this slot's claim.
        self.ring.w().readers_hi.fetch_max(self.index as u32 + 1, Ordering::AcqRel);
        self.lower_guard();
    }

    /// A sign of life from the owner (its heartbeat).
    pub fn beat(&self, now: u64) {
        // Relaxed: a reading for the liveness test, never a publication.
        self.slot().beat.store(now, Ordering::Relaxed);
        self.lower_guard();
    }

    /// The owner stops reading (worker exit).
    pub fn release(&self) {
        let slot = self.slot();
        // Relaxed: a stale owner costs a writer one responsiveness check.
        slot.owner.store(0, Ordering::Relaxed);
        slot.idle.store(0, Ordering::Relaxed);
    }

    fn lower_guard(&self) {
        // Relaxed (pos): own slot.
        let pos = self.slot().pos.load(Ordering::Relaxed);
        // AcqRel: pairs with the writer's scan.
        self.ring.w().guard_pos.fetch_min(pos, Ordering::AcqRel);
    }

    /// Whether a record (or a lag report) is waiting at the cursor.
    pub fn pending(&self) -> bool {
        // Relaxed (pos): own slot. Acquire (head): as in next().
        let p = self.ring.skip_gap(self.slot().pos.load(Ordering::Relaxed));
        p < self.ring.w().head_pos.load(Ordering::Acquire)
    }

    /// Copies the next record's bytes (source|event|unique|data) into `buf`
    /// and its metadata into `out`.
    pub fn next(&self, out: &mut RecordOut, buf: &mut [u8]) -> Next {
        let ring = &self.ring;
        let w = ring.w();
        let slot = self.slot();
        // Relaxed: the slot's own reader is its only writer.
        let mut p = slot.pos.load(Ordering::Relaxed);
        let mut s = slot.seq.load(Ordering::Relaxed);
        let save = |p: u64, s: u64| {
            // Relaxed: as above.
            slot.pos.store(p, Ordering::Relaxed);
            slot.seq.store(s, Ordering::Relaxed);
        };
        for _ in 0..MAX_STEPS {
            p = ring.skip_gap(p);
            // Acquire: pairs with the writer's Release of head_pos: every
            // record below it is complete.
            let head = w.head_pos.load(Ordering::Acquire);
            if p >= head {
                if p > ring.skip_gap(head) {
                    p = head; // a cursor beyond the head (corrupt slot): resume at the head
                }
                save(p, s);
                return self.empty(out, s);
            }
            // Acquire: pairs with the writer's tail store + Release fence.
            let tail = w.tail_pos.load(Ordering::Acquire);
            if tail > p {
                // Lapped: the seq of the record at the tail tells how many are gone.
                p = tail;
                continue;
            }
            let Some(h) = ring.rec(p) else {
                p = head;
                continue;
            };
            // Relaxed (header fields): published by head_pos, validated by
            // the tail re-check against overwriting.
            let len = ring.rec_len(h, p);
            let seq = h.seq.load(Ordering::Relaxed);
            let plen = h.payload_len.load(Ordering::Relaxed) as usize;
            let meta = (
                h.pid.load(Ordering::Relaxed),
                h.flags.load(Ordering::Relaxed),
                h.source_len.load(Ordering::Relaxed) as usize,
                h.event_len.load(Ordering::Relaxed) as usize,
                h.unique_len.load(Ordering::Relaxed) as usize,
            );
            let copy = matches!(len, Some((KIND_RECORD, _))) && seq == s && plen <= buf.len();
            if copy && let Some(dst) = buf.get_mut(..plen) {
                // A racy copy (racy.rs): a writer that lapped us may be
                // overwriting these bytes; the re-check below discards them then.
                racy::load(ring.payload(p, plen), dst);
            }
            // Acquire fence: the reads above (header and payload) complete
            // before the tail re-check; pairs with the writer's Release fence
            // after its tail store (seqlock).
            fence(Ordering::Acquire);
            if w.tail_pos.load(Ordering::Relaxed) > p {
                continue; // overwritten while we read: the next pass reports the lag
            }
            // The last sequence number is never assigned in earnest (that
            // takes centuries): on a record it means corruption, like a bad
            // header. Refusing it keeps the cursor's sequence strictly
            // increasing, so a corrupt zone cannot make a reader go round
            // the same records for ever (fuzz/ring_reader found that loop).
            let len = if seq == u64::MAX { None } else { len };
            let Some((kind, len)) = len else {
                // An intact but invalid header: memory corruption. Skip to the head.
                // Relaxed: a statistic.
                w.corrupt.fetch_add(1, Ordering::Relaxed);
                p = head;
                continue;
            };
            if seq > s {
                // Lapped: owed until the record after the gap is read, so
                // that laps met meanwhile make one report with the whole count.
                let n = seq - s;
                s = seq;
                // Relaxed: own slot; counters.
                slot.missed.fetch_add(n, Ordering::Relaxed);
                slot.owed.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            // Positions and sequences come from shared memory, which a bug or
            // a stray write elsewhere may have corrupted: they wrap rather
            // than trap (the lap and head checks above bring a wrapped
            // position back into the ring).
            if kind == KIND_PAD || seq < s {
                p = p.wrapping_add(len); // padding, or a record before the cursor
                continue;
            }
            let (pid, flags, sl, el, ul) = meta;
            if sl + el + ul > plen {
                // Relaxed: a statistic.
                w.corrupt.fetch_add(1, Ordering::Relaxed);
                p = p.wrapping_add(len);
                continue;
            }
            if !copy {
                save(p, s);
                return Next::TooSmall(plen);
            }
            *out = RecordOut {
                seq,
                pid,
                flags,
                source_len: sl as u32,
                event_len: el as u32,
                unique_len: ul as u32,
                data_len: (plen - sl - el - ul) as u32,
                // Relaxed: own slot (a plain load first: no locked op per record).
                missed: if slot.owed.load(Ordering::Relaxed) != 0 { slot.owed.swap(0, Ordering::Relaxed) } else { 0 },
            };
            save(p.wrapping_add(len), s.wrapping_add(1));
            slot.delivered.fetch_add(1, Ordering::Relaxed);
            return Next::Record;
        }
        save(p, s);
        self.empty(out, s)
    }

    /// Nothing to read: `Empty`, or `Lagged` if a lap is still unreported.
    fn empty(&self, out: &mut RecordOut, s: u64) -> Next {
        // Relaxed: own slot.
        let n = self.slot().owed.swap(0, Ordering::Relaxed);
        if n == 0 {
            return Next::Empty;
        }
        *out = RecordOut { seq: s, missed: n, ..RecordOut::default() };
        Next::Lagged(n)
    }

    /// The poller is about to sleep (`true`) or is awake (`false`). Returns
    /// true when it may sleep: the flag is set and nothing arrived meanwhile.
    pub fn set_idle(&self, idle: bool) -> bool {
        let slot = self.slot();
        if !idle {
            // Relaxed: a spurious wake-up later costs one syscall at most.
            slot.idle.store(0, Ordering::Relaxed);
            return false;
        }
        // SeqCst + fence: pairs with the poster's fence in wake_idle (publish
        // head; read flags) so that one of the two sides sees the other.
        slot.idle.store(1, Ordering::SeqCst);
        // SeqCst (under the same fence): posters' scans cover this slot.
        self.ring.w().readers_hi.fetch_max(self.index as u32 + 1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.pending() {
            slot.idle.store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn delivered(&self) -> u64 {
        // Relaxed: a statistic.
        self.slot().delivered.load(Ordering::Relaxed)
    }

    /// Records lost because the ring lapped this reader, in total.
    pub fn missed(&self) -> u64 {
        // Relaxed: a statistic.
        self.slot().missed.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> ReaderStats {
        let slot = self.slot();
        // Relaxed (all): a status snapshot.
        ReaderStats {
            cursor: slot.seq.load(Ordering::Relaxed),
            delivered: slot.delivered.load(Ordering::Relaxed),
            missed: slot.missed.load(Ordering::Relaxed),
            wakeups: slot.wakeups.load(Ordering::Relaxed),
            idle: slot.idle.load(Ordering::Relaxed) != 0,
            owner: slot.owner.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;
    use crate::shm::testing::Shm;

    fn ring(cap: usize, readers: usize) -> (Shm, Ring) {
        let r = Shm::new(Ring::region_size(cap, readers));
        let len = r.len;
        // SAFETY: the mapping is ours, page-aligned, and lives as long as the test's handle.
        let ring = unsafe { Ring::init(r.ptr, len, cap, readers) }.unwrap();
        (r, ring)
    }

    fn rec<'a>(event: &'a [u8], data: &'a [u8]) -> RecordIn<'a> {
        RecordIn { source: b"src", event, unique: b"", data, pid: 7, flags: 0 }
    }

    fn read(r: &Reader) -> (Next, RecordOut, Vec<u8>) {
        let mut out = RecordOut::default();
        let mut buf = vec![0u8; 4096];
        let n = r.next(&mut out, &mut buf);
        let len = (out.source_len + out.event_len + out.unique_len + out.data_len) as usize;
        buf.truncate(if n == Next::Record { len } else { 0 });
        (n, out, buf)
    }

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
    fn wraps_with_padding_and_keeps_order() {
        let (_r, ring) = ring(1024, 1);
        let rd = ring.reader(0).unwrap();
        // 32 header + 3 src + 1 event + n data, aligned to 8: sizes vary so
        // records end at every offset, including within HDR of the end.
        for i in 0..2000u64 {
            let data = vec![i as u8; (i % 37) as usize];
            assert_eq!(ring.post(&NoLock, &rec(b"e", &data)), Ok(i + 1));
            let (n, out, bytes) = read(&rd);
            assert_eq!((n, out.seq), (Next::Record, i + 1));
            assert_eq!(&bytes[4..], &data[..]);
        }
        let st = ring.stats();
        assert_eq!((st.posted, st.head_seq, st.corrupt), (2000, 2001, 0));
        assert!(st.overwritten > 1900, "the ring wrapped many times");
        assert!(st.oldest_seq > 1900 && st.used <= 1024);
    }

    #[test]
    fn lapped_reader_learns_exact_count() {
        let (_r, ring) = ring(1024, 1);
        let rd = ring.reader(0).unwrap();
        for _ in 0..100 {
            ring.post(&NoLock, &rec(b"e", &[1; 20])).unwrap();
        }
        let oldest = ring.oldest_seq();
        assert!(oldest > 1);
        // The lap is reported with the first record after it.
        let (n, out, _) = read(&rd);
        assert_eq!((n, out.seq, out.missed), (Next::Record, oldest, oldest - 1));
        let mut got = 1;
        loop {
            match read(&rd) {
                (Next::Record, out, _) => {
                    assert_eq!(out.seq, oldest + got);
                    assert_eq!(out.missed, 0);
                    got += 1;
                }
                (Next::Empty, ..) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got + oldest - 1, 100);
        assert_eq!((rd.missed(), rd.delivered()), (oldest - 1, got));
    }

    #[test]
    fn set_cursor_finds_the_record_or_reports_the_loss() {
        let (_r, ring) = ring(1024, 1);
        let rd = ring.reader(0).unwrap();
        for _ in 0..60 {
            ring.post(&NoLock, &rec(b"e", &[1; 20])).unwrap();
        }
        let oldest = ring.oldest_seq();
        rd.set_cursor(oldest + 3);
        assert_eq!(read(&rd).1.seq, oldest + 3);
        rd.set_cursor(ring.head_seq());
        assert_eq!(read(&rd).0, Next::Empty);
        rd.set_cursor(1);
        let (n, out, _) = read(&rd);
        assert_eq!((n, out.seq, out.missed), (Next::Record, oldest, oldest - 1));
        // A cursor ahead of the head skips what comes before it.
        rd.set_cursor(ring.head_seq() + 2);
        for _ in 0..3 {
            ring.post(&NoLock, &rec(b"e", b"")).unwrap();
        }
        assert_eq!(read(&rd).1.seq, 63);
    }

    #[test]
    fn too_small_buffer_keeps_the_cursor() {
        let (_r, ring) = ring(4096, 1);
        let rd = ring.reader(0).unwrap();
        ring.post(&NoLock, &rec(b"e", &[9; 100])).unwrap();
        let mut out = RecordOut::default();
        let mut small = [0u8; 10];
        assert_eq!(rd.next(&mut out, &mut small), Next::TooSmall(104));
        let mut buf = [0u8; 104];
        assert_eq!(rd.next(&mut out, &mut buf), Next::Record);
        assert_eq!(out.data_len, 100);
    }

    #[test]
    fn bad_input_is_refused() {
        let (_r, ring) = ring(4096, 1);
        let max = ring.max_record_payload();
        assert_eq!(max, 1024 - HDR);
        let big = vec![0u8; max + 1];
        let r = RecordIn { source: b"", event: b"", unique: b"", data: &big, pid: 0, flags: 0 };
        assert_eq!(ring.post(&NoLock, &r), Err(PostError::TooLarge { size: max + 1, max }));
        let r = RecordIn { data: &big[..max], ..r };
        assert_eq!(ring.post(&NoLock, &r), Ok(1));
        let long = vec![b'x'; MAX_FIELD + 1];
        for (i, field) in ["source", "event", "unique"].into_iter().enumerate() {
            let mut f: [&[u8]; 3] = [b"", b"", b""];
            f[i] = &long;
            let r = RecordIn { source: f[0], event: f[1], unique: f[2], data: b"", pid: 0, flags: 0 };
            assert_eq!(
                ring.post(&NoLock, &r),
                Err(PostError::FieldTooLong { field, len: MAX_FIELD + 1, max: MAX_FIELD })
            );
        }
        assert_eq!(ring.stats().rejected, 4);
        assert_eq!(
            PostError::TooLarge { size: 9, max: 8 }.to_string(),
            "event of 9 bytes is larger than the ring's maximum of 8"
        );
    }

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

    #[test]
    fn dead_writer_leaves_nothing_visible() {
        let (_r, ring) = ring(1024, 1);
        let rd = ring.reader(0).unwrap();
        ring.post(&NoLock, &rec(b"e", b"first")).unwrap();
        // Stops after reserving (and evicting) but before publishing.
        assert_eq!(ring.post_partial_for_test(&NoLock, &RecordIn { pid: 99, ..rec(b"e", &[5; 200]) }), Ok(2));
        assert_eq!(read(&rd).1.seq, 1);
        assert_eq!(read(&rd).0, Next::Empty, "the unpublished record is invisible");
        assert_eq!(ring.repair(&NoLock), Some(99));
        assert_eq!(ring.repair(&NoLock), None);
        assert_eq!(ring.post(&NoLock, &rec(b"e", b"next")), Ok(2), "its seq is reused: no gap");
        let (n, out, bytes) = read(&rd);
        assert_eq!((n, out.seq, &bytes[..]), (Next::Record, 2, &b"srcenext"[..]));
        let st = ring.stats();
        assert_eq!((st.abandoned, st.abandoned_pid, st.posted), (1, 99, 2));
    }

    #[test]
    fn writer_dead_after_publishing_head_keeps_seqs_contiguous() {
        let (_r, ring) = ring(4096, 1);
        ring.post(&NoLock, &rec(b"e", b"")).unwrap();
        // The writer of seq 2 died between head_pos and head_seq.
        ring.post(&NoLock, &rec(b"e", b"")).unwrap();
        let w = ring.w();
        w.head_seq.store(2, Ordering::Relaxed);
        w.in_post.store(1, Ordering::Relaxed);
        assert_eq!(ring.post(&NoLock, &rec(b"e", b"")), Ok(3));
    }

    #[test]
    fn idle_flag_and_wakeups() {
        let (_r, ring) = ring(4096, 3);
        let rd = ring.reader(2).unwrap();
        assert!(rd.set_idle(true));
        let mut woken = vec![];
        ring.post(&NoLock, &rec(b"e", b"")).unwrap();
        rd.claim(4242, 77, 0);
        ring.wake_idle(|s, pid, nonce| woken.push((s, pid, nonce)));
        ring.wake_idle(|s, pid, nonce| woken.push((s, pid, nonce)));
        assert_eq!(woken, vec![(2, 4242, 77)], "the address the owner claimed");
        assert!(!rd.set_idle(true), "a pending record keeps the reader awake");
        assert_eq!((rd.stats().wakeups, rd.stats().idle, ring.stats().wakeups), (1, false, 1));
        assert!(ring.reader(3).is_none());
    }

    /// 100 records of 56 bytes in the ring: 1024 / 56 = 18 fit.
    fn fill(ring: &Ring, n: usize, responsive: &dyn Fn(i32, u64) -> bool) -> Vec<Result<u64, PostError>> {
        (0..n).map(|_| ring.post_checked(&NoLock, &rec(b"e", &[1; 20]), responsive)).collect()
    }

    #[test]
    fn full_ring_refuses_while_a_responsive_reader_has_not_read() {
        let (_r, ring) = ring(1024, 3);
        assert_eq!(ring.overflow(), Overflow::Refuse, "refusing is the default");
        let slow = ring.reader(1).unwrap();
        slow.claim(4321, 1, 1000);
        let unclaimed = ring.reader(2).unwrap(); // no poller: never blocks
        let res = fill(&ring, 30, &|_, _| true);
        let ok = res.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1024 / 56, "exactly what fits was accepted");
        let behind = ok as u64;
        assert_eq!(res[ok], Err(PostError::Full { slot: 1, pid: 4321, behind }));
        assert_eq!(
            res[ok].unwrap_err().to_string(),
            format!(
                "the event ring is full: worker process 4321 (reader 1) has not read the last {behind} events yet \
                 and this one would overwrite the oldest of them"
            )
        );
        let st = ring.stats();
        assert_eq!((st.refused, st.overwritten, st.posted), (30 - behind, 0, behind));
        // Reading makes room again: nothing accepted was lost.
        let (n, out, _) = read(&slow);
        assert_eq!((n, out.seq, out.missed), (Next::Record, 1, 0));
        assert_eq!(fill(&ring, 1, &|_, _| true)[0], Ok(behind + 1));
        assert_eq!(read(&unclaimed).1.missed, 1, "the unclaimed reader was lapped and told");
        // A reader judged unresponsive (hung or dead) is lapped and told.
        let res = fill(&ring, 40, &|pid, beat| !(pid == 4321 && beat == 1000));
        assert!(res.iter().all(|r| r.is_ok()));
        let (n, out, _) = read(&slow);
        assert_eq!(n, Next::Record);
        assert_eq!(out.missed + 2, out.seq, "every record after seq 1 and before this one was lost, and counted");
        // Released (the worker exited): never blocks.
        slow.release();
        let other = ring.reader(0).unwrap();
        other.claim(99, 2, 5);
        other.set_cursor(ring.head_seq());
        assert!(fill(&ring, 15, &|_, _| true).iter().all(|r| r.is_ok()), "the released reader did not block");
        let more = fill(&ring, 10, &|_, _| true);
        assert!(matches!(more.last(), Some(Err(PostError::Full { slot: 0, pid: 99, .. }))), "reader 0 now guards");
    }

    #[test]
    fn overwrite_mode_laps_responsive_readers_and_tells_them() {
        let (_r, ring) = ring(1024, 1);
        ring.set_overflow(Overflow::Overwrite);
        let rd = ring.reader(0).unwrap();
        rd.claim(4321, 1, 0);
        assert!(fill(&ring, 100, &|_, _| true).iter().all(|r| r.is_ok()));
        let oldest = ring.oldest_seq();
        let (n, out, _) = read(&rd);
        assert_eq!((n, out.seq, out.missed), (Next::Record, oldest, oldest - 1));
        assert_eq!(ring.stats().refused, 0);
    }

    #[test]
    fn a_reader_lapped_again_and_again_gets_one_report_per_gap() {
        let (_r, ring) = ring(1024, 1);
        let rd = ring.reader(0).unwrap();
        ring.post(&NoLock, &rec(b"e", &[1; 20])).unwrap();
        let mut out = RecordOut::default();
        let mut small = [0u8; 4];
        let mut reports = vec![];
        // Each attempt finds the buffer too small and more records gone
        // meanwhile, as a reader catching up under a fast writer would.
        for _ in 0..5 {
            fill(&ring, 30, &|_, _| true);
            match rd.next(&mut out, &mut small) {
                Next::TooSmall(_) => {}
                other => reports.push(other),
            }
        }
        let mut buf = [0u8; 64];
        assert_eq!(rd.next(&mut out, &mut buf), Next::Record);
        let lost = out.seq - 1;
        assert_eq!((out.missed, rd.missed()), (lost, lost), "one report, the whole count");
        assert!(reports.is_empty(), "{reports:?}");
        assert_eq!(rd.next(&mut out, &mut buf), Next::Record);
        assert_eq!(out.missed, 0);
    }

    #[test]
    fn a_post_cut_off_by_a_dying_writer_is_reported_once() {
        let (_r, ring) = ring(4096, 1);
        assert_eq!(ring.unreported_abandoned(), None);
        ring.post_partial_for_test(&NoLock, &RecordIn { pid: 77, ..rec(b"e", b"x") }).unwrap();
        // The next writer accounts for it silently; the report is separate.
        ring.post(&NoLock, &rec(b"e", b"")).unwrap();
        assert_eq!(ring.unreported_abandoned(), Some((1, 77)));
        assert_eq!(ring.unreported_abandoned(), None, "once");
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

    /// Found by fuzz/ring_reader: a record with the last sequence number
    /// (only a corrupt zone has one) first trapped the cursor's `s + 1`
    /// under overflow checks, then, wrapped, let the reader go round the
    /// same records for ever. It is corruption: skipped and counted.
    #[test]
    fn a_record_with_the_last_sequence_number_is_corruption() {
        let (_r, ring) = ring(1024, 1);
        let rd = ring.reader(0).unwrap();
        let w = ring.w();
        // Relaxed: a single-threaded test corrupting the header on purpose.
        w.head_seq.store(u64::MAX, Ordering::Relaxed);
        let slot = ring.slot(0).unwrap();
        slot.pos.store(w.head_pos.load(Ordering::Relaxed), Ordering::Relaxed);
        slot.seq.store(u64::MAX, Ordering::Relaxed);
        ring.post(&NoLock, &rec(b"e", b"last")).unwrap();
        assert_eq!(read(&rd).0, Next::Empty);
        assert_eq!(ring.stats().corrupt, 1);
        // A reader whose cursor is put back on the head reads on.
        w.head_seq.store(100, Ordering::Relaxed);
        slot.pos.store(w.head_pos.load(Ordering::Relaxed), Ordering::Relaxed);
        slot.seq.store(100, Ordering::Relaxed);
        ring.post(&NoLock, &rec(b"e", b"next")).unwrap();
        let (n, out, bytes) = read(&rd);
        assert_eq!((n, out.seq), (Next::Record, 100));
        assert!(bytes.ends_with(b"next"));
    }
}
