//! A small fixed table of named values in the zone: flags, markers and
//! settings that Lua code wants every worker (and the next generation, since
//! zones survive reloads) to see. Not a cache: few entries, small values.
//!
//! Writers serialize through the zone's lock; readers take no lock and use a
//! per-entry sequence count (odd while a write is in progress) to detect and
//! retry torn reads. A writer that dies mid-write leaves the count odd: the
//! next writer of that entry, holding the lock, knows nobody else is writing
//! and simply completes its own write, making the count even again. Each
//! entry names its last writer, so a reader that finds an odd count left by a
//! dead process skips the entry at once instead of spinning.

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering, fence};

use super::lock::ShmLock;
use super::racy;

pub const KV_ENTRIES: usize = 32;
pub const KV_KEY_MAX: usize = 64;
pub const KV_VALUE_MAX: usize = 512;

#[repr(C)]
pub struct KvEntry {
    /// Even: stable. Odd: a write is in progress.
    seq: AtomicU64,
    /// pid of the process that made the count odd last.
    writer: AtomicI32,
    _pad: u32,
    key_len: AtomicU32,
    value_len: AtomicU32,
    key: [AtomicU64; KV_KEY_MAX / 8],
    value: [AtomicU64; KV_VALUE_MAX / 8],
}

#[repr(C)]
pub struct Kv {
    entries: [KvEntry; KV_ENTRIES],
}

#[derive(Debug, PartialEq, Eq)]
pub enum KvError {
    EmptyKey,
    KeyTooLong(usize),
    ValueTooLong(usize),
    Full,
}

impl core::fmt::Display for KvError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            KvError::EmptyKey => write!(f, "empty key"),
            KvError::KeyTooLong(n) => write!(f, "key of {n} bytes is longer than {KV_KEY_MAX}"),
            KvError::ValueTooLong(n) => write!(f, "value of {n} bytes is longer than {KV_VALUE_MAX}"),
            KvError::Full => write!(f, "all {KV_ENTRIES} entries are in use"),
        }
    }
}

impl KvEntry {
    /// A consistent copy of (key, value), or None if the entry is empty or
    /// was left half-written by a dead writer. `spins` counts the waits.
    fn read(&self, key: &mut Vec<u8>, value: &mut Vec<u8>, alive: &dyn Fn(i32) -> bool, spins: &mut u32) -> Option<()> {
        // A live writer holds an entry odd for well under a microsecond
        // (longer only if it is descheduled: then yield to it); a dead one
        // until the next write, so its entry is skipped at once.
        loop {
            // Acquire: the words read below are at least as new as this count.
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                // Relaxed: written before the odd count, whose Acquire load is above.
                if !alive(self.writer.load(Ordering::Relaxed)) || *spins >= MAX_ODD_SPINS {
                    return None;
                }
                *spins += 1;
                if spins.is_multiple_of(64) {
                    // SAFETY: sched_yield has no preconditions.
                    unsafe { libc::sched_yield() };
                } else {
                    core::hint::spin_loop();
                }
                continue;
            }
            let klen = (self.key_len.load(Ordering::Relaxed) as usize).min(KV_KEY_MAX);
            let vlen = (self.value_len.load(Ordering::Relaxed) as usize).min(KV_VALUE_MAX);
            // Racy copies (see racy.rs): the count re-check below validates them.
            racy::load_vec(&self.key, klen, key);
            racy::load_vec(&self.value, vlen, value);
            // Acquire fence: the loads above complete before the re-check.
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return if klen == 0 { None } else { Some(()) };
            }
        }
    }

    fn write(&self, key: &[u8], value: &[u8]) {
        // Relaxed: ordered before the odd count by the Release fence below.
        // SAFETY: getpid has no preconditions.
        self.writer.store(unsafe { libc::getpid() }, Ordering::Relaxed);
        let s = self.seq.load(Ordering::Relaxed);
        let odd = s | 1;
        // Relaxed + Release fence: readers that see any new word see the odd count.
        self.seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        self.key_len.store(key.len() as u32, Ordering::Relaxed);
        self.value_len.store(value.len() as u32, Ordering::Relaxed);
        racy::store(&self.key, &[key]);
        racy::store(&self.value, &[value]);
        // Release: publishes the words with the even count.
        self.seq.store(odd + 1, Ordering::Release);
    }
}

/// Waits on a live writer's odd count before a read gives up on the entry.
const MAX_ODD_SPINS: u32 = 100_000;

impl Kv {
    pub fn get(&self, key: &[u8], out: &mut Vec<u8>) -> bool {
        self.get_with(key, out, &super::lifecycle::pid_alive, &mut 0)
    }

    fn get_with(&self, key: &[u8], out: &mut Vec<u8>, alive: &dyn Fn(i32) -> bool, spins: &mut u32) -> bool {
        let mut k = Vec::with_capacity(KV_KEY_MAX);
        for e in &self.entries {
            if e.read(&mut k, out, alive, spins).is_some() && k == key {
                return true;
            }
        }
        out.clear();
        false
    }

    pub fn set<L: ShmLock>(&self, lock: &L, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::EmptyKey);
        }
        if key.len() > KV_KEY_MAX {
            return Err(KvError::KeyTooLong(key.len()));
        }
        if value.len() > KV_VALUE_MAX {
            return Err(KvError::ValueTooLong(value.len()));
        }
        let guard = lock.guard();
        let r = self.set_locked(key, value);
        drop(guard);
        r
    }

    fn set_locked(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        let (mut k, mut v) = (Vec::with_capacity(KV_KEY_MAX), Vec::new());
        let mut free = None;
        for e in &self.entries {
            // Relaxed: under the lock no other writer runs.
            let klen = e.key_len.load(Ordering::Relaxed);
            if klen == 0 || e.seq.load(Ordering::Relaxed) & 1 == 1 {
                // Empty, or abandoned by a dead writer: reusable.
                free = free.or(Some(e));
                continue;
            }
            if e.read(&mut k, &mut v, &|_| true, &mut 0).is_some() && k == key {
                e.write(key, value);
                return Ok(());
            }
        }
        let e = free.ok_or(KvError::Full)?;
        e.write(key, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;

    fn kv() -> Box<Kv> {
        // SAFETY: atomics only; all-zero is the empty table.
        unsafe { Box::new(core::mem::zeroed()) }
    }

    #[test]
    fn set_get_overwrite() {
        let t = kv();
        let mut out = vec![];
        assert!(!t.get(b"a", &mut out));
        t.set(&NoLock, b"a", b"one").unwrap();
        t.set(&NoLock, b"b", b"").unwrap();
        t.set(&NoLock, b"a", b"two, longer than eight bytes").unwrap();
        assert!(t.get(b"a", &mut out));
        assert_eq!(out, b"two, longer than eight bytes");
        assert!(t.get(b"b", &mut out));
        assert_eq!(out, b"");
    }

    #[test]
    fn bad_input_and_full() {
        let t = kv();
        assert_eq!(t.set(&NoLock, b"", b"x"), Err(KvError::EmptyKey));
        assert_eq!(t.set(&NoLock, &[b'k'; 65], b"x"), Err(KvError::KeyTooLong(65)));
        assert_eq!(t.set(&NoLock, b"k", &[0; 513]), Err(KvError::ValueTooLong(513)));
        for i in 0..KV_ENTRIES {
            t.set(&NoLock, format!("k{i}").as_bytes(), b"v").unwrap();
        }
        assert_eq!(t.set(&NoLock, b"one more", b"v"), Err(KvError::Full));
        assert_eq!(KvError::Full.to_string(), "all 32 entries are in use");
    }

    #[test]
    fn abandoned_write_is_reusable() {
        let t = kv();
        t.set(&NoLock, b"a", b"1").unwrap();
        // A writer died after making the count odd.
        t.entries[0].seq.fetch_add(1, Ordering::Relaxed);
        t.entries[0].writer.store(77, Ordering::Relaxed);
        let mut out = vec![];
        let mut spins = 0;
        assert!(!t.get_with(b"a", &mut out, &|p| p != 77, &mut spins));
        assert_eq!(spins, 0, "a dead writer's entry is skipped without waiting");
        let mut spins = 0;
        assert!(!t.get_with(b"a", &mut out, &|_| true, &mut spins));
        assert_eq!(spins, MAX_ODD_SPINS, "a live writer is waited for, within a bound");
        t.set(&NoLock, b"a", b"2").unwrap();
        assert!(t.get(b"a", &mut out));
        assert_eq!(out, b"2");
    }
}
