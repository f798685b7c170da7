//! The sync store and the runner lease across real processes: forked
//! children over one `MAP_SHARED` mapping contend for a lease while the
//! parent kills owners with SIGKILL and "reloads" (a new generation), and
//! readers copy updates while a writer publishes them.

mod support;

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use support::{Shm, fork, mono_ms, my_pid, serial, wait, wait_until, yield_cpu};
use workerbus::shm::lease::{Lease, Me, Role};
use workerbus::shm::lifecycle::pid_alive;
use workerbus::shm::lock::{PidLock, PidLockRef};
use workerbus::shm::sync::{Slab, SyncTable};

const LOCK: usize = 0;
const FLAGS: usize = 64;
const LEASE: usize = 512;
const TABLE: usize = 4096;

fn lock(shm: &Shm) -> PidLockRef {
    // SAFETY: the lock word lives in the mapping, which outlives the handle.
    unsafe { PidLockRef::new(shm.at::<PidLock>(LOCK)) }
}

fn flag<T>(shm: &Shm, i: usize) -> &T {
    shm.at(FLAGS + i * 8)
}

// Flag words (8 bytes each).
const STOP: usize = 0; // AtomicU32: 1 = every child stops; 2 = generation-1 children stop
const CURRENT_GEN: usize = 1; // AtomicU64
const IN_RUN: usize = 2; // AtomicI32: pid of the process inside a run, 0 none
const OVERLAPS: usize = 3; // AtomicU64
const RUNS: usize = 4; // AtomicU64
const GEN2_RUNS: usize = 5; // AtomicU64

/// A contender: ticks the lease every millisecond; as the owner it runs
/// "jobs" of ~2 ms, each checked against every other run.
fn contender(shm: &Shm, generation: u64) -> i32 {
    let lease: &Lease = shm.at(LEASE);
    let lk = lock(shm);
    let pid = my_pid();
    loop {
        let stop = flag::<AtomicU32>(shm, STOP).load(Ordering::Acquire);
        let exiting = stop == 1 || (stop == 2 && generation == 1);
        let me = Me {
            pid,
            generation,
            current_generation: flag::<AtomicU64>(shm, CURRENT_GEN).load(Ordering::Acquire),
            exiting,
        };
        // The lease's clock, as in the module: monotonic (a wall-clock step
        // during the test would otherwise fake a hung owner and an overlap).
        let role = lease.tick(&lk, me, mono_ms(), 50, pid_alive);
        if exiting && !matches!(role, Role::Retiring) {
            return 0;
        }
        if matches!(role, Role::Owner | Role::TookOver { .. }) && lease.begin_run(pid) {
            let in_run: &AtomicI32 = flag(shm, IN_RUN);
            // A run of a killed process ended when it died; a live one must not exist.
            let mut cur = in_run.load(Ordering::Acquire);
            loop {
                if cur != 0 && pid_alive(cur) {
                    flag::<AtomicU64>(shm, OVERLAPS).fetch_add(1, Ordering::Relaxed);
                    break;
                }
                match in_run.compare_exchange(cur, pid, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(c) => cur = c,
                }
            }
            std::thread::sleep(Duration::from_millis(2));
            let _ = in_run.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed);
            flag::<AtomicU64>(shm, RUNS).fetch_add(1, Ordering::Relaxed);
            if generation == 2 {
                flag::<AtomicU64>(shm, GEN2_RUNS).fetch_add(1, Ordering::Relaxed);
            }
            lease.end_run(pid);
        }
        std::thread::sleep(Duration::from_millis(1));
        yield_cpu();
    }
}

#[test]
fn one_runner_across_sigkill_and_reload() {
    let _s = serial();
    let shm = Shm::new(1 << 16);
    flag::<AtomicU64>(&shm, CURRENT_GEN).store(1, Ordering::Release);
    let lease: &Lease = shm.at(LEASE);
    let spawn = |g: u64| {
        let shm = &shm;
        fork(move || contender(shm, g))
    };
    let mut gen1: Vec<i32> = (0..4).map(|_| spawn(1)).collect();
    let runs = |shm: &Shm| flag::<AtomicU64>(shm, RUNS).load(Ordering::Relaxed);

    // Kill the owner five times; someone else must take over each time.
    for _ in 0..5 {
        let before = runs(&shm);
        assert!(wait_until(Duration::from_secs(10), || runs(&shm) > before + 5), "runs go on");
        let owner = lease.owner();
        assert!(gen1.contains(&owner), "owner {owner} is a contender");
        // SAFETY: kill has no memory preconditions; owner is our child.
        unsafe { libc::kill(owner, libc::SIGKILL) };
        assert_eq!(wait(owner), 128 + libc::SIGKILL);
        gen1.retain(|&p| p != owner);
        gen1.push(spawn(1));
        assert!(wait_until(Duration::from_secs(10), || lease.owner() != owner && lease.owner() != 0));
    }
    // Reload: generation 2 starts; the lease moves there between runs.
    flag::<AtomicU64>(&shm, CURRENT_GEN).store(2, Ordering::Release);
    let gen2: Vec<i32> = (0..4).map(|_| spawn(2)).collect();
    assert!(wait_until(Duration::from_secs(10), || gen2.contains(&lease.owner())), "the lease moved to generation 2");
    assert!(wait_until(Duration::from_secs(10), || flag::<AtomicU64>(&shm, GEN2_RUNS).load(Ordering::Relaxed) > 5));
    flag::<AtomicU32>(&shm, STOP).store(2, Ordering::Release);
    for p in gen1 {
        assert_eq!(wait(p), 0);
    }
    flag::<AtomicU32>(&shm, STOP).store(1, Ordering::Release);
    for p in gen2 {
        assert_eq!(wait(p), 0);
    }
    assert_eq!(flag::<AtomicU64>(&shm, OVERLAPS).load(Ordering::Relaxed), 0, "two runs at once");
    let v = lease.view();
    assert!(v.takeovers >= 6, "5 kills and a reload were taken over: {v:?}");
}

/// A slab of fixed slots in the mapping (enough for the test's sizes).
struct SlotSlab<'a> {
    shm: &'a Shm,
    base: usize,
    slots: usize,
    slot_len: usize,
    used_at: usize,
}

impl Slab for SlotSlab<'_> {
    fn alloc(&self, len: usize) -> Option<u64> {
        if len > self.slot_len {
            return None;
        }
        for i in 0..self.slots {
            let used: &AtomicU32 = self.shm.at(self.used_at + i * 4);
            // Relaxed: called under the lock.
            if used.load(Ordering::Relaxed) == 0 {
                used.store(1, Ordering::Relaxed);
                return Some((self.base - TABLE + i * self.slot_len) as u64);
            }
        }
        None
    }
    fn free(&self, off: u64) {
        let i = (off as usize + TABLE - self.base) / self.slot_len;
        let used: &AtomicU32 = self.shm.at(self.used_at + i * 4);
        assert_eq!(used.swap(0, Ordering::Relaxed), 1, "double free of slot {i}");
    }
    fn free_bytes(&self) -> usize {
        0
    }
    fn at(&self, off: u64) -> *mut u8 {
        // Offsets are from the table, as in a zone they are from its header.
        self.shm.ptr.wrapping_add(TABLE + off as usize)
    }
}

fn fill(version: u64) -> Vec<u8> {
    vec![(version % 251) as u8; 100 + (version as usize * 37) % 9000]
}

#[test]
fn readers_never_see_the_data_of_one_update_with_the_version_of_another() {
    let _s = serial();
    let table_len = SyncTable::region_size().next_multiple_of(4096);
    let slot_len = 16384;
    let slots = 8;
    let used_at = FLAGS + 256;
    let shm = Shm::new(TABLE + table_len + slots * slot_len);
    let slab = || SlotSlab { shm: &shm, base: TABLE + table_len, slots, slot_len, used_at };
    // SAFETY: zero-filled, page-aligned region of table size in the mapping.
    let table = unsafe { SyncTable::at(shm.ptr.add(TABLE)) };
    let task = table.task(&lock(&shm), 0, b"t").unwrap();
    const UPDATES: u64 = 1000;
    let readers: Vec<i32> = (0..3)
        .map(|_| {
            let shm = &shm;
            fork(move || {
                let lk = lock(shm);
                let s = slab();
                let (mut seen, mut last) = (0u64, 0u64);
                while last < UPDATES {
                    let ok = table.read(&lk, &s, task, |h, v, d| {
                        let version: u64 = std::str::from_utf8(v).unwrap().parse().unwrap();
                        (version, d == fill(version).as_slice() && h.seq == version)
                    });
                    match ok {
                        Some((version, true)) => {
                            if version != last {
                                seen += 1;
                                last = version;
                            }
                        }
                        Some((_, false)) => return 2,
                        None => yield_cpu(),
                    }
                }
                if seen < 2 { 3 } else { 0 }
            })
        })
        .collect();
    let lk = lock(&shm);
    let s = slab();
    for v in 1..=UPDATES {
        let seq = table.publish(&lk, &s, task, my_pid(), pid_alive, 1, v.to_string().as_bytes(), 1, &fill(v), v);
        assert_eq!(seq, Ok(v as u32));
        if v % 50 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for r in readers {
        assert_eq!(wait(r), 0, "a reader saw a torn update (2) or too few (3)");
    }
    // One block in use: the newest.
    let used = (0..slots).filter(|i| shm.at::<AtomicU32>(used_at + i * 4).load(Ordering::Relaxed) == 1).count();
    assert_eq!(used, 1);
}
