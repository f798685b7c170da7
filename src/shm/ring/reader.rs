//! The reader: one cursor per slot (position and the seq expected there),
//! read without a lock and validated by re-checking the tail (seqlock
//! style), and the lap accounting that tells a lapped reader exactly how
//! many records it lost, once per gap.

use core::sync::atomic::{Ordering, fence};

use super::record::{KIND_PAD, KIND_RECORD, RecordOut};
use super::{ReaderSlot, ReaderStats, Ring};
use crate::shm::racy;

/// Steps (pads, lapped restarts, records before the cursor) per `next` call.
const MAX_STEPS: usize = 256;

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

/// One reader's view of the ring: a cursor and counters in its slot.
#[derive(Clone, Copy)]
pub struct Reader {
    pub(super) ring: Ring,
    pub(super) slot: *const ReaderSlot,
    pub(super) index: usize,
}

// SAFETY: as for Ring; a slot is used by one process (thread) at a time.
unsafe impl Send for Reader {}

impl Ring {
    /// The reader in `slot`, if it exists. One process uses a slot at a time.
    pub fn reader(&self, slot: usize) -> Option<Reader> {
        let s = self.slot(slot)?;
        Some(Reader { ring: *self, slot: s, index: slot })
    }
}

impl Reader {
    pub(super) fn slot(&self) -> &ReaderSlot {
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
    use crate::shm::ring::fixtures::{fill, read, rec, ring};

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
