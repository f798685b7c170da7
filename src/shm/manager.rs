//! resty.worker.manager's policy over the lifecycle table: which workers
//! it counts (n_prev, n_mine, n_next), the flags a worker sets on its own
//! record when the manager saw it start or leave, the node-wide manager
//! lock, and the once-per-generation "master start" / "master exit"
//! callbacks, each taken by one caller. The table itself (records, transitions, crash and hang
//! findings) is lifecycle.rs; the fields used here live in its layout.

use core::sync::atomic::Ordering;

use super::lifecycle::{Lifecycle, MAX_GENERATIONS, WorkerState};

/// The worker's start was seen by resty.worker.manager (it counts in n_mine).
pub const FLAG_MANAGED: u32 = 1;
/// The worker ran its manager exit: it no longer counts anywhere, although
/// the process lives on (draining requests) until exit_process.
pub const FLAG_LEFT: u32 = 2;

/// GenRecord::manager: the generation's "master start" callback was taken (by exactly one caller).
pub const GEN_MASTER_STARTED: u32 = 1;
/// GenRecord::manager: the generation's "master exit" callback was taken (by exactly one caller).
pub const GEN_MASTER_EXITED: u32 = 2;

impl Lifecycle {
    /// Sets FLAG_* bits on this worker's own record.
    pub fn set_flags(&self, index: usize, pid: i32, bits: u32) {
        let Some(rec) = self.records().get(index) else { return };
        if rec.pid.load(Ordering::Relaxed) == pid {
            // Relaxed: read by the counts under the manager lock, whose
            // Release/Acquire pair orders it for the next holder.
            rec.flags.fetch_or(bits, Ordering::Relaxed);
        }
    }

    /// Takes the manager lock for `pid`; a lock whose owner is gone is taken
    /// over. Not reentrant: a process that holds it gets false, so two light
    /// threads of one worker exclude each other too.
    pub fn try_lock(&self, pid: i32, alive: impl Fn(i32) -> bool) -> bool {
        // Acquire on success: what the previous holder wrote is visible.
        match self.manager_lock.compare_exchange(0, pid, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => true,
            Err(owner) if owner != pid && !alive(owner) => {
                // Acquire: as above; one waiter wins the takeover.
                self.manager_lock.compare_exchange(owner, pid, Ordering::Acquire, Ordering::Relaxed).is_ok()
            }
            Err(_) => false,
        }
    }

    pub fn unlock(&self, pid: i32) {
        // Release: the holder's writes are visible to the next holder. The
        // CAS leaves alone a lock that was taken over meanwhile.
        let _ = self.manager_lock.compare_exchange(pid, 0, Ordering::Release, Ordering::Relaxed);
    }

    /// The pid holding the manager lock, 0 if none.
    pub fn lock_owner(&self) -> i32 {
        // Relaxed: a snapshot for diagnostics.
        self.manager_lock.load(Ordering::Relaxed)
    }

    /// GEN_* bits of `generation`, None when it is not (or no longer) in the table.
    pub fn gen_flags(&self, generation: u64) -> Option<u32> {
        let rec = &self.gens[(generation as usize) % MAX_GENERATIONS];
        // Acquire: pairs with the Release in begin_generation (the bits were reset before).
        if generation == 0 || rec.generation.load(Ordering::Acquire) != generation {
            return None;
        }
        // Acquire: pairs with the AcqRel of take_once.
        Some(rec.manager.load(Ordering::Acquire))
    }

    /// True for exactly one caller per generation and bit.
    pub fn take_once(&self, generation: u64, bit: u32) -> bool {
        let rec = &self.gens[(generation as usize) % MAX_GENERATIONS];
        // Acquire: pairs with the Release in begin_generation.
        if generation == 0 || rec.generation.load(Ordering::Acquire) != generation {
            return false;
        }
        // AcqRel: the one caller that sets the bit wins, and sees earlier takes.
        rec.manager.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// True for exactly one caller per generation: it runs "master start".
    pub fn take_master_start(&self, generation: u64) -> bool {
        if !self.take_once(generation, GEN_MASTER_STARTED) {
            return false;
        }
        // AcqRel: a newest-taken watermark, for diagnostics.
        self.master_started.fetch_max(generation, Ordering::AcqRel);
        true
    }

    /// True for exactly one caller per generation: it runs "master exit".
    pub fn take_master_exit(&self, generation: u64) -> bool {
        self.take_once(generation, GEN_MASTER_EXITED)
    }

    /// Workers of `generation` the manager saw start and that have neither
    /// left nor died, plus, when `failed_ms` > 0, those that died less than
    /// `failed_ms` ago (as in the original, which only noticed a crash once
    /// its heartbeat expired: a respawned worker sees n_mine above the
    /// worker count). A live record whose pid is gone counts as a crash of now.
    pub fn managed_count(&self, generation: u64, now_ms: u64, failed_ms: u64, alive: impl Fn(i32) -> bool) -> u32 {
        let mut n = 0;
        for rec in self.records() {
            // Acquire: pairs with the Release that published the record.
            let st = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            // Relaxed: fields of a published record; counts are taken under the manager lock.
            let flags = rec.flags.load(Ordering::Relaxed);
            if rec.generation.load(Ordering::Relaxed) != generation
                || flags & FLAG_MANAGED == 0
                || flags & FLAG_LEFT != 0
            {
                continue;
            }
            let counts = if st.is_live() {
                alive(rec.pid.load(Ordering::Relaxed)) || failed_ms > 0
            } else {
                st == WorkerState::Crashed
                    && failed_ms > 0
                    && now_ms.saturating_sub(rec.ended_ms.load(Ordering::Relaxed)) < failed_ms
            };
            n += u32::from(counts);
        }
        n
    }

    /// Workers running in generations that `include` selects: live in the
    /// table, pid alive, and not gone through their manager exit (the
    /// privileged agent is no worker).
    fn running_where(&self, include: impl Fn(u64) -> bool, alive: impl Fn(i32) -> bool) -> u32 {
        let mut n = 0;
        for rec in self.records() {
            // Acquire: pairs with the Release that published the record.
            let st = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            // Relaxed: fields of a published record.
            if st.is_live()
                && rec.slot.load(Ordering::Relaxed) != super::lifecycle::AGENT_SLOT
                && include(rec.generation.load(Ordering::Relaxed))
                && rec.flags.load(Ordering::Relaxed) & FLAG_LEFT == 0
                && alive(rec.pid.load(Ordering::Relaxed))
            {
                n += 1;
            }
        }
        n
    }

    /// (n_prev, n_mine, n_next) as resty.worker.manager's callbacks get
    /// them. n_prev: workers still running from older generations, None in
    /// the node's first generation (a fresh start). n_next: workers running
    /// in newer generations, None while `generation` is the newest.
    pub fn manager_counts(
        &self,
        generation: u64,
        now_ms: u64,
        failed_ms: u64,
        alive: impl Fn(i32) -> bool + Copy,
    ) -> (Option<u32>, u32, Option<u32>) {
        let prev = (generation > 1).then(|| self.running_where(|g| g < generation, alive));
        let next = (self.current_generation() > generation).then(|| self.running_where(|g| g > generation, alive));
        (prev, self.managed_count(generation, now_ms, failed_ms, alive), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lifecycle::pid_alive;
    use crate::shm::lifecycle::tests::{alive, table};
    use crate::shm::testing::{Shm, fork, wait};

    /// A Lifecycle and, after it, a plain counter in one MAP_SHARED mapping, for forked children.
    fn shared_table() -> (Shm, usize) {
        let counter_off = core::mem::size_of::<Lifecycle>().next_multiple_of(8);
        (Shm::new(counter_off + 8), counter_off)
    }

    #[test]
    fn manager_counts_see_starts_crashes_and_neighbours() {
        let t = table();
        let g1 = t.begin_generation(1, 2, 0);
        let a = t.register_worker(g1, 0, 10, 0, alive, |_| {}).unwrap();
        t.register_worker(g1, 1, 11, 0, alive, |_| {}).unwrap();
        assert_eq!(t.manager_counts(g1, 0, 5000, alive), (None, 0, None), "first generation: no n_prev");
        t.set_flags(a, 10, FLAG_MANAGED);
        t.set_flags(a, 99, FLAG_MANAGED); // not its record: ignored
        assert_eq!(t.manager_counts(g1, 0, 5000, alive), (None, 1, None));
        let b = t.register_worker(g1, 1, 12, 0, |p| p != 11, |_| {}).unwrap();
        t.set_flags(b, 12, FLAG_MANAGED);
        // 11 was never managed: the respawn counts 2, not 3.
        assert_eq!(t.manager_counts(g1, 100, 5000, alive).1, 2);
        let g2 = t.begin_generation(1, 2, 200);
        assert_eq!(t.manager_counts(g1, 200, 5000, alive), (None, 2, Some(0)));
        assert_eq!(t.manager_counts(g2, 200, 5000, alive), (Some(2), 0, None));
        let c = t.register_worker(g2, 0, 20, 300, alive, |_| {}).unwrap();
        t.set_flags(c, 20, FLAG_MANAGED);
        assert_eq!(t.manager_counts(g1, 300, 5000, alive), (None, 2, Some(1)));
        // An old worker runs its manager exit: it counts nowhere from then on.
        t.set_flags(a, 10, FLAG_LEFT);
        assert_eq!(t.manager_counts(g1, 300, 5000, alive), (None, 1, Some(1)));
        assert_eq!(t.manager_counts(g2, 300, 5000, alive), (Some(1), 1, None));
        assert_eq!(t.live_count(g1), 2, "the module's own view: the process still runs");
    }

    #[test]
    fn crashed_managed_worker_counts_until_failed_expires() {
        let t = table();
        let g = t.begin_generation(1, 1, 0);
        let a = t.register_worker(g, 0, 10, 0, alive, |_| {}).unwrap();
        t.set_flags(a, 10, FLAG_MANAGED);
        let b = t.register_worker(g, 0, 11, 1000, |p| p != 10, |_| {}).unwrap();
        t.set_flags(b, 11, FLAG_MANAGED);
        assert_eq!(t.managed_count(g, 1000, 5000, alive), 2, "a respawn sees n_mine above the worker count");
        assert_eq!(t.managed_count(g, 7000, 5000, alive), 1);
        assert_eq!(t.managed_count(g, 1000, 0, alive), 1, "without `failed`, only the living count");
    }

    #[test]
    fn dead_pid_not_yet_judged_counts_as_crashed_now() {
        let t = table();
        let g = t.begin_generation(1, 2, 0);
        for (slot, pid) in [(0, 10), (1, 11)] {
            let i = t.register_worker(g, slot, pid, 0, alive, |_| {}).unwrap();
            t.set_flags(i, pid, FLAG_MANAGED);
        }
        let g2 = t.begin_generation(1, 2, 0);
        // 11 was killed; no heartbeat or respawn has marked it yet.
        let dead = |p: i32| p != 11;
        assert_eq!(t.managed_count(g, 0, 5000, dead), 2, "a start still sees it (within `failed`)");
        assert_eq!(t.managed_count(g, 0, 0, dead), 1, "an exit does not: the last worker is the last");
        assert_eq!(t.manager_counts(g2, 0, 5000, dead).0, Some(1));
    }

    #[test]
    fn manager_lock_excludes_everyone_else_and_is_taken_from_the_dead() {
        let t = table();
        assert!(t.try_lock(10, alive));
        assert!(!t.try_lock(10, alive), "not reentrant: a second light thread of 10 waits");
        assert!(!t.try_lock(11, alive));
        assert!(t.try_lock(11, |p| p != 10), "a dead owner's lock is taken over");
        assert_eq!(t.lock_owner(), 11);
        t.unlock(10);
        assert!(!t.try_lock(12, alive), "only the owner unlocks");
        t.unlock(11);
        assert!(t.try_lock(12, alive));
    }

    #[test]
    fn master_start_and_exit_are_taken_once_per_generation() {
        let t = table();
        assert!(!t.take_master_start(1), "a generation not in the table cannot be taken");
        for _ in 0..3 {
            t.begin_generation(1, 1, 0);
        }
        assert!(t.take_master_start(3));
        assert!(!t.take_master_start(3));
        // A quick double reload: generation 2's take still works after 3's.
        assert!(t.take_master_start(2));
        assert_eq!(t.master_started.load(Ordering::Relaxed), 3);
        assert_eq!(t.gen_flags(2), Some(GEN_MASTER_STARTED));
        assert!(t.take_master_exit(2));
        assert!(!t.take_master_exit(2));
        assert_eq!(t.gen_flags(2), Some(GEN_MASTER_STARTED | GEN_MASTER_EXITED));
        assert_eq!(t.gen_flags(1), Some(0));
        assert_eq!(t.gen_flags(4), None);
        // The record is reused MAX_GENERATIONS loads later, with its bits cleared.
        for _ in 0..MAX_GENERATIONS {
            t.begin_generation(1, 1, 0);
        }
        assert_eq!(t.gen_flags(2 + MAX_GENERATIONS as u64), Some(0));
        assert_eq!(t.gen_flags(2), None);
    }

    #[test]
    fn manager_lock_serializes_processes_and_survives_a_holder_dying() {
        const CHILDREN: usize = 4;
        const ROUNDS: u64 = 300;
        let (shm, counter_off) = shared_table();
        // The mapping is zero-filled (a valid, empty table) and page-aligned.
        let table = || shm.at::<Lifecycle>(0);
        // A word guarded by the manager lock only: plain loads and stores.
        let counter = shm.ptr.wrapping_add(counter_off) as usize;
        let pids: Vec<i32> = (0..CHILDREN)
            .map(|_| {
                let t = table();
                fork(move || {
                    // SAFETY: getpid has no preconditions.
                    let me = unsafe { libc::getpid() };
                    for _ in 0..ROUNDS {
                        while !t.try_lock(me, pid_alive) {
                            // SAFETY: sched_yield has no preconditions.
                            unsafe { libc::sched_yield() };
                        }
                        let c = counter as *mut u64;
                        // SAFETY: the word is in the mapping; the lock makes us its only user.
                        unsafe {
                            let v = c.read_volatile();
                            libc::sched_yield(); // widen the window a second holder would race in
                            c.write_volatile(v + 1);
                        }
                        t.unlock(me);
                    }
                    0
                })
            })
            .collect();
        for pid in pids {
            assert_eq!(wait(pid), 0);
        }
        // SAFETY: every child has exited; the parent is the word's only user.
        assert_eq!(
            unsafe { *(counter as *const u64) },
            CHILDREN as u64 * ROUNDS,
            "an increment was lost: two holders at once"
        );

        // A holder killed while holding the lock: once reaped (as nginx's
        // master reaps its workers), the next caller takes the lock over.
        let t = table();
        let holder = fork(|| {
            // SAFETY: getpid has no preconditions.
            let me = unsafe { libc::getpid() };
            if t.try_lock(me, pid_alive) { 0 } else { 1 }
        });
        assert_eq!(wait(holder), 0);
        assert_eq!(t.lock_owner(), holder, "the dead holder never unlocked");
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        assert!(t.try_lock(me, pid_alive), "taken over from the dead holder");
        assert_eq!(t.lock_owner(), me);
        t.unlock(me);
        assert_eq!(t.lock_owner(), 0);
    }
}
