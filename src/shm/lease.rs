//! A lease in shared memory: which process runs a job on this node.
//!
//! The owner is one word — pid, an epoch bumped on every change of owner,
//! and the number of runs the owner has under way — changed only by
//! compare-and-swap. Because the run count lives in the same word as the
//! owner, a taker that judged "not busy" and a runner that starts a run
//! cannot both win: one CAS fails. The owner renews its expiry on every
//! tick; another process takes the lease over when the owner is dead, or,
//! while no run is under way, when the owner belongs to an older
//! configuration generation or stopped renewing. An owner of an older
//! generation stops starting runs and gives the lease up once its runs end.
//! So two runs never overlap, whatever process dies at whatever instruction
//! (a dead owner runs nothing). Takers serialize through the zone's lock so
//! that the generation and expiry they judge belong to the owner word they
//! replace.
//!
//! The PostgreSQL bridge's connection holder uses the same lease with its
//! own rules (`hold_locked`: no runs, everything under the lock).
//!
//! Every time here (`now_ms`, the expiry, the acquisition) is on one
//! monotonic clock shared by all processes of the host (CLOCK_MONOTONIC):
//! on the wall clock a step forward would make a healthy owner look hung
//! and start a second run beside its own.

use core::sync::atomic::{AtomicU64, Ordering};

use super::lock::ShmLock;

const BUSY_BITS: u64 = 16;
const EPOCH_BITS: u64 = 16;
const BUSY_MASK: u64 = (1 << BUSY_BITS) - 1;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;

/// A lease whose owner lives but has not renewed for this many lease
/// periods is taken over even with runs under way: its event loop is stuck.
pub const HUNG_LEASES: u64 = 4;

#[repr(C)]
pub struct Lease {
    /// pid << 32 | epoch << 16 | runs under way; pid 0: free.
    word: AtomicU64,
    /// Configuration generation of the owner.
    generation: AtomicU64,
    /// When the lease lapses unless renewed (monotonic ms).
    expires_ms: AtomicU64,
    /// When the current owner took the lease (monotonic ms).
    acquired_ms: AtomicU64,
    /// Times the lease changed owner, and times it was taken from a dead,
    /// old-generation or hung owner.
    owners: AtomicU64,
    takeovers: AtomicU64,
}

fn pid_of(w: u64) -> i32 {
    (w >> 32) as u32 as i32
}

fn busy_of(w: u64) -> u64 {
    w & BUSY_MASK
}

fn epoch_of(w: u64) -> u64 {
    (w >> BUSY_BITS) & EPOCH_MASK
}

fn word(pid: i32, epoch: u64, busy: u64) -> u64 {
    ((pid as u32 as u64) << 32) | ((epoch & EPOCH_MASK) << BUSY_BITS) | (busy & BUSY_MASK)
}

/// Who asks: a process of a configuration generation.
#[derive(Clone, Copy, Debug)]
pub struct Me {
    pub pid: i32,
    pub generation: u64,
    /// The node's newest generation (the lifecycle table's).
    pub current_generation: u64,
    /// The process is shutting down: it takes nothing and gives up what it holds.
    pub exiting: bool,
}

/// The outcome of a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We hold the lease (renewed): start runs.
    Owner,
    /// We took it now; `from` is the previous owner (0: it was free) and `why`.
    TookOver { from: i32, why: Why },
    /// We hold it but must stop starting runs (old generation or exiting);
    /// it is released when our last run ends.
    Retiring,
    /// Someone else holds it.
    Other { pid: i32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    Free,
    Dead,
    OldGeneration,
    Expired,
    Hung,
}

impl Why {
    pub fn name(self) -> &'static str {
        match self {
            Why::Free => "free",
            Why::Dead => "owner died",
            Why::OldGeneration => "owner belongs to an older generation",
            Why::Expired => "owner stopped renewing",
            Why::Hung => "owner hung with a run under way",
        }
    }
}

/// Copy of a lease, for status.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeaseView {
    pub pid: i32,
    pub runs_under_way: u64,
    pub generation: u64,
    pub expires_ms: u64,
    pub acquired_ms: u64,
    pub owners: u64,
    pub takeovers: u64,
}

impl Lease {
    pub fn view(&self) -> LeaseView {
        // Relaxed: a snapshot for status.
        let w = self.word.load(Ordering::Relaxed);
        LeaseView {
            pid: pid_of(w),
            runs_under_way: busy_of(w),
            generation: self.generation.load(Ordering::Relaxed),
            expires_ms: self.expires_ms.load(Ordering::Relaxed),
            acquired_ms: self.acquired_ms.load(Ordering::Relaxed),
            owners: self.owners.load(Ordering::Relaxed),
            takeovers: self.takeovers.load(Ordering::Relaxed),
        }
    }

    pub fn owner(&self) -> i32 {
        // Acquire: pairs with the owner CAS; a snapshot.
        pid_of(self.word.load(Ordering::Acquire))
    }

    /// Renews, takes over or leaves the lease; called on every tick by every
    /// process that could run the job. `alive(pid)` says whether a process
    /// may still run code (false only when it certainly cannot). `now_ms`
    /// is monotonic (see the module's comment).
    pub fn tick<L: ShmLock>(&self, lock: &L, me: Me, now_ms: u64, lease_ms: u64, alive: impl Fn(i32) -> bool) -> Role {
        // Acquire: we see the generation and expiry stored before the owner word.
        let w = self.word.load(Ordering::Acquire);
        if pid_of(w) == me.pid && w != 0 {
            if me.exiting || me.generation < me.current_generation {
                if busy_of(w) == 0 {
                    self.release(me.pid);
                    return Role::Other { pid: 0 };
                }
                self.expires_ms.store(now_ms + lease_ms, Ordering::Relaxed);
                return Role::Retiring;
            }
            // Relaxed: only the owner writes the expiry while it owns the lease;
            // a stale read by a taker is covered by the run count in the word.
            self.expires_ms.store(now_ms + lease_ms, Ordering::Relaxed);
            return Role::Owner;
        }
        if me.exiting || me.generation < me.current_generation {
            return Role::Other { pid: pid_of(w) };
        }
        let guard = lock.guard();
        let role = self.try_take(me, now_ms, lease_ms, &alive);
        drop(guard);
        role
    }

    fn try_take(&self, me: Me, now_ms: u64, lease_ms: u64, alive: &impl Fn(i32) -> bool) -> Role {
        // Acquire: re-read under the lock; takers serialize here.
        let w = self.word.load(Ordering::Acquire);
        let (pid, busy) = (pid_of(w), busy_of(w));
        // Relaxed: stored by the owner before (or, for the expiry, since) its
        // CAS, and takers read them under the lock that owner took.
        let generation = self.generation.load(Ordering::Relaxed);
        let expires = self.expires_ms.load(Ordering::Relaxed);
        let why = if pid == 0 {
            Why::Free
        } else if pid == me.pid {
            // Our own earlier ownership (same pid, e.g. a reused one): take it fresh.
            Why::Dead
        } else if !alive(pid) {
            Why::Dead
        } else if busy == 0 && generation < me.current_generation {
            Why::OldGeneration
        } else if busy == 0 && now_ms > expires {
            Why::Expired
        } else if now_ms > expires.saturating_add(lease_ms * HUNG_LEASES) {
            Why::Hung
        } else {
            return Role::Other { pid };
        };
        let new = word(me.pid, epoch_of(w) + 1, 0);
        // AcqRel: we see the previous owner's writes; our fields follow.
        if self.word.compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // The owner started or ended a run, or renewed and left: judge next tick.
            return Role::Other { pid: pid_of(self.word.load(Ordering::Relaxed)) };
        }
        // Relaxed: published to other takers by the lock, to status as a snapshot.
        self.generation.store(me.generation, Ordering::Relaxed);
        self.expires_ms.store(now_ms + lease_ms, Ordering::Relaxed);
        self.acquired_ms.store(now_ms, Ordering::Relaxed);
        self.owners.fetch_add(1, Ordering::Relaxed);
        if why != Why::Free {
            self.takeovers.fetch_add(1, Ordering::Relaxed);
        }
        Role::TookOver { from: pid, why }
    }

    /// The PostgreSQL bridge's lease (one connection holder per node), with
    /// its own rules; no runs (the run count stays 0), and `me.exiting` is
    /// not consulted (the bridge releases the lease when it stops). The
    /// holder renews, whatever its generation; a process of an older
    /// generation than the newest never takes the lease; one of the newest
    /// takes it at once from a holder of an older generation, an expired or
    /// a dead one, and the takeover is counted. The caller holds the zone's
    /// lock: holder and takers all serialize there.
    pub fn hold_locked(&self, me: Me, now_ms: u64, lease_ms: u64, alive: impl Fn(i32) -> bool) -> Role {
        // Acquire: we see the generation and expiry stored before the owner word.
        let w = self.word.load(Ordering::Acquire);
        if pid_of(w) == me.pid && w != 0 {
            // Relaxed: under the lock, which orders every reader of the expiry.
            self.expires_ms.store(now_ms + lease_ms, Ordering::Relaxed);
            return Role::Owner;
        }
        if me.generation < me.current_generation {
            // An old generation never takes the connection from the new one.
            return Role::Other { pid: pid_of(w) };
        }
        self.try_take(me, now_ms, lease_ms, &alive)
    }

    /// A run starts: true only if `pid` still owns the lease (then the run
    /// is counted until `end_run`).
    pub fn begin_run(&self, pid: i32) -> bool {
        // Relaxed first read: the CAS below decides.
        let mut w = self.word.load(Ordering::Relaxed);
        loop {
            if pid_of(w) != pid || w == 0 || busy_of(w) == BUSY_MASK {
                return false;
            }
            // AcqRel: a taker that replaces this word after us sees the run count.
            match self.word.compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(cur) => w = cur,
            }
        }
    }

    /// A run of `pid` ended (a no-op if the lease was taken from it meanwhile).
    pub fn end_run(&self, pid: i32) {
        // Relaxed first read: the CAS below decides.
        let mut w = self.word.load(Ordering::Relaxed);
        loop {
            if pid_of(w) != pid || busy_of(w) == 0 {
                return;
            }
            // Release: the run's writes precede the lower count a taker judges.
            match self.word.compare_exchange_weak(w, w - 1, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// Gives the lease up if `pid` holds it with no run under way.
    pub fn release(&self, pid: i32) -> bool {
        // Relaxed first read: the CAS decides.
        let w = self.word.load(Ordering::Relaxed);
        if pid_of(w) != pid || busy_of(w) != 0 || w == 0 {
            return false;
        }
        // Release: our runs' writes precede the lease being free.
        self.word.compare_exchange(w, word(0, epoch_of(w) + 1, 0), Ordering::Release, Ordering::Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;

    fn lease() -> Box<Lease> {
        // SAFETY: atomics only; all-zero is a free lease.
        unsafe { Box::new(core::mem::zeroed()) }
    }

    fn me(pid: i32, generation: u64) -> Me {
        Me { pid, generation, current_generation: generation, exiting: false }
    }

    #[test]
    fn first_taker_owns_and_renews() {
        let l = lease();
        assert_eq!(l.tick(&NoLock, me(10, 1), 0, 100, |_| true), Role::TookOver { from: 0, why: Why::Free });
        assert_eq!(l.tick(&NoLock, me(11, 1), 50, 100, |_| true), Role::Other { pid: 10 });
        assert_eq!(l.tick(&NoLock, me(10, 1), 90, 100, |_| true), Role::Owner);
        // Renewed at 90: still held at 150.
        assert_eq!(l.tick(&NoLock, me(11, 1), 150, 100, |_| true), Role::Other { pid: 10 });
        let v = l.view();
        assert_eq!((v.pid, v.generation, v.expires_ms, v.owners), (10, 1, 190, 1));
    }

    #[test]
    fn dead_owner_is_replaced_at_once_even_mid_run() {
        let l = lease();
        l.tick(&NoLock, me(10, 1), 0, 100, |_| true);
        assert!(l.begin_run(10));
        let r = l.tick(&NoLock, me(11, 1), 1, 100, |p| p != 10);
        assert_eq!(r, Role::TookOver { from: 10, why: Why::Dead });
        // The dead owner's leftovers change nothing.
        l.end_run(10);
        assert!(!l.begin_run(10));
        assert!(l.begin_run(11));
        assert_eq!(l.view().runs_under_way, 1);
        assert_eq!(l.view().takeovers, 1);
    }

    #[test]
    fn expired_owner_is_replaced_only_between_runs() {
        let l = lease();
        l.tick(&NoLock, me(10, 1), 0, 100, |_| true);
        assert!(l.begin_run(10));
        assert_eq!(l.tick(&NoLock, me(11, 1), 200, 100, |_| true), Role::Other { pid: 10 });
        l.end_run(10);
        assert_eq!(l.tick(&NoLock, me(11, 1), 201, 100, |_| true), Role::TookOver { from: 10, why: Why::Expired });
        // The old owner learns it on its next tick and can start nothing.
        assert_eq!(l.tick(&NoLock, me(10, 1), 202, 100, |_| true), Role::Other { pid: 11 });
        assert!(!l.begin_run(10));
    }

    #[test]
    fn hung_owner_is_replaced_after_several_leases() {
        let l = lease();
        l.tick(&NoLock, me(10, 1), 0, 100, |_| true);
        assert!(l.begin_run(10));
        assert_eq!(l.tick(&NoLock, me(11, 1), 500, 100, |_| true), Role::Other { pid: 10 });
        assert_eq!(l.tick(&NoLock, me(11, 1), 501, 100, |_| true), Role::TookOver { from: 10, why: Why::Hung });
    }

    #[test]
    fn reload_moves_the_lease_after_the_old_runs_end() {
        let l = lease();
        l.tick(&NoLock, me(10, 1), 0, 100, |_| true);
        assert!(l.begin_run(10));
        let old = Me { pid: 10, generation: 1, current_generation: 2, exiting: false };
        let new = me(20, 2);
        // The old owner keeps the lease while its run goes on, starting nothing new.
        assert_eq!(l.tick(&NoLock, old, 10, 100, |_| true), Role::Retiring);
        assert_eq!(l.tick(&NoLock, new, 10, 100, |_| true), Role::Other { pid: 10 });
        l.end_run(10);
        // Either side may move first: the new worker takes it, or the old one leaves it.
        assert_eq!(l.tick(&NoLock, new, 11, 100, |_| true), Role::TookOver { from: 10, why: Why::OldGeneration });
        assert_eq!(l.tick(&NoLock, old, 12, 100, |_| true), Role::Other { pid: 20 });
        // Old-generation processes never take it.
        assert_eq!(l.tick(&NoLock, old, 10_000, 100, |p| p != 20), Role::Other { pid: 20 });
    }

    /// The bridge's rules (`hold_locked`; PgBus::try_lease wraps it).
    #[test]
    fn bridge_lease_is_taken_from_dead_expired_or_old_generation() {
        let l = lease();
        let alive = |p: i32| p != 99;
        let at = |pid, generation, newest| Me { pid, generation, current_generation: newest, exiting: false };
        assert_eq!(l.hold_locked(at(10, 1, 1), 1000, 3000, alive), Role::TookOver { from: 0, why: Why::Free });
        assert_eq!(l.hold_locked(at(11, 1, 1), 1500, 3000, alive), Role::Other { pid: 10 });
        assert_eq!(l.hold_locked(at(10, 1, 1), 2000, 3000, alive), Role::Owner);
        // Expired.
        assert_eq!(l.hold_locked(at(11, 1, 1), 5001, 3000, alive), Role::TookOver { from: 10, why: Why::Expired });
        // Old generation cannot take it; new generation takes it at once.
        assert_eq!(l.hold_locked(at(12, 1, 2), 5002, 3000, alive), Role::Other { pid: 11 });
        assert_eq!(
            l.hold_locked(at(13, 2, 2), 5003, 3000, alive),
            Role::TookOver { from: 11, why: Why::OldGeneration }
        );
        // Dead holder.
        assert!(l.release(13));
        assert_eq!(l.hold_locked(at(99, 2, 2), 5004, 3000, alive), Role::TookOver { from: 0, why: Why::Free });
        assert_eq!(l.hold_locked(at(14, 2, 2), 5005, 3000, alive), Role::TookOver { from: 99, why: Why::Dead });
        // The holder renews even once a newer generation exists (until one of it takes over).
        assert_eq!(l.hold_locked(at(14, 2, 3), 5006, 3000, alive), Role::Owner);
        let v = l.view();
        assert_eq!((v.pid, v.generation, v.expires_ms, v.runs_under_way), (14, 2, 8006, 0));
        assert_eq!((v.owners, v.takeovers), (5, 3));
    }

    #[test]
    fn retiring_owner_releases_when_idle() {
        let l = lease();
        l.tick(&NoLock, me(10, 1), 0, 100, |_| true);
        let exiting = Me { exiting: true, ..me(10, 1) };
        assert_eq!(l.tick(&NoLock, exiting, 1, 100, |_| true), Role::Other { pid: 0 });
        assert_eq!(l.owner(), 0);
        assert_eq!(l.tick(&NoLock, me(11, 1), 2, 100, |_| true), Role::TookOver { from: 0, why: Why::Free });
    }
}
