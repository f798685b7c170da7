//! The idle/wake flags: a poller about to sleep sets its slot's idle flag
//! (and re-checks for records), a poster clears the flags it finds set and
//! signals those readers at the address they attached with; a fence on each side
//! (Dekker) makes one of the two see the other.

use core::sync::atomic::{Ordering, fence};

use super::{Reader, Ring};

impl Ring {
    /// After a post: signals every idle reader once (`signal(slot, owner
    /// pid, nonce)`: the address its owner registered with `attach`).
    pub fn wake_idle(&self, signal: impl FnMut(usize, i32, u64)) {
        self.wake_idle_except(|_| false, signal)
    }

    /// `wake_idle`, leaving reader `skip`'s flag alone: a worker's own
    /// reader, whose poller it wakes itself when it posts (Reader::take_idle).
    pub fn wake_idle_except(&self, skip: impl Fn(usize) -> bool, mut signal: impl FnMut(usize, i32, u64)) {
        // SeqCst fence: the published head is ordered before the idle flags
        // are read; pairs with the fence in Reader::set_idle (Dekker).
        fence(Ordering::SeqCst);
        for i in 0..self.readers_hi() {
            let Some(s) = self.slot(i) else { break };
            if skip(i) {
                continue;
            }
            // Relaxed probe: in a burst nobody is idle, and this costs no write.
            if s.idle.load(Ordering::Relaxed) != 0 && s.idle.swap(0, Ordering::AcqRel) != 0 {
                // Acquire: the attach that set these came before the idle flag.
                signal(i, s.owner.load(Ordering::Acquire), s.nonce.load(Ordering::Relaxed));
                // Relaxed: statistics.
                s.wakeups.fetch_add(1, Ordering::Relaxed);
                self.w().wakeups.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Reader {
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

    /// A post by this reader's own process: clears the idle flag and
    /// returns true when it was set, the caller then waking its own poller
    /// directly (no datagram: wake-ups sent by posters are not counted,
    /// the reader's `wakeups` is). Same process as the poller that set the
    /// flag, so program order suffices between the two; another process's
    /// poster may take the flag first (swap: one of them does), and then
    /// sends the datagram itself.
    pub fn take_idle(&self) -> bool {
        let slot = self.slot();
        // Relaxed probe: in a burst the flag is clear after the first post, and this costs no write.
        if slot.idle.load(Ordering::Relaxed) == 0 || slot.idle.swap(0, Ordering::AcqRel) == 0 {
            return false;
        }
        // Relaxed: statistics.
        slot.wakeups.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use crate::shm::lock::NoLock;
    use crate::shm::ring::fixtures::{rec, ring};

    #[test]
    fn idle_flag_and_wakeups() {
        let (_r, ring) = ring(4096, 3);
        let rd = ring.reader(2).unwrap();
        assert!(rd.set_idle(true));
        let mut woken = vec![];
        ring.post(&NoLock, &rec(b"e", b"")).unwrap();
        rd.attach(4242, 77, 0);
        ring.wake_idle(|s, pid, nonce| woken.push((s, pid, nonce)));
        ring.wake_idle(|s, pid, nonce| woken.push((s, pid, nonce)));
        assert_eq!(woken, vec![(2, 4242, 77)], "the address the owner attached with");
        assert!(!rd.set_idle(true), "a pending record keeps the reader awake");
        assert_eq!((rd.stats().wakeups, rd.stats().idle, ring.stats().wakeups), (1, false, 1));
        assert!(ring.reader(3).is_none());
    }

    #[test]
    fn own_reader_is_taken_not_signalled() {
        let (_r, ring) = ring(4096, 3);
        let (own, other) = (ring.reader(1).unwrap(), ring.reader(2).unwrap());
        own.attach(10, 1, 0);
        other.attach(20, 2, 0);
        assert!(own.set_idle(true) && other.set_idle(true));
        ring.post(&NoLock, &rec(b"e", b"")).unwrap();
        let mut woken = vec![];
        ring.wake_idle_except(|i| i == 1, |s, pid, _| woken.push((s, pid)));
        assert_eq!(woken, vec![(2, 20)], "only the other reader gets a datagram");
        assert!(own.stats().idle, "the skipped reader keeps its flag");
        assert!(own.take_idle(), "the poster wakes its own idle poller");
        assert!(!own.take_idle(), "once");
        assert!(!own.stats().idle);
        assert_eq!((own.stats().wakeups, other.stats().wakeups, ring.stats().wakeups), (1, 1, 1));
    }
}
