//! Writers SIGKILLed at random points, over one `MAP_SHARED` mapping:
//! while they post to the ring, claim unique keys or set kv values, the
//! parent kills each after a random lifetime (fork included, so some die
//! before they start, some inside the lock, some between two writes) and
//! starts the next. Reader processes check what they see meanwhile.
//!
//! The kill points are random (the seed is printed; `TEST_SEED=n` replays
//! one), the assertions hold for every kill point: no stall (a reader has a
//! deadline), no torn record or value (every payload is a pattern of its
//! writer and counter), every loss counted, no key held twice.
//!
//! The lock is the zone's: writers share one `PidLock`. In nginx the master
//! force-unlocks a dead holder's mutex when it reaps the worker; here the
//! parent reaps each killed writer at once, after which `PidLock` waiters
//! see its pid gone and take the lock over (as tests/ring_fork.rs's
//! killed-writer test does).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{Rng, Shm, fork, kill, mono_ms, my_pid, seed, serial, wait, wait_until, yield_cpu};
use workerbus::shm::claims::Claims;
use workerbus::shm::kv::Kv;
use workerbus::shm::lock::{PidLock, PidLockRef};
use workerbus::shm::ring::{Next, PostError, RecordIn, RecordOut, Ring};

/// The control pages: the lock, flags, readers' results, then per-writer
/// words (`DONE`: operations completed; `COUNTS`: records a reader got
/// from it); the structure under test from `DATA` on (page-aligned).
const LOCK: usize = 0;
const FLAGS: usize = 64;
const RESULTS: usize = 512;
const DONE: usize = 4096;
const MAX_IDS: usize = 8192;
const COUNTS: usize = DONE + MAX_IDS * 8;
const DATA: usize = COUNTS + MAX_IDS * 8;

/// Flag words.
const F_FINAL: usize = 0; // ring: head_seq once the writers are done (0: not yet)
const F_STOP: usize = 1; // kv: readers stop
const F_LOG_LEN: usize = 2; // claims: entries in the win log

/// Result words of each reader.
const R_GOT: usize = 0;
const R_LAGGED: usize = 1;
const R_MISSED: usize = 2;
const R_ERRORS: usize = 3;
const R_READS: usize = 4;
const R_WORDS: usize = 8;

/// How long writers are killed and replaced; each lives a random
/// 0..=MAX_LIFE_US microseconds.
const RUN: Duration = Duration::from_millis(1200);
const MAX_LIFE_US: u64 = 3000;
/// A reader that has not seen the end by then has stalled.
const READ_LIMIT: Duration = Duration::from_secs(30);

fn word(shm: &Shm, off: usize, i: usize) -> &AtomicU64 {
    shm.at(off + i * 8)
}

fn flag(shm: &Shm, i: usize) -> &AtomicU64 {
    word(shm, FLAGS, i)
}

fn done(shm: &Shm, id: usize) -> &AtomicU64 {
    word(shm, DONE, id)
}

fn result(shm: &Shm, reader: usize, w: usize) -> &AtomicU64 {
    word(shm, RESULTS, reader * R_WORDS + w)
}

fn lock(shm: &Shm) -> PidLockRef {
    // SAFETY: the lock word lives in the mapping, which outlives the handle.
    unsafe { PidLockRef::new(shm.at::<PidLock>(LOCK)) }
}

/// Runs writers in `lanes` lanes for `RUN`: `spawn(lane, id)` forks writer
/// `id`, which the parent SIGKILLs after a random lifetime and reaps at
/// once (as nginx's master reaps a worker), then checks with
/// `reaped(lane, id)` and replaces by the next id. Returns the ids used
/// (0..n) and the kills.
fn kill_writers(
    rng: &mut Rng,
    lanes: usize,
    mut spawn: impl FnMut(usize, usize) -> i32,
    mut reaped: impl FnMut(usize, usize),
) -> (usize, u64) {
    let end = Instant::now() + RUN;
    let mut next = 0;
    let mut start = |lane: usize, rng: &mut Rng| {
        let id = next;
        next += 1;
        assert!(id < MAX_IDS, "more writers than the control pages hold");
        let pid = spawn(lane, id);
        (pid, id, Instant::now() + Duration::from_micros(rng.below(MAX_LIFE_US + 1)))
    };
    let mut live: Vec<_> = (0..lanes).map(|lane| Some(start(lane, rng))).collect();
    let mut kills = 0;
    while live.iter().any(Option::is_some) {
        for (lane, slot) in live.iter_mut().enumerate() {
            let Some((pid, id, at)) = *slot else { continue };
            if Instant::now() < at {
                continue;
            }
            let status = kill(pid);
            assert_eq!(status, 128 + libc::SIGKILL, "writer {id} ended by itself with status {status}");
            kills += 1;
            reaped(lane, id);
            *slot = (Instant::now() < end).then(|| start(lane, rng));
        }
        // Pacing only: the kill times are what the schedule decides.
        std::thread::sleep(Duration::from_micros(50));
    }
    (next, kills)
}

/// Writer `id`'s `c`-th payload: id and counter (u32 each), then a
/// length and bytes that depend on both: a torn or misplaced copy fails
/// `check`.
fn payload(id: u64, c: u64, max_fill: u64, buf: &mut [u8]) -> usize {
    let n = ((id * 7 + c * 13) % (max_fill + 1)) as usize;
    buf[..4].copy_from_slice(&(id as u32).to_le_bytes());
    buf[4..8].copy_from_slice(&(c as u32).to_le_bytes());
    for (i, b) in buf[8..8 + n].iter_mut().enumerate() {
        *b = pattern(id, c, i);
    }
    8 + n
}

fn pattern(id: u64, c: u64, i: usize) -> u8 {
    (id.wrapping_mul(31) ^ c.wrapping_mul(131) ^ (i as u64).wrapping_mul(7)) as u8
}

/// (writer, counter) of an intact payload.
fn check(b: &[u8], max_fill: u64) -> Option<(u64, u64)> {
    let id = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as u64;
    let c = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?) as u64;
    let n = ((id * 7 + c * 13) % (max_fill + 1)) as usize;
    let fill = b.get(8..)?;
    (fill.len() == n && fill.iter().enumerate().all(|(i, &x)| x == pattern(id, c, i))).then_some((id, c))
}

// ---- the ring ----

const RING_CAP: usize = 16 << 10;
const RING_FILL: u64 = 90;

fn ring_at(shm: &Shm) -> Ring {
    // SAFETY: the mapping is ours, page-aligned, shared with the children
    // and outlives every handle; the parent laid the ring out before forking.
    unsafe { Ring::attach(shm.ptr.add(DATA), shm.len - DATA) }.expect("ring attach")
}

/// Writes `op(payload)` with counters from `done(id)` on, until killed
/// (or `limit` writes): `done` counts the writes that returned, so a killed
/// writer had at most one more in flight. `op` returns false on an error.
fn counted_writes(shm: &Shm, id: usize, limit: u64, max_fill: u64, mut op: impl FnMut(&[u8]) -> bool) -> i32 {
    let mut buf = [0u8; 8 + 512];
    // Relaxed (done): this writer's own word; the parent reads it after reaping.
    let done = done(shm, id);
    loop {
        let c = done.load(Ordering::Relaxed);
        if c >= limit {
            return 0;
        }
        let len = payload(id as u64, c, max_fill, &mut buf);
        if !op(&buf[..len]) {
            return 2;
        }
        done.store(c + 1, Ordering::Relaxed);
    }
}

/// Posts until killed (or `limit` posts).
fn ring_writer(shm: &Shm, id: usize, limit: u64) -> i32 {
    let (ring, lock, pid) = (ring_at(shm), lock(shm), my_pid());
    counted_writes(shm, id, limit, RING_FILL, |data| {
        let rec = RecordIn { source: b"kw", event: b"post", unique: b"", data, pid, flags: id as u32 };
        loop {
            match ring.post(&lock, &rec) {
                Ok(_) => return true,
                // The guarded reader has not read yet: wait for it.
                Err(PostError::Full { .. }) => yield_cpu(),
                Err(_) => return false,
            }
        }
    })
}

/// Reads until the parent publishes the final head and every seq before it
/// is accounted for. Checks seqs (contiguous but for reported losses) and
/// every payload; the guarded reader also each writer's counters (0, 1, 2,
/// ... with no gap) and leaves them in `COUNTS`.
fn ring_reader(shm: &Shm, slot: usize, guarded: bool, spin: u32) -> i32 {
    let ring = ring_at(shm);
    let Some(rd) = ring.reader(slot) else { return 3 };
    let (mut out, mut buf) = (RecordOut::default(), [0u8; 256]);
    let (mut expect, mut got, mut lagged, mut errors) = (1u64, 0u64, 0u64, 0u64);
    let deadline = Instant::now() + READ_LIMIT;
    let code = loop {
        match rd.next(&mut out, &mut buf) {
            Next::Record => {
                // A lap is reported with the record after it.
                lagged += out.missed;
                expect += out.missed;
                let len = (out.source_len + out.event_len + out.unique_len + out.data_len) as usize;
                let head_ok = out.seq == expect
                    && (out.source_len, out.event_len, out.unique_len) == (2, 4, 0)
                    && &buf[..6] == b"kwpost";
                match check(&buf[6..len], RING_FILL) {
                    Some((id, c)) if head_ok && out.flags as u64 == id && (id as usize) < MAX_IDS => {
                        if guarded {
                            // Relaxed: this reader's own words; the parent reads them after reaping it.
                            let n = word(shm, COUNTS, id as usize);
                            if n.load(Ordering::Relaxed) != c {
                                errors += 1;
                            }
                            n.store(c + 1, Ordering::Relaxed);
                        }
                    }
                    _ => errors += 1,
                }
                got += 1;
                expect = out.seq + 1;
                for _ in 0..spin {
                    std::hint::spin_loop();
                }
            }
            Next::Lagged(n) => {
                lagged += n;
                expect += n;
            }
            Next::Empty => {
                // Acquire: pairs with the parent's Release store of the final head.
                let fin = flag(shm, F_FINAL).load(Ordering::Acquire);
                if fin != 0 && expect >= fin {
                    break 0;
                }
                if Instant::now() > deadline {
                    break 4; // stalled
                }
                yield_cpu();
            }
            Next::TooSmall(_) => {
                errors += 1;
                break 5;
            }
        }
    };
    // Relaxed: read by the parent after reaping this process.
    for (w, v) in [(R_GOT, got), (R_LAGGED, lagged), (R_MISSED, rd.missed()), (R_ERRORS, errors)] {
        result(shm, slot, w).store(v, Ordering::Relaxed);
    }
    code
}

/// Writers killed mid-post: a guarded reader (it blocks posts that would
/// overwrite what it has not read) gets every published record, intact and
/// in each writer's order; an unguarded slow reader is lapped and told
/// exactly how many it lost; each writer's records in the ring are the
/// posts it saw return plus at most the one it had in flight; the ring's
/// counters add up (published = posted + those cut off after publishing).
#[test]
fn ring_writers_killed_at_random_points() {
    let _g = serial();
    let seed = seed();
    eprintln!("seed {seed}");
    let shm = Shm::new(DATA + Ring::region_size(RING_CAP, 2));
    // SAFETY: as in ring_at; nobody else uses the region yet.
    let ring = unsafe { Ring::init(shm.ptr.add(DATA), shm.len - DATA, RING_CAP, 2) }.expect("ring init");
    ring.reader(0).unwrap().attach(1, 0, 0);
    let readers = [fork(|| ring_reader(&shm, 0, true, 0)), fork(|| ring_reader(&shm, 1, false, 3000))];
    let (ids, kills) = kill_writers(&mut Rng(seed), 2, |_, id| fork(|| ring_writer(&shm, id, u64::MAX)), |_, _| {});
    // A writer that is not killed: it takes the lock over and posts after the dead.
    let last = fork(|| ring_writer(&shm, ids, 100));
    assert_eq!(wait(last), 0);
    assert_eq!(ring.repair(&lock(&shm)), None, "the last post accounted for every death");
    let fin = ring.head_seq();
    // Release: the readers' Acquire load sees the final head.
    flag(&shm, F_FINAL).store(fin, Ordering::Release);
    for (r, pid) in readers.into_iter().enumerate() {
        assert_eq!(wait(pid), 0, "reader {r} (4: stalled, 5: buffer too small)");
    }

    let published = fin - 1;
    let r = |i: usize, w: usize| result(&shm, i, w).load(Ordering::Relaxed);
    assert_eq!((r(0, R_GOT), r(0, R_LAGGED), r(0, R_ERRORS)), (published, 0, 0), "guarded reader");
    assert_eq!(r(1, R_ERRORS), 0, "slow reader: a torn or misordered record");
    assert_eq!(r(1, R_GOT) + r(1, R_LAGGED), published, "slow reader: received + reported lost");
    assert_eq!(r(1, R_MISSED), r(1, R_LAGGED), "slow reader: the slot's count agrees");
    let (mut sum, mut in_flight) = (0, 0);
    for id in 0..=ids {
        let (d, c) = (done(&shm, id).load(Ordering::Relaxed), word(&shm, COUNTS, id).load(Ordering::Relaxed));
        assert!(c == d || c == d + 1, "writer {id}: {d} posts returned, {c} records in the ring");
        sum += c;
        in_flight += c - d;
    }
    assert_eq!(sum, published, "every record is some writer's");
    assert_eq!(done(&shm, ids).load(Ordering::Relaxed), 100);
    let st = ring.stats();
    eprintln!(
        "{kills} kills, {published} records, slow reader lapped {} times over, {} lost; {st:?}, lock steals {}",
        r(1, R_MISSED),
        r(1, R_LAGGED),
        shm.at::<PidLock>(LOCK).steals()
    );
    assert!(in_flight <= kills);
    assert!(st.posted <= published && published <= st.posted + st.abandoned, "{st:?}");
    assert!(st.abandoned <= kills, "{st:?}");
    assert_eq!((st.head_seq, st.corrupt, st.rejected), (fin, 0, 0));
}

// ---- unique claims ----

const KEYS: usize = 8;
const TTL_MS: u64 = 3;
const LOG_CAP: usize = MAX_IDS * 2;

fn key(k: usize) -> Vec<u8> {
    format!("unique-{k}").into_bytes()
}

/// Claims random keys until killed; logs each win as (now << 8 | key) in
/// the `DONE`/`COUNTS` pages (a claimer killed between its win and the log
/// leaves that win out: the checks below hold for any subset of wins).
fn claimer(shm: &Shm, claims: Claims, id: usize) -> i32 {
    let lock = lock(shm);
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    let mut rng = Rng((id as u64 + 1) * 0x9e37_79b9_7f4a_7c15);
    loop {
        let k = rng.below(KEYS as u64) as usize;
        let now = mono_ms();
        if claims.claim(&lock, &keys[k], now, TTL_MS) {
            log_win(shm, now, k);
        }
    }
}

fn log_win(shm: &Shm, now: u64, k: usize) {
    // Relaxed: the parent reads the log after reaping every claimer.
    let i = flag(shm, F_LOG_LEN).fetch_add(1, Ordering::Relaxed) as usize;
    if i < LOG_CAP {
        word(shm, DONE, i).store((now << 8) | k as u64, Ordering::Relaxed);
    }
}

/// Claimers killed mid-claim, inside the lock or out: no key is ever held
/// by two at once (a key's wins are at least its expiry apart), and once
/// the claims of the dead have expired every key is claimable again, and
/// then held.
#[test]
fn claimers_killed_at_random_points() {
    let _g = serial();
    let seed = seed();
    eprintln!("seed {seed}");
    let shm = Shm::new(DATA + Claims::region_size(1024));
    // SAFETY: the mapping is ours, page-aligned, shared, and outlives the handle.
    let claims = unsafe { Claims::init(shm.ptr.add(DATA), shm.len - DATA, 1024) }.unwrap();
    let (_, kills) = kill_writers(&mut Rng(seed), 2, |_, id| fork(|| claimer(&shm, claims, id)), |_, _| {});
    // Every claim made so far expires by then, the killed claimers' too.
    let after = mono_ms() + TTL_MS;
    let lock = lock(&shm);
    for k in 0..KEYS {
        assert!(claims.claim(&lock, &key(k), after, TTL_MS), "key {k} claimable once its claims expired");
        log_win(&shm, after, k);
        assert!(!claims.claim(&lock, &key(k), after, TTL_MS), "key {k} is now held");
    }

    let n = (flag(&shm, F_LOG_LEN).load(Ordering::Relaxed) as usize).min(LOG_CAP);
    let mut wins: Vec<Vec<u64>> = vec![vec![]; KEYS];
    for i in 0..n {
        let w = word(&shm, DONE, i).load(Ordering::Relaxed);
        if w != 0 {
            wins[(w & 0xff) as usize].push(w >> 8);
        }
    }
    for (k, times) in wins.iter_mut().enumerate() {
        times.sort_unstable();
        for pair in times.windows(2) {
            assert!(pair[1] >= pair[0] + TTL_MS, "key {k} won at {} and again at {}: held twice", pair[0], pair[1]);
        }
    }
    let st = claims.stats(after);
    eprintln!("{kills} kills, {n} wins logged, {st:?}, lock steals {}", shm.at::<PidLock>(LOCK).steals());
    assert!(n >= KEYS);
    assert_eq!(st.evicted, 0, "nothing evicted: no key could be held twice that way either");
}

// ---- kv ----

const KV_LANES: usize = 3;
const KV_FILL: u64 = 500;

fn kv_at(shm: &Shm) -> &Kv {
    shm.at(DATA)
}

fn lane_key(lane: usize) -> Vec<u8> {
    format!("lane-{lane}").into_bytes()
}

/// Sets its lane's key until killed (or `limit` sets).
fn kv_writer(shm: &Shm, lane: usize, id: usize, limit: u64) -> i32 {
    let (kv, lock, key) = (kv_at(shm), lock(shm), lane_key(lane));
    counted_writes(shm, id, limit, KV_FILL, |value| kv.set(&lock, &key, value).is_ok())
}

/// Reads every lane until told to stop: each value intact, and each lane's
/// (writer, counter) never going back (writers of a lane come one after
/// another, with growing ids).
fn kv_reader(shm: &Shm, who: usize) -> i32 {
    let kv = kv_at(shm);
    let keys: Vec<Vec<u8>> = (0..KV_LANES).map(lane_key).collect();
    let (mut last, mut v, mut errors) = ([(0u64, 0u64); KV_LANES], vec![], 0u64);
    let deadline = Instant::now() + READ_LIMIT;
    let mut reads = 0u64;
    // Acquire: pairs with the parent's Release store.
    let code = loop {
        if flag(shm, F_STOP).load(Ordering::Acquire) != 0 {
            break 0;
        }
        if Instant::now() > deadline {
            break 4;
        }
        for (lane, key) in keys.iter().enumerate() {
            if !kv.get(key, &mut v) {
                continue;
            }
            match check(&v, KV_FILL) {
                Some(seen) if seen >= last[lane] => last[lane] = seen,
                _ => errors += 1,
            }
            reads += 1;
        }
        // Relaxed: progress for the parent's liveness check.
        result(shm, who, R_READS).store(reads, Ordering::Relaxed);
        // Leave the CPUs to the writers (2 readers, 3 writers, maybe 2 cores).
        yield_cpu();
    };
    // Relaxed: read by the parent after reaping this process.
    result(shm, who, R_ERRORS).store(errors, Ordering::Relaxed);
    code
}

/// kv writers killed mid-set: readers never see a torn value nor a lane
/// going back; after each kill the lane shows the dead writer's last
/// completed set, or the one it had in flight complete, or (killed inside
/// the write) nothing, never a mix; and the lane's next writer sets it
/// as if nothing had happened.
#[test]
fn kv_writers_killed_at_random_points() {
    let _g = serial();
    let seed = seed();
    eprintln!("seed {seed}");
    let shm = Shm::new(DATA + size_of::<Kv>());
    let kv = kv_at(&shm);
    let readers = [fork(|| kv_reader(&shm, 0)), fork(|| kv_reader(&shm, 1))];
    let mut lane_last: [Option<(u64, u64)>; KV_LANES] = [None; KV_LANES];
    let (mut v, mut torn_writes) = (vec![], 0);
    let (ids, kills) = kill_writers(
        &mut Rng(seed),
        KV_LANES,
        |lane, id| fork(|| kv_writer(&shm, lane, id, u64::MAX)),
        |lane, id| {
            let d = done(&shm, id).load(Ordering::Relaxed);
            let seen = kv.get(&lane_key(lane), &mut v).then(|| check(&v, KV_FILL).expect("an intact value"));
            match seen {
                Some((w, c)) if w == id as u64 => {
                    assert!(c + 1 == d || c == d, "lane {lane}: writer {id} completed {d} sets, yet set {c} shows")
                }
                // Its first set never landed: the lane is as the previous writer left it.
                Some(other) => assert!(d == 0 && Some(other) == lane_last[lane], "lane {lane}: {other:?} after {id}"),
                // Killed inside a write: the entry is left odd, and skipped.
                None => torn_writes += 1,
            }
            lane_last[lane] = seen;
        },
    );
    // The next writer of each lane, not killed: its sets land as usual.
    for lane in 0..KV_LANES {
        let id = ids + lane;
        assert_eq!(wait(fork(|| kv_writer(&shm, lane, id, 10))), 0);
        assert!(kv.get(&lane_key(lane), &mut v));
        assert_eq!(check(&v, KV_FILL), Some((id as u64, 9)), "lane {lane}");
    }
    // Readers still make progress after all the deaths.
    let reads: Vec<u64> = (0..2).map(|r| result(&shm, r, R_READS).load(Ordering::Relaxed)).collect();
    for (r, before) in reads.into_iter().enumerate() {
        let moved = wait_until(READ_LIMIT, || result(&shm, r, R_READS).load(Ordering::Relaxed) > before);
        assert!(moved, "reader {r} stalled");
    }
    // Release: the readers' Acquire load.
    flag(&shm, F_STOP).store(1, Ordering::Release);
    for (r, pid) in readers.into_iter().enumerate() {
        assert_eq!(wait(pid), 0, "reader {r} (4: stalled)");
        assert_eq!(
            result(&shm, r, R_ERRORS).load(Ordering::Relaxed),
            0,
            "reader {r}: a torn value or a lane going back"
        );
    }
    eprintln!("{kills} kills, {torn_writes} left a lane unreadable, lock steals {}", shm.at::<PidLock>(LOCK).steals());
}
