//! Micro-benchmark of the event ring over a `MAP_SHARED` mapping.
//! `cargo run --release --example ring_bench`; prints medians of 5 runs.
//!
//! - post: ns per post() of a 64-byte payload, one process, PidLock;
//! - read: records/s for one reader draining a full ring;
//! - 2 writers: two forked processes posting at once (lock contention);
//! - writer + reader: two forked processes, one posting, one reading.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use workerbus::shm::lock::{PidLock, PidLockRef};
use workerbus::shm::ring::{Next, RecordIn, RecordOut, Ring};

const RUNS: usize = 5;
const CAPACITY: usize = 16 << 20;
const LOCK: usize = 0;
const RESULTS: usize = 64;
const DATA: usize = 4096;

#[path = "../tests/support/mod.rs"]
mod support;
use support::{Shm, fork, wait};

fn word(shm: &Shm, i: usize) -> &AtomicU64 {
    shm.at(RESULTS + i * 8)
}

fn lock(shm: &Shm) -> PidLockRef {
    // SAFETY: the lock word lives in the mapping, which outlives the handle.
    unsafe { PidLockRef::new(shm.at::<PidLock>(LOCK)) }
}

fn ring(shm: &Shm) -> Ring {
    // SAFETY: page-aligned shared mapping; fresh per run, so `init` is
    // alone; it outlives every handle.
    unsafe { Ring::init(shm.ptr.add(DATA), shm.len - DATA, CAPACITY, 4) }.expect("ring init")
}

fn fresh() -> Shm {
    Shm::new(DATA + Ring::region_size(CAPACITY, 4))
}

fn post_n(ring: &Ring, lock: &PidLockRef, n: u64) {
    let data = [0x5au8; 64];
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    for i in 0..n {
        let rec = RecordIn { source: b"bench", event: b"tick", unique: b"", data: &data, pid, flags: i as u32 };
        if ring.post(lock, &rec).is_err() {
            std::process::abort();
        }
    }
}

/// Reads until `n` seqs are accounted for; returns (received, lost).
fn read_n(ring: &Ring, slot: usize, n: u64, deadline: Instant) -> (u64, u64) {
    let Some(rd) = ring.reader(slot) else { return (0, 0) };
    let (mut out, mut buf) = (RecordOut::default(), [0u8; 256]);
    let (mut got, mut lost) = (0, 0);
    while got + lost < n && Instant::now() < deadline {
        match rd.next(&mut out, &mut buf) {
            Next::Record => {
                got += 1;
                lost += out.missed;
            }
            Next::Lagged(k) => lost += k,
            Next::Empty => std::hint::spin_loop(),
            Next::TooSmall(_) => break,
        }
    }
    (got, lost)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let started = Instant::now();
    const POSTS: u64 = 1_000_000;
    const READS: u64 = 100_000;

    let mut post_ns = vec![];
    for _ in 0..RUNS {
        let shm = fresh();
        let (ring, lock) = (ring(&shm), lock(&shm));
        post_n(&ring, &lock, 10_000); // warm the pages
        let t = Instant::now();
        post_n(&ring, &lock, POSTS);
        post_ns.push(t.elapsed().as_nanos() as f64 / POSTS as f64);
    }

    let mut reads_per_s = vec![];
    for _ in 0..RUNS {
        let shm = fresh();
        let (ring, lock) = (ring(&shm), lock(&shm));
        post_n(&ring, &lock, READS);
        let t = Instant::now();
        let (got, _) = read_n(&ring, 0, READS, Instant::now() + Duration::from_secs(5));
        reads_per_s.push(got as f64 / t.elapsed().as_secs_f64());
    }

    // Two writer processes, 500k posts each, at once.
    let mut two_writers_ns = vec![];
    for _ in 0..RUNS {
        let shm = fresh();
        let ring = ring(&shm);
        let t = Instant::now();
        let pids: Vec<i32> = (0..2)
            .map(|_| {
                fork(|| {
                    post_n(&ring, &lock(&shm), POSTS / 2);
                    0
                })
            })
            .collect();
        for pid in pids {
            wait(pid);
        }
        two_writers_ns.push(t.elapsed().as_nanos() as f64 / POSTS as f64);
    }

    // One writer and one reader process at once.
    let (mut wr_ns, mut wr_reads, mut wr_lost) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let shm = fresh();
        let ring = ring(&shm);
        let reader = fork(|| {
            let t = Instant::now();
            let (got, lost) = read_n(&ring, 0, POSTS, Instant::now() + Duration::from_secs(5));
            word(&shm, 0).store(got, Ordering::Relaxed);
            word(&shm, 1).store(lost, Ordering::Relaxed);
            word(&shm, 2).store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            0
        });
        let t = Instant::now();
        let writer = fork(|| {
            post_n(&ring, &lock(&shm), POSTS);
            0
        });
        wait(writer);
        wr_ns.push(t.elapsed().as_nanos() as f64 / POSTS as f64);
        wait(reader);
        let (got, lost, ns) = (
            word(&shm, 0).load(Ordering::Relaxed),
            word(&shm, 1).load(Ordering::Relaxed),
            word(&shm, 2).load(Ordering::Relaxed),
        );
        wr_reads.push(got as f64 / (ns as f64 / 1e9));
        wr_lost.push(lost as f64);
    }

    println!("ring_bench: 64-byte payload, {} KiB ring, median of {RUNS} runs", CAPACITY >> 10);
    println!("  post, 1 process:             {:>7.1} ns/post", median(post_ns));
    println!("  read, 1 reader:              {:>7.2} M records/s", median(reads_per_s) / 1e6);
    println!("  post, 2 writer processes:    {:>7.1} ns/post (aggregate)", median(two_writers_ns));
    println!(
        "  writer + reader processes:   {:>7.1} ns/post, reader {:.2} M records/s, {} lost of {POSTS}",
        median(wr_ns),
        median(wr_reads) / 1e6,
        median(wr_lost)
    );
    println!(
        "  ({} CPUs, {:.1} s)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    );
}
