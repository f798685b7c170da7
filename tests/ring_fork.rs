//! The event ring and the claims table across real processes: children
//! forked over one `MAP_SHARED` mapping post, read and claim concurrently,
//! and report through the mapping.

mod support;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{Shm, fork, mix, my_pid, serial, wait, wait_until, yield_cpu};
use workerbus::shm::claims::Claims;
use workerbus::shm::lock::{PidLock, PidLockRef};
use workerbus::shm::ring::{Next, PostError, RecordIn, RecordOut, Ring};

/// Control page: the lock at 0, flags and results after it; the ring or
/// the claims table from `DATA` on (page-aligned, so ALIGN-aligned too).
const LOCK: usize = 0;
const FLAGS: usize = 64;
const RESULTS: usize = 512;
const DATA: usize = 4096;

/// Per-process result words in the control page.
const R_COUNT: usize = 0;
const R_SUM: usize = 1;
const R_MISSED: usize = 2;
const R_ERRORS: usize = 3;
const R_LAGGED: usize = 4;
const R_WORDS: usize = 6;

fn result(shm: &Shm, who: usize, word: usize) -> &AtomicU64 {
    shm.at(RESULTS + (who * R_WORDS + word) * 8)
}

fn flag(shm: &Shm, i: usize) -> &AtomicU32 {
    shm.at(FLAGS + i * 4)
}

fn lock(shm: &Shm) -> PidLockRef {
    // SAFETY: the lock word lives in the mapping, which outlives the handle.
    unsafe { PidLockRef::new(shm.at::<PidLock>(LOCK)) }
}

fn make_ring(shm: &Shm, capacity: usize, readers: usize) -> Ring {
    // SAFETY: the mapping is ours, zero-filled, page-aligned, shared with
    // the children, and outlives every handle.
    unsafe { Ring::init(shm.ptr.add(DATA), shm.len - DATA, capacity, readers) }.expect("ring init")
}

fn attach(shm: &Shm) -> Ring {
    // SAFETY: as above; `make_ring` laid the ring out before the fork.
    unsafe { Ring::attach(shm.ptr.add(DATA), shm.len - DATA) }.expect("ring attach")
}

/// Posts `n` records from writer `w`: data = writer, counter (two u64s),
/// then `counter % 61` filler bytes equal to the counter's low byte (varied
/// sizes end records at every offset, so the ring pads and wraps). `spin`:
/// busy iterations between posts, to pace the writer.
fn write_records(shm: &Shm, w: u64, n: u64, spin: u32) -> i32 {
    let ring = attach(shm);
    let lock = lock(shm);
    let pid = my_pid();
    let mut data = [0u8; 16 + 61];
    for i in 0..n {
        data[..8].copy_from_slice(&w.to_le_bytes());
        data[8..16].copy_from_slice(&i.to_le_bytes());
        let fill = (i % 61) as usize;
        data[16..16 + fill].fill(i as u8);
        let rec =
            RecordIn { source: b"writer", event: b"tick", unique: b"", data: &data[..16 + fill], pid, flags: w as u32 };
        // A full ring refuses while an attached reader has not read: wait for it.
        loop {
            match ring.post(&lock, &rec) {
                Ok(_) => break,
                Err(PostError::Full { .. }) => yield_cpu(),
                Err(_) => return 2,
            }
        }
        for _ in 0..spin {
            std::hint::spin_loop();
        }
    }
    0
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Reads until `total` seqs are accounted for (received or reported lost),
/// checking every record's bytes, seqs contiguous except where Lagged said
/// so, and each writer's counters increasing by one (until a loss).
/// `spin`: busy iterations per record, to make a slow reader.
fn read_records(shm: &Shm, slot: usize, who: usize, total: u64, writers: usize, spin: u32) -> i32 {
    let ring = attach(shm);
    let Some(rd) = ring.reader(slot) else { return 3 };
    let (mut out, mut buf) = (RecordOut::default(), [0u8; 256]);
    let mut next_counter = [0u64; 8];
    let (mut expect, mut count, mut sum, mut lagged, mut errors) = (1u64, 0u64, 0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while expect <= total && Instant::now() < deadline {
        match rd.next(&mut out, &mut buf) {
            Next::Record => {
                // A lap is reported with the record that follows it.
                lagged += out.missed;
                expect += out.missed;
                let (w, c) = (u64_at(&buf, 10) as usize, u64_at(&buf, 18));
                let fill = (c % 61) as usize;
                let ok = out.seq == expect
                    && w < writers
                    && &buf[..10] == b"writertick"
                    && (out.source_len, out.event_len, out.unique_len) == (6, 4, 0)
                    && out.data_len as usize == 16 + fill
                    && buf[26..26 + fill].iter().all(|&b| b == c as u8)
                    && out.flags == w as u32;
                if !ok || (lagged == 0 && next_counter.get(w) != Some(&c)) {
                    errors += 1;
                }
                if let Some(n) = next_counter.get_mut(w) {
                    *n = c + 1;
                }
                sum = mix(mix(mix(sum, out.seq), out.pid as u64), c);
                count += 1;
                expect = out.seq + 1;
                for _ in 0..spin {
                    std::hint::spin_loop();
                }
            }
            Next::Empty => yield_cpu(),
            Next::Lagged(n) => {
                lagged += n;
                expect += n;
            }
            Next::TooSmall(_) => {
                errors += 1;
                break;
            }
        }
    }
    result(shm, who, R_COUNT).store(count, Ordering::Relaxed);
    result(shm, who, R_SUM).store(sum, Ordering::Relaxed);
    result(shm, who, R_MISSED).store(rd.stats().missed, Ordering::Relaxed);
    result(shm, who, R_LAGGED).store(lagged, Ordering::Relaxed);
    result(shm, who, R_ERRORS).store(errors, Ordering::Relaxed);
    if expect <= total { 4 } else { 0 }
}

/// 4 writers × 25,000 records, 4 readers reading while they post, a ring
/// big enough for all: every reader gets all 100,000 exactly once, in the
/// same order (same checksum of the seq-ordered (seq, pid, counter)
/// stream), and each writer's records in the order it posted them.
#[test]
fn all_readers_see_every_record_once_in_one_order() {
    let _g = serial();
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 25_000;
    const TOTAL: u64 = WRITERS * PER_WRITER;
    let shm = Shm::new(DATA + Ring::region_size(16 << 20, 5));
    let ring = make_ring(&shm, 16 << 20, 5);
    let readers: Vec<i32> = (0..4).map(|r| fork(|| read_records(&shm, r, r, TOTAL, 4, 0))).collect();
    let writers: Vec<i32> = (0..WRITERS).map(|w| fork(|| write_records(&shm, w, PER_WRITER, 0))).collect();
    for pid in writers.into_iter().chain(readers) {
        assert_eq!(wait(pid), 0, "child {pid}");
    }
    // The parent reads the whole log once more: the reference stream.
    assert_eq!(read_records(&shm, 4, 4, TOTAL, 4, 0), 0);
    let reference = result(&shm, 4, R_SUM).load(Ordering::Relaxed);
    for r in 0..5 {
        let got: Vec<u64> = (0..R_WORDS).map(|w| result(&shm, r, w).load(Ordering::Relaxed)).collect();
        assert_eq!(got[R_COUNT], TOTAL, "reader {r}");
        assert_eq!(got[R_SUM], reference, "reader {r}: same order");
        assert_eq!((got[R_MISSED], got[R_LAGGED], got[R_ERRORS]), (0, 0, 0), "reader {r}");
    }
    let st = ring.stats();
    assert_eq!((st.posted, st.head_seq, st.oldest_seq, st.overwritten), (TOTAL, TOTAL + 1, 1, 0));
}

/// A 16 KiB ring, a writer and a reader 3-4 times slower, running at the
/// same time: the reader is lapped over and over, often while copying a
/// record. No torn record gets through (read_records checks every byte),
/// and the losses it is told about are exact: received + reported lost ==
/// posted, and the slot's `missed` counter agrees.
#[test]
fn lapped_slow_reader_is_told_exactly_what_it_missed() {
    let _g = serial();
    const TOTAL: u64 = 200_000;
    let shm = Shm::new(DATA + Ring::region_size(16 << 10, 1));
    let ring = make_ring(&shm, 16 << 10, 1);
    let reader = fork(|| read_records(&shm, 0, 0, TOTAL, 1, 1500));
    let writer = fork(|| write_records(&shm, 0, TOTAL, 300));
    assert_eq!(wait(writer), 0);
    assert_eq!(wait(reader), 0);
    let (count, lagged, missed, errors) = (
        result(&shm, 0, R_COUNT).load(Ordering::Relaxed),
        result(&shm, 0, R_LAGGED).load(Ordering::Relaxed),
        result(&shm, 0, R_MISSED).load(Ordering::Relaxed),
        result(&shm, 0, R_ERRORS).load(Ordering::Relaxed),
    );
    eprintln!("count {count} lagged {lagged} stats {:?}", ring.stats());
    assert!(lagged > 0, "the reader was lapped");
    assert_eq!(count + lagged, TOTAL, "received {count} + lost {lagged}");
    assert_eq!(missed, lagged);
    assert_eq!(errors, 0);
    assert!(ring.stats().overwritten >= lagged);
}

/// A writer is SIGKILLed inside post(), holding the lock, after reserving
/// space (and evicting) but before publishing. Another writer blocked on
/// the lock takes it over once the dead one is reaped and goes on; a
/// reader sees every published record, seqs contiguous, nothing lost and
/// nothing wedged; the death is counted with its pid. Then the same with
/// nobody posting afterwards: `repair` finds it.
#[test]
fn writer_killed_mid_post_wedges_nobody() {
    let _g = serial();
    // Room for all 1010 records: a reader descheduled on a loaded machine
    // must not be lapped, so the counts below do not depend on scheduling.
    let shm = Shm::new(DATA + Ring::region_size(256 << 10, 2));
    let ring = make_ring(&shm, 256 << 10, 2);
    let park = |shm: &Shm, before: u64| {
        let code = write_records(shm, 0, before, 0);
        if code != 0 {
            return code;
        }
        let ring = attach(shm);
        let big = [7u8; 4000];
        let rec = RecordIn { source: b"writer", event: b"tick", unique: b"", data: &big, pid: my_pid(), flags: 0 };
        if ring.post_partial_for_test(&lock(shm), &rec).is_err() {
            return 2;
        }
        flag(shm, 0).store(1, Ordering::Release);
        loop {
            // SAFETY: pause only waits for a signal (the SIGKILL).
            unsafe { libc::pause() };
        }
    };
    let dying = fork(|| park(&shm, 10));
    assert!(wait_until(Duration::from_secs(10), || flag(&shm, 0).load(Ordering::Acquire) == 1));
    let lock_word: &PidLock = shm.at(LOCK);
    assert_eq!(lock_word.owner(), dying);
    // The reader is guarded (as a worker with a poller is): however the
    // machine schedules it, the writer waits for it rather than lap it.
    ring.reader(0).unwrap().attach(1, 0, 0);
    let reader = fork(|| read_records(&shm, 0, 0, 1010, 2, 0));
    let writer = fork(|| write_records(&shm, 1, 1000, 0));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ring.stats().posted, 10, "the writer waits for the lock");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dying, libc::SIGKILL) };
    assert_eq!(wait(dying), 128 + libc::SIGKILL);
    assert_eq!(wait(writer), 0);
    assert_eq!(wait(reader), 0);
    // read_records checked order, counters and seq contiguity.
    assert_eq!(result(&shm, 0, R_COUNT).load(Ordering::Relaxed), 1010);
    assert_eq!(result(&shm, 0, R_LAGGED).load(Ordering::Relaxed), 0);
    assert_eq!(result(&shm, 0, R_ERRORS).load(Ordering::Relaxed), 0);
    let st = ring.stats();
    assert_eq!((st.posted, st.head_seq, st.abandoned, st.abandoned_pid), (1010, 1011, 1, dying));
    assert_eq!(lock_word.steals(), 1);
    ring.reader(0).unwrap().release();

    // Again, but nobody posts after the death: a timer's repair() finds it.
    flag(&shm, 0).store(0, Ordering::Relaxed);
    let dying = fork(|| park(&shm, 0));
    assert!(wait_until(Duration::from_secs(10), || flag(&shm, 0).load(Ordering::Acquire) == 1));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dying, libc::SIGKILL) };
    assert_eq!(wait(dying), 128 + libc::SIGKILL);
    let rd = ring.reader(1).unwrap();
    rd.set_cursor(1011);
    let (mut out, mut buf) = (RecordOut::default(), [0u8; 64]);
    assert_eq!(rd.next(&mut out, &mut buf), Next::Empty);
    assert_eq!(ring.repair(&lock(&shm)), Some(dying));
    assert_eq!(lock_word.owner(), 0);
    let rec = RecordIn { source: b"s", event: b"e", unique: b"", data: b"after", pid: my_pid(), flags: 0 };
    assert_eq!(ring.post(&lock(&shm), &rec), Ok(1011), "no seq was lost");
    assert_eq!((rd.next(&mut out, &mut buf), out.seq, out.data_len), (Next::Record, 1011, 5));
    assert_eq!((ring.stats().abandoned, lock_word.steals()), (2, 2));
}

/// 4 processes claim the same 2,000 keys, each in its own order: exactly
/// one wins each key. A second round after the claims expired: again
/// exactly one winner per key, whatever the interleaving of the rounds.
#[test]
fn claims_have_one_winner_per_key_across_processes() {
    let _g = serial();
    const KEYS: usize = 2000;
    const PROCS: usize = 4;
    let wins_off = DATA + Claims::region_size(4096).next_multiple_of(64);
    let shm = Shm::new(wins_off + 2 * KEYS * 4);
    // SAFETY: the mapping is ours, page-aligned, shared, and outlives the handles.
    let claims = unsafe { Claims::init(shm.ptr.add(DATA), wins_off - DATA, 4096) }.unwrap();
    let keys: Vec<Vec<u8>> = (0..KEYS).map(|i| format!("unique-event-{i}").into_bytes()).collect();
    let wins = |round: usize, k: usize| -> &AtomicU32 { shm.at(wins_off + (round * KEYS + k) * 4) };
    let children: Vec<i32> = (0..PROCS)
        .map(|p| {
            fork(|| {
                let lock = lock(&shm);
                for (round, now) in [(0, 1_000), (1, 5_000)] {
                    for i in 0..KEYS {
                        let k = (i + p * KEYS / PROCS) % KEYS;
                        if claims.claim(&lock, &keys[k], now, 1_000) {
                            wins(round, k).fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                0
            })
        })
        .collect();
    for pid in children {
        assert_eq!(wait(pid), 0);
    }
    for round in 0..2 {
        for k in 0..KEYS {
            assert_eq!(wins(round, k).load(Ordering::Relaxed), 1, "round {round} key {k}");
        }
    }
    let st = claims.stats(5_500);
    assert_eq!((st.won, st.refused, st.evicted, st.live), (2 * KEYS as u64, 6 * KEYS as u64, 0, KEYS as u32));
}
