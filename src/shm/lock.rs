//! Mutual exclusion between the writers of a shared structure.
//!
//! The core only needs `lock`/`unlock`; in nginx the glue implements them
//! with the slab pool's `ngx_shmtx_t`, which the master force-unlocks when it
//! reaps a holder that died. `PidLock` is the stand-in for tests and
//! benchmarks: one word in the shared region, and a waiter steals it from a
//! holder whose process no longer exists, as nginx's master would.

use core::sync::atomic::{AtomicI32, AtomicU32, Ordering, fence};

/// Held around a writer's critical section only; never across a wait.
/// Callers take a [`Guard`] (`let g = lock.guard();`), which unlocks when
/// dropped: an early return or a `?` inside a critical section cannot
/// leave the lock held. `lock`/`unlock` are what an implementation provides.
pub trait ShmLock {
    fn lock(&self);
    fn unlock(&self);

    /// Locks; the lock is released when the guard is dropped.
    fn guard(&self) -> Guard<'_, Self>
    where
        Self: Sized,
    {
        self.lock();
        Guard(self)
    }
}

/// A held [`ShmLock`]; dropping it unlocks.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct Guard<'a, L: ShmLock>(&'a L);

impl<L: ShmLock> Drop for Guard<'_, L> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

/// Failed acquisitions before a waiter asks whether the holder still lives.
const SPINS_BEFORE_CHECK: u32 = 1 << 12;
/// Busy spins before each `sched_yield`: short, as holders keep the lock
/// for well under a microsecond, and the holder may share our CPU.
const SPINS_BEFORE_YIELD: u32 = 64;

/// A lock word in shared memory: the holder's pid, 0 when free.
#[repr(C)]
pub struct PidLock {
    owner: AtomicI32,
    /// Times a waiter took the lock from a dead holder.
    steals: AtomicU32,
}

impl PidLock {
    /// The pid holding the lock, 0 if none.
    pub fn owner(&self) -> i32 {
        // Relaxed: a snapshot for status and tests.
        self.owner.load(Ordering::Relaxed)
    }

    pub fn steals(&self) -> u32 {
        // Relaxed: a statistic.
        self.steals.load(Ordering::Relaxed)
    }

    fn try_lock(&self, pid: i32) -> bool {
        // Acquire: what the previous holder wrote before unlocking is visible to us.
        self.owner.compare_exchange(0, pid, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    pub fn lock_as(&self, pid: i32) {
        let mut fails: u32 = 0;
        loop {
            // Relaxed probe: spin on a shared read, CAS only when it looks free.
            let owner = self.owner.load(Ordering::Relaxed);
            if owner == 0 && self.try_lock(pid) {
                return;
            }
            fails = fails.wrapping_add(1);
            if owner != 0 && fails.is_multiple_of(SPINS_BEFORE_CHECK) && !super::pid::alive(owner) {
                // AcqRel: one waiter wins the steal, and it sees the dead holder's writes.
                if self.owner.compare_exchange(owner, pid, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    // SeqCst fence: the dead holder's last stores are ordered before our
                    // repair reads, whatever the platform.
                    fence(Ordering::SeqCst);
                    // Relaxed: a statistic.
                    self.steals.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            if fails.is_multiple_of(SPINS_BEFORE_YIELD) {
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            } else {
                core::hint::spin_loop();
            }
        }
    }

    pub fn unlock_as(&self, pid: i32) {
        // Release: our writes are visible to the next holder. The CAS (not a
        // plain store) leaves alone a lock that was stolen from us meanwhile.
        let _ = self.owner.compare_exchange(pid, 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// A `PidLock` in a shared region, used by one process: the pid is taken
/// when the handle is made, so make the handle after `fork`.
#[derive(Clone, Copy)]
pub struct PidLockRef {
    lock: *const PidLock,
    pid: i32,
}

impl PidLockRef {
    /// # Safety
    /// `lock` points to a `PidLock` (zero-filled is free) in memory that
    /// stays mapped for the handle's lifetime.
    pub unsafe fn new(lock: *const PidLock) -> PidLockRef {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        PidLockRef { lock, pid }
    }

    pub fn get(&self) -> &PidLock {
        // SAFETY: `new`'s contract: the lock stays mapped; all its fields are atomics.
        unsafe { &*self.lock }
    }
}

impl ShmLock for PidLockRef {
    fn lock(&self) {
        self.get().lock_as(self.pid);
    }

    fn unlock(&self) {
        self.get().unlock_as(self.pid);
    }
}

/// For single-process tests: no exclusion at all.
pub struct NoLock;

impl ShmLock for NoLock {
    fn lock(&self) {}
    fn unlock(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_unlock_and_steal_from_dead_pid() {
        let l = PidLock { owner: AtomicI32::new(0), steals: AtomicU32::new(0) };
        l.lock_as(10);
        assert_eq!(l.owner(), 10);
        l.unlock_as(11);
        assert_eq!(l.owner(), 10, "only the holder unlocks");
        l.unlock_as(10);
        assert_eq!(l.owner(), 0);

        // A pid beyond pid_max never exists: the waiter takes over.
        l.lock_as(i32::MAX);
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        l.lock_as(me);
        assert_eq!((l.owner(), l.steals()), (me, 1));
        l.unlock_as(me);
    }
}
