//! The PostgreSQL bridge's shared state across real processes: posts queued
//! by several producer processes reach the consumer each once and in each
//! producer's order; the lease moves to another process when its holder is
//! killed with SIGKILL, and never has two holders.

mod support;

use core::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::{Shm, fork, mono_ms, my_pid, serial, wait, wait_until};
use workerbus::shm::lifecycle::pid_alive;
use workerbus::shm::lock::{PidLock, PidLockRef};
use workerbus::shm::pgbus::{Lease, PgBus};

const LOCK: usize = 0;
const WORDS: usize = 64;
const BUS: usize = 4096;
const QUEUE: usize = 64 << 10;

fn lock(shm: &Shm) -> PidLockRef {
    // SAFETY: the lock word lives in the mapping for the test's duration.
    unsafe { PidLockRef::new(shm.at::<PidLock>(LOCK)) }
}

fn word(shm: &Shm, i: usize) -> &AtomicU64 {
    shm.at::<AtomicU64>(WORDS + i * 8)
}

fn bus(shm: &Shm) -> &PgBus {
    // SAFETY: the region at BUS was made by PgBus::init in the parent before forking.
    unsafe { PgBus::attach(shm.ptr.add(BUS), PgBus::region_size(QUEUE)) }.unwrap()
}

fn setup() -> Shm {
    let shm = Shm::new(BUS + PgBus::region_size(QUEUE));
    // SAFETY: a zeroed, page-aligned part of the fresh mapping.
    unsafe { PgBus::init(shm.ptr.add(BUS), PgBus::region_size(QUEUE)) }.unwrap();
    shm
}

#[test]
fn posts_from_several_processes_arrive_once_in_each_producers_order() {
    let _g = serial();
    let shm = setup();
    const PRODUCERS: u64 = 3;
    const EACH: u64 = 3000;
    let mut kids = vec![];
    for w in 0..PRODUCERS {
        let shm = &shm;
        kids.push(fork(move || {
            let (b, l) = (bus(shm), lock(shm));
            for i in 0..EACH {
                let payload = format!("{w}:{i}:{}", "x".repeat((i % 200) as usize));
                while b.push(&l, b"ch", payload.as_bytes()).is_err() {
                    support::yield_cpu();
                }
            }
            0
        }));
    }
    let consumer = {
        let shm = &shm;
        fork(move || {
            let (b, l) = (bus(shm), lock(shm));
            let mut next = [0u64; PRODUCERS as usize];
            let mut total = 0;
            while total < PRODUCERS * EACH {
                let (posts, bytes) = b.peek(&l, 100, 1 << 20);
                for p in &posts {
                    let s = String::from_utf8_lossy(&p.payload);
                    let mut it = s.split(':');
                    let w: usize = it.next().and_then(|x| x.parse().ok()).unwrap_or(99);
                    let i: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(u64::MAX);
                    if w >= PRODUCERS as usize || i != next[w] {
                        return 1; // out of order, lost or duplicated
                    }
                    next[w] += 1;
                }
                total += posts.len() as u64;
                b.consume(&l, posts.len() as u64, bytes);
                if posts.is_empty() {
                    support::yield_cpu();
                }
            }
            word(shm, 0).store(total, Ordering::Relaxed);
            0
        })
    };
    for k in kids {
        assert_eq!(wait(k), 0);
    }
    assert_eq!(wait(consumer), 0, "the consumer saw every post once, in each producer's order");
    assert_eq!(word(&shm, 0).load(Ordering::Relaxed), PRODUCERS * EACH);
    assert_eq!(bus(&shm).queue_len(), 0);
}

#[test]
fn lease_moves_when_the_holder_is_killed_and_never_has_two_holders() {
    let _g = serial();
    let shm = setup();
    // The first holder takes the lease (long expiry) and hangs on to it.
    let holder = {
        let shm = &shm;
        fork(move || {
            let (b, l) = (bus(shm), lock(shm));
            match b.try_lease(&l, my_pid(), 0, 1, 1, mono_ms(), 60_000, pid_alive) {
                Lease::Acquired { .. } => word(shm, 1).store(my_pid() as u64, Ordering::Relaxed),
                _ => return 1,
            }
            loop {
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    assert!(wait_until(Duration::from_secs(10), || word(&shm, 1).load(Ordering::Relaxed) == holder as u64));
    // Contenders keep trying until told to stop: while the holder lives none
    // gets the lease; after SIGKILL exactly one does (and keeps it: it stays alive).
    let mut kids = vec![];
    for slot in 1..4u32 {
        let shm = &shm;
        kids.push(fork(move || {
            let (b, l) = (bus(shm), lock(shm));
            let end = mono_ms() + 30_000;
            while word(shm, 3).load(Ordering::Relaxed) != 2 && mono_ms() < end {
                match b.try_lease(&l, my_pid(), slot, 1, 1, mono_ms(), 60_000, pid_alive) {
                    Lease::Acquired { from } => {
                        word(shm, 2).fetch_add(1, Ordering::Relaxed);
                        if from != holder {
                            word(shm, 4).fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Lease::Held | Lease::Other(_) => {}
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            0
        }));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(word(&shm, 2).load(Ordering::Relaxed), 0, "nobody takes a live holder's lease");
    // SAFETY: killing our own child.
    unsafe { libc::kill(holder, libc::SIGKILL) };
    assert_eq!(wait(holder), 128 + libc::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || word(&shm, 2).load(Ordering::Relaxed) >= 1), "a new holder");
    // The others keep trying for a while: none may take a living holder's lease.
    std::thread::sleep(Duration::from_millis(300));
    word(&shm, 3).store(2, Ordering::Relaxed);
    for k in kids {
        assert_eq!(wait(k), 0);
    }
    assert_eq!(word(&shm, 2).load(Ordering::Relaxed), 1, "exactly one takeover");
    assert_eq!(word(&shm, 4).load(Ordering::Relaxed), 0, "taken from the dead holder");
}
