//! The ring's reader on a region whose bytes are attacker-controlled: a
//! valid ring is laid out and fed a few records, then the input patches any
//! bytes of it (header positions, reader slots, record headers, payloads),
//! and every reader reads until the ring says it is empty. Reading must
//! never panic, never touch memory outside the region, and always end.

#![no_main]

use libfuzzer_sys::fuzz_target;
use workerbus::shm::lock::NoLock;
use workerbus::shm::ring::{Next, RecordIn, RecordOut, Ring};

const CAPACITY: usize = 4096;
const READERS: usize = 4;

fuzz_target!(|input: &[u8]| {
    let len = Ring::region_size(CAPACITY, READERS);
    // u64 words: the region's alignment.
    let mut mem = vec![0u64; len.div_ceil(8)];
    let base = mem.as_mut_ptr() as *mut u8;
    // SAFETY: mem is writable for len bytes, used by this thread only, and
    // outlives every handle made below.
    let Ok(ring) = (unsafe { Ring::init(base, len, CAPACITY, READERS) }) else { return };
    let mut it = input.iter().copied();
    // First byte: how many records to post (their sizes from the next bytes).
    let posts = it.next().unwrap_or(0) % 64;
    for i in 0..posts {
        let n = usize::from(it.next().unwrap_or(0));
        let data = vec![i; n];
        let rec = RecordIn { source: b"fuzz", event: b"e", unique: b"", data: &data, pid: 1, flags: 0 };
        let _ = ring.post(&NoLock, &rec);
    }
    for slot in 0..READERS {
        if let Some(rd) = ring.reader(slot) {
            rd.set_cursor(1);
        }
    }
    // The rest: patches of (offset u16 LE, length u8, bytes).
    let rest: Vec<u8> = it.collect();
    let mut i = 0;
    while i + 3 <= rest.len() {
        let off = usize::from(u16::from_le_bytes([rest[i], rest[i + 1]])) % len;
        let n = usize::from(rest[i + 2]);
        let bytes = &rest[(i + 3).min(rest.len())..(i + 3 + n).min(rest.len())];
        let end = (off + bytes.len()).min(len);
        // SAFETY: off..end is inside the region (clamped above).
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(off), end - off) };
        i += 3 + n;
    }
    // SAFETY: as for init; attach re-checks what the patches may have broken.
    let Ok(ring) = (unsafe { Ring::attach(base, len) }) else { return };
    let _ = ring.stats();
    let _ = ring.oldest_seq();
    let mut buf = vec![0u8; 512];
    for slot in 0..ring.max_readers() {
        let Some(rd) = ring.reader(slot) else { continue };
        let _ = (rd.stats(), rd.pending(), rd.cursor());
        let mut out = RecordOut::default();
        // Each call makes progress or reports empty: a bound far above the
        // records a 4 KiB ring can hold shows it ends.
        let mut ended = false;
        for _ in 0..10_000 {
            match rd.next(&mut out, &mut buf) {
                Next::Empty => {
                    ended = true;
                    break;
                }
                Next::TooSmall(n) => {
                    assert!(n > buf.len(), "TooSmall({n}) with a {}-byte buffer", buf.len());
                    // Never more than a record can hold, whatever the zone says.
                    assert!(n <= ring.max_record_payload(), "TooSmall({n}) beyond the largest record");
                    buf.resize(n, 0);
                }
                Next::Record => {
                    let total = out.source_len as usize + out.event_len as usize + out.unique_len as usize + out.data_len as usize;
                    assert!(total <= buf.len(), "a record longer than the buffer it was copied to");
                }
                Next::Lagged(_) => {}
            }
        }
        assert!(ended, "reader {slot} never reported empty");
    }
});
