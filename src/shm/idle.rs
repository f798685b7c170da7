//! Which workers' pollers sleep, one bit per worker slot, so that a poster
//! wakes only those: in a burst nobody sleeps, and a post costs one load.
//! Lost wake-ups are impossible: the sleeper sets its bit then re-checks
//! for work, the poster publishes its record then reads the mask, and
//! SeqCst fences on both sides order the two pairs (Dekker's pattern).

use core::sync::atomic::{AtomicU64, Ordering, fence};

/// Slots that can be woken (two 64-bit masks); workers beyond this still
/// get every event, bounded by their poll interval.
pub const MAX_WAKE_SLOTS: usize = 128;

#[repr(C)]
pub struct IdleMask {
    pub bits: [AtomicU64; MAX_WAKE_SLOTS / 64],
    pub wakeups_sent: AtomicU64,
}

impl IdleMask {
    /// The poller is about to sleep. `pending` re-checks for work after the
    /// bit is visible, so a post racing with this call is never missed.
    pub fn set_idle(&self, slot: u32, pending: impl Fn() -> bool) -> bool {
        let Some(word) = self.bits.get(slot as usize / 64) else { return pending() };
        let bit = 1u64 << (slot % 64);
        // SeqCst + fence: pairs with the poster's fence (store head; load mask).
        word.fetch_or(bit, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if pending() {
            // Relaxed: we are awake; a spurious wake-up later costs one syscall.
            word.fetch_and(!bit, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// After a post: wake every idle slot, once.
    pub fn wake_idle(&self, signal: impl Fn(usize)) {
        // SeqCst fence: the published record is visible before the mask is read.
        fence(Ordering::SeqCst);
        for (w, word) in self.bits.iter().enumerate() {
            // Relaxed probe first: the common case in a burst is "nobody idle".
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            // AcqRel: exactly one poster takes each idle bit.
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                signal(slot);
                // Relaxed: a statistic.
                self.wakeups_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn idle_slots(&self) -> Vec<u32> {
        let mut out = vec![];
        for (w, word) in self.bits.iter().enumerate() {
            // Relaxed: a statistic.
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                out.push((w * 64) as u32 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn idle_slots_are_woken_once() {
        // SAFETY: atomics only; zero is "nobody idle".
        let m: IdleMask = unsafe { core::mem::zeroed() };
        assert!(!m.set_idle(3, || false));
        assert!(!m.set_idle(70, || false));
        assert_eq!(m.idle_slots(), vec![3, 70]);
        let woken = RefCell::new(vec![]);
        m.wake_idle(|s| woken.borrow_mut().push(s));
        m.wake_idle(|s| woken.borrow_mut().push(s));
        assert_eq!(*woken.borrow(), vec![3, 70]);
        assert_eq!(m.wakeups_sent.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn pending_work_keeps_the_poller_awake() {
        // SAFETY: as above.
        let m: IdleMask = unsafe { core::mem::zeroed() };
        assert!(m.set_idle(5, || true));
        assert!(m.idle_slots().is_empty());
        assert!(!m.set_idle(500, || false), "slots beyond the mask are never idle");
    }
}
