//! The liveness guard: a reader that `attach`es to its slot and keeps beating
//! has its unread records guarded (with `Overflow::Refuse`) while the
//! caller judges it responsive; `guard_pos`, a lower bound of the guarded
//! positions, spares most posts the scan of the readers.

use core::sync::atomic::Ordering;

use super::record::PostError;
use super::{Reader, Ring};

impl Ring {
    /// With `Overflow::Refuse`: the first responsive attached reader that has
    /// not read past `new_tail`. Lock held.
    pub(super) fn blocker(
        &self,
        tail: u64,
        new_tail: u64,
        responsive: &dyn Fn(i32, u64) -> bool,
    ) -> Result<(), PostError> {
        let w = self.w();
        // Acquire: pairs with the AcqRel fetch_min of readers that attach or beat.
        let guard = w.guard_pos.load(Ordering::Acquire);
        if new_tail <= guard {
            return Ok(());
        }
        let mut min = u64::MAX;
        for i in 0..self.readers_hi() {
            let Some(s) = self.slot(i) else { break };
            // Acquire: a reader's attach (owner) comes with its position and beat.
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
}

impl Reader {
    /// This process now reads the slot with a poller: its unread records
    /// are guarded (with `Overflow::Refuse`) while the caller judges it
    /// responsive from `beat`, and posters wake it at (pid, nonce).
    pub fn attach(&self, pid: i32, nonce: u64, now: u64) {
        let slot = self.slot();
        // Relaxed: published by the Release store of owner.
        slot.beat.store(now, Ordering::Relaxed);
        slot.nonce.store(nonce, Ordering::Relaxed);
        slot.owner.store(pid, Ordering::Release);
        // AcqRel: posters that see the new bound see this slot's attach.
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::ring::fixtures::{fill, read, ring};
    use crate::shm::ring::{Next, Overflow};

    #[test]
    fn full_ring_refuses_while_a_responsive_reader_has_not_read() {
        let (_r, ring) = ring(1024, 3);
        assert_eq!(ring.overflow(), Overflow::Refuse, "refusing is the default");
        let slow = ring.reader(1).unwrap();
        slow.attach(4321, 1, 1000);
        let unattached = ring.reader(2).unwrap(); // no poller: never blocks
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
        assert_eq!(read(&unattached).1.missed, 1, "the unattached reader was lapped and told");
        // A reader judged unresponsive (hung or dead) is lapped and told.
        let res = fill(&ring, 40, &|pid, beat| !(pid == 4321 && beat == 1000));
        assert!(res.iter().all(|r| r.is_ok()));
        let (n, out, _) = read(&slow);
        assert_eq!(n, Next::Record);
        assert_eq!(out.missed + 2, out.seq, "every record after seq 1 and before this one was lost, and counted");
        // Released (the worker exited): never blocks.
        slow.release();
        let other = ring.reader(0).unwrap();
        other.attach(99, 2, 5);
        other.set_cursor(ring.head_seq());
        assert!(fill(&ring, 15, &|_, _| true).iter().all(|r| r.is_ok()), "the released reader did not block");
        let more = fill(&ring, 10, &|_, _| true);
        assert!(matches!(more.last(), Some(Err(PostError::Full { slot: 0, pid: 99, .. }))), "reader 0 now guards");
    }
}
