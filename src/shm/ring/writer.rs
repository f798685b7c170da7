//! The writer: publishing a record under the lock, making room when the
//! data area is full (evicting the oldest records, or, with
//! `Overflow::Refuse`, refusing while the liveness guard says a responsive
//! reader would lose them), and accounting for a writer that died inside
//! its critical section.

use core::sync::atomic::{Ordering, fence};

use super::record::{HDR, KIND_PAD, KIND_RECORD, MAX_FIELD, PostError, RecordIn, align8};
use super::{NO_POS, Overflow, Ring};
use crate::shm::lock::ShmLock;
use crate::shm::racy;

impl Ring {
    /// Publishes one record; returns its seq. Attached readers count as responsive.
    pub fn post<L: ShmLock>(&self, lock: &L, rec: &RecordIn) -> Result<u64, PostError> {
        self.post_checked(lock, rec, &|_, _| true)
    }

    /// Publishes one record; returns its seq. With `Overflow::Refuse`, a
    /// attached reader blocks the post only if `responsive(pid, beat)`.
    pub fn post_checked<L: ShmLock>(
        &self,
        lock: &L,
        rec: &RecordIn,
        responsive: &dyn Fn(i32, u64) -> bool,
    ) -> Result<u64, PostError> {
        let need = self.check(rec)?;
        let guard = lock.guard();
        let r = self.post_locked(rec, need, true, responsive);
        drop(guard);
        r
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
        // No guard: the lock stays held, as a dead writer leaves it.
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
        let guard = lock.guard();
        let r = self.recover();
        drop(guard);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;
    use crate::shm::ring::Next;
    use crate::shm::ring::fixtures::{fill, read, rec, ring};

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
    fn overwrite_mode_laps_responsive_readers_and_tells_them() {
        let (_r, ring) = ring(1024, 1);
        ring.set_overflow(Overflow::Overwrite);
        let rd = ring.reader(0).unwrap();
        rd.attach(4321, 1, 0);
        assert!(fill(&ring, 100, &|_, _| true).iter().all(|r| r.is_ok()));
        let oldest = ring.oldest_seq();
        let (n, out, _) = read(&rd);
        assert_eq!((n, out.seq, out.missed), (Next::Record, oldest, oldest - 1));
        assert_eq!(ring.stats().refused, 0);
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
}
