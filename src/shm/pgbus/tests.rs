//! The node's bridge state in a test region: queue, lease, record, registry.

use super::*;
use crate::shm::lock::NoLock;

fn region(q: usize) -> (Vec<u64>, usize) {
    let len = PgBus::region_size(q);
    (vec![0u64; len / 8 + 1], len)
}

#[test]
fn queue_keeps_order_and_wraps() {
    let (mut mem, len) = region(4096);
    // SAFETY: a zeroed, aligned region of len bytes.
    let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
    let l = NoLock;
    let mut next = 0u32;
    for round in 0..200 {
        let n = 1 + round % 7;
        for _ in 0..n {
            b.push(&l, format!("ch{next}").as_bytes(), &vec![b'x'; (next % 300) as usize]).unwrap();
            next += 1;
        }
        let (got, bytes) = b.peek(&l, 100, 1 << 20);
        assert_eq!(got.len(), n as usize);
        let first = next - n;
        for (i, q) in got.iter().enumerate() {
            assert_eq!(q.channel, format!("ch{}", first + i as u32).into_bytes());
            assert_eq!(q.payload.len(), ((first + i as u32) % 300) as usize);
        }
        b.consume(&l, got.len() as u64, bytes);
        assert_eq!(b.queue_len(), 0);
    }
}

#[test]
fn full_queue_is_an_error_and_counted() {
    let (mut mem, len) = region(4096);
    // SAFETY: as above.
    let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
    let l = NoLock;
    let mut ok = 0;
    while b.push(&l, b"c", &[b'p'; 100]).is_ok() {
        ok += 1;
    }
    assert!(ok > 30);
    let e = b.push(&l, b"c", b"p").unwrap_err();
    assert!(e.starts_with("post queue full ("), "{e}");
    assert_eq!(b.counters.queue_overflow.load(Ordering::Relaxed), 2);
}

#[test]
fn lease_wraps_the_shared_lease_with_slot_takeovers_and_state() {
    let (mut mem, len) = region(4096);
    // SAFETY: as above.
    let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
    let l = NoLock;
    let alive = |p: i32| p != 99;
    assert_eq!(b.try_lease(&l, 10, 0, 1, 1, 1000, 3000, alive), Lease::Acquired { from: 0 });
    assert_eq!(b.try_lease(&l, 11, 1, 1, 1, 1500, 3000, alive), Lease::Other(10));
    assert_eq!(b.try_lease(&l, 10, 0, 1, 1, 2000, 3000, alive), Lease::Held);
    // Expired.
    assert_eq!(b.try_lease(&l, 11, 1, 1, 1, 5001, 3000, alive), Lease::Acquired { from: 10 });
    assert_eq!(b.holder(), (11, 1));
    // Old generation cannot take it; new generation takes it at once.
    assert_eq!(b.try_lease(&l, 12, 0, 1, 2, 5002, 3000, alive), Lease::Other(11));
    assert_eq!(b.try_lease(&l, 13, 0, 2, 2, 5003, 3000, alive), Lease::Acquired { from: 11 });
    // Dead holder.
    b.set_state(ST_READY, 5003);
    b.release(&l, 12);
    assert_eq!((b.holder().0, b.state.load(Ordering::Relaxed)), (13, ST_READY), "not the holder: nothing");
    b.release(&l, 13);
    assert_eq!((b.holder().0, b.state.load(Ordering::Relaxed)), (0, ST_OFF));
    assert_eq!(b.try_lease(&l, 99, 0, 2, 2, 5004, 3000, alive), Lease::Acquired { from: 0 });
    assert_eq!(b.try_lease(&l, 14, 0, 2, 2, 5005, 3000, alive), Lease::Acquired { from: 99 });
    assert_eq!(b.counters.takeovers.load(Ordering::Relaxed), 3, "expired, old generation, dead: not free");
}

#[test]
fn durable_record_delivers_each_row_once_whatever_the_order() {
    let (mut mem, len) = region(4096);
    // SAFETY: as above.
    let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
    let l = NoLock;
    assert_eq!(b.replay_from(&l, 100, 105), Some(Horizon::default()));
    assert_eq!(b.track(&l, 7, 101, 1), Track::New);
    assert_eq!(b.track(&l, 7, 101, 1), Track::Duplicate);
    // A forged notification reusing id 8 does not hide the real row 8.
    assert_eq!(b.track(&l, 8, 1 << 40, 9), Track::New);
    assert_eq!(b.track(&l, 8, 102, 2), Track::New);
    // A row committed late (lower id, lower xid) is still new.
    assert_eq!(b.track(&l, 3, 99, 3), Track::New);
    assert_eq!(b.tracked_ids(&l).len(), 4);
    // The snapshot (xmin 101, xmax 110, 101 and 105 in progress) was
    // taken after those arrived: 3 and 8 are covered, 7 (xid 101) is
    // still remembered, the forged xid is dropped as forged.
    let e = b.begin_snapshot(&l);
    assert_eq!(b.advance(&l, &Horizon { lo: 101, hi: 110, xip: vec![101, 105] }, e), 1);
    assert_eq!(b.durable_figures(), (101, 110, 1));
    assert_eq!(b.track(&l, 3, 99, 3), Track::Duplicate);
    assert_eq!(b.track(&l, 8, 102, 2), Track::Duplicate);
    assert_eq!(b.track(&l, 7, 101, 1), Track::Duplicate);
    // A late commit of transaction 105 is new.
    assert_eq!(b.track(&l, 5, 105, 1), Track::New);
    // The server's ids went backwards: the record is reset.
    assert_eq!(b.replay_from(&l, 5, 50), None);
    assert_eq!(b.durable_figures(), (5, 5, 0));
    assert_eq!(b.counters.rebases.load(Ordering::Relaxed), 1);
    assert_eq!(b.track(&l, 8, 102, 2), Track::New);
}

#[test]
fn durable_record_full_delivers_and_counts() {
    let (mut mem, len) = region(4096);
    // SAFETY: as above.
    let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
    let l = NoLock;
    let mut untracked = 0;
    for id in 1..=(TRACKED as u64 + 10) {
        match b.track(&l, id, 10 + id, 0) {
            Track::New => {}
            Track::Untracked => untracked += 1,
            Track::Duplicate => panic!("{id} is new"),
        }
    }
    assert_eq!(untracked, 11);
    assert_eq!(b.counters.track_overflow.load(Ordering::Relaxed), 11);
}

#[test]
fn registry_adds_touches_and_frees() {
    let (mut mem, len) = region(4096);
    // SAFETY: as above.
    let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
    let l = NoLock;
    assert_eq!(b.want_channel(&l, b"a", 1), Ok(true));
    assert_eq!(b.want_channel(&l, b"a", 2), Ok(false));
    assert!(b.want_channel(&l, b"", 2).is_err());
    b.set_channel(&l, b"a", CH_LISTENING);
    assert!(b.is_listening(&l, b"a"));
    assert_eq!(b.channels(&l), vec![(b"a".to_vec(), CH_LISTENING, 2)]);
    b.all_wanted(&l);
    assert!(!b.is_listening(&l, b"a"));
    b.set_channel(&l, b"a", CH_FREE);
    assert!(b.channels(&l).is_empty());
}
