//! Unique-event claims: the first process to claim a key handles the event;
//! the key stays claimed until its expiry.
//!
//! A fixed open-addressing table of (hash, second hash, expiry) entries. A
//! key lives within MAX_PROBE entries of its home slot, so a claim looks at
//! no more than that many, whatever the table holds: O(1) under the lock.
//! A claim never fails for want of room: when every entry of its window
//! holds a live claim of another key, it takes the entry nearest its expiry
//! (that key's duplicates may then be handled once more; counted as
//! `evicted`), so a unique event is never dropped.
//! Claims are rare and must be exact, so they serialize through the zone's
//! `ShmLock` (force-unlocked by nginx when a holder dies). A claimer that
//! dies mid-write leaves at worst an entry that names no real key or that
//! is already expired: it is reused once expired, never wedged. Two 64-bit
//! hashes of different construction make a false match (one key refused
//! because of another) negligible (~2^-128 per pair of keys).
//!
//! Entries are never emptied, only reused once expired (or evicted), so a
//! never-used entry ends a probe chain early.

use core::fmt;
use core::mem::size_of;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::lock::ShmLock;

pub const CLAIMS_MAGIC: u64 = u64::from_be_bytes(*b"wbclaim\0");
/// Bumped whenever `ClaimsHeader` or `ClaimEntry` changes.
pub const CLAIMS_LAYOUT: u32 = 2;
/// Entries a claim examines at most: a key is stored within this many
/// entries of its home slot.
pub const MAX_PROBE: usize = 32;
/// A zone's table size unless configured otherwise.
pub const DEFAULT_ENTRIES: usize = 1024;
pub const MAX_ENTRIES: usize = 1 << 20;

#[repr(C)]
struct ClaimsHeader {
    magic: AtomicU64,
    layout: AtomicU32,
    entries: AtomicU32,
    region_len: AtomicU64,
    /// Claims won, refused (held by someone else), and won by evicting
    /// the live claim nearest its expiry.
    won: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
}

#[repr(C)]
struct ClaimEntry {
    /// 0: never used.
    h1: AtomicU64,
    h2: AtomicU64,
    /// Claimed while `now_ms < expires_ms`.
    expires_ms: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimsError {
    Misaligned,
    BadEntries(usize),
    RegionTooSmall { need: usize, have: usize },
    NotClaims,
    Layout { found: u32, expected: u32 },
    RegionSize { found: u64, expected: u64 },
}

impl fmt::Display for ClaimsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimsError::Misaligned => write!(f, "claims region is not 8-byte aligned"),
            ClaimsError::BadEntries(n) => write!(f, "claims entries {n} is not between 1 and {MAX_ENTRIES}"),
            ClaimsError::RegionTooSmall { need, have } => {
                write!(f, "claims region of {have} bytes is smaller than the {need} bytes needed")
            }
            ClaimsError::NotClaims => write!(f, "region holds no claims table"),
            ClaimsError::Layout { found, expected } => {
                write!(f, "claims table has layout {found} but this module uses layout {expected}")
            }
            ClaimsError::RegionSize { found, expected } => {
                write!(f, "claims table was made for a {found}-byte region, not {expected}")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClaimsStats {
    pub entries: u32,
    /// Entries claimed and not yet expired at `now_ms`.
    pub live: u32,
    pub won: u64,
    pub refused: u64,
    /// Claims that took the entry of a live claim (nearest its expiry).
    pub evicted: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    Won,
    Refused,
    Evicted,
}

/// A handle to a claims table in a mapped region.
#[derive(Clone, Copy)]
pub struct Claims {
    base: *mut u8,
    entries: usize,
}

// SAFETY: the handle holds the region's address and its immutable size;
// every shared field is an atomic.
unsafe impl Send for Claims {}
// SAFETY: as above.
unsafe impl Sync for Claims {}

/// A stable 64-bit hash (the same in every build, unlike std's hasher).
fn hash(key: &[u8], seed: u64, mul: u64) -> u64 {
    let mut h = seed ^ (key.len() as u64).wrapping_mul(mul);
    for chunk in key.chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(mul);
        h ^= h >> 29;
    }
    // splitmix64's finalizer.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn hashes(key: &[u8]) -> (u64, u64) {
    let h1 = hash(key, 0x243f_6a88_85a3_08d3, 0x9e37_79b9_7f4a_7c15).max(1);
    let h2 = hash(key, 0x1319_8a2e_0370_7344, 0xc2b2_ae3d_27d4_eb4f);
    (h1, h2)
}

impl Claims {
    pub const fn region_size(entries: usize) -> usize {
        size_of::<ClaimsHeader>() + entries * size_of::<ClaimEntry>()
    }

    /// Lays out a fresh table.
    ///
    /// # Safety
    /// `base..base+len` is writable shared memory, mapped for as long as any
    /// handle is used, and not in use by anyone else during `init`.
    pub unsafe fn init(base: *mut u8, len: usize, entries: usize) -> Result<Claims, ClaimsError> {
        if base.is_null() || !(base as usize).is_multiple_of(8) {
            return Err(ClaimsError::Misaligned);
        }
        if !(1..=MAX_ENTRIES).contains(&entries) {
            return Err(ClaimsError::BadEntries(entries));
        }
        let need = Claims::region_size(entries);
        if len < need {
            return Err(ClaimsError::RegionTooSmall { need, have: len });
        }
        let c = Claims { base, entries };
        let h = c.header();
        // Relaxed: nobody else uses the region during init; `magic` publishes.
        h.layout.store(CLAIMS_LAYOUT, Ordering::Relaxed);
        h.entries.store(entries as u32, Ordering::Relaxed);
        h.region_len.store(len as u64, Ordering::Relaxed);
        for a in [&h.won, &h.refused, &h.evicted] {
            a.store(0, Ordering::Relaxed);
        }
        for i in 0..entries {
            if let Some(e) = c.entry(i) {
                for a in [&e.h1, &e.h2, &e.expires_ms] {
                    a.store(0, Ordering::Relaxed);
                }
            }
        }
        // Release: a process that sees the magic sees the fields above.
        h.magic.store(CLAIMS_MAGIC, Ordering::Release);
        Ok(c)
    }

    /// A table laid out earlier; checks magic, layout and region size.
    ///
    /// # Safety
    /// As for `init`, except that the region is in use by others.
    pub unsafe fn attach(base: *mut u8, len: usize) -> Result<Claims, ClaimsError> {
        if base.is_null() || !(base as usize).is_multiple_of(8) {
            return Err(ClaimsError::Misaligned);
        }
        if len < size_of::<ClaimsHeader>() {
            return Err(ClaimsError::RegionTooSmall { need: size_of::<ClaimsHeader>(), have: len });
        }
        // SAFETY: aligned, and the region holds a header (checked above);
        // every field is an atomic, valid for any bits.
        let h = unsafe { &*(base as *const ClaimsHeader) };
        // Acquire: pairs with the Release in `init`.
        if h.magic.load(Ordering::Acquire) != CLAIMS_MAGIC {
            return Err(ClaimsError::NotClaims);
        }
        // Relaxed (below): written once before the magic.
        let layout = h.layout.load(Ordering::Relaxed);
        if layout != CLAIMS_LAYOUT {
            return Err(ClaimsError::Layout { found: layout, expected: CLAIMS_LAYOUT });
        }
        let region_len = h.region_len.load(Ordering::Relaxed);
        if region_len != len as u64 {
            return Err(ClaimsError::RegionSize { found: region_len, expected: len as u64 });
        }
        let entries = h.entries.load(Ordering::Relaxed) as usize;
        if !(1..=MAX_ENTRIES).contains(&entries) {
            return Err(ClaimsError::BadEntries(entries));
        }
        let need = Claims::region_size(entries);
        if need > len {
            return Err(ClaimsError::RegionTooSmall { need, have: len });
        }
        Ok(Claims { base, entries })
    }

    fn header(&self) -> &ClaimsHeader {
        // SAFETY: init/attach checked alignment and size; the region stays
        // mapped (their contract); every field is an atomic.
        unsafe { &*(self.base as *const ClaimsHeader) }
    }

    fn entry(&self, i: usize) -> Option<&ClaimEntry> {
        if i >= self.entries {
            return None;
        }
        // SAFETY: entry i lies inside the region (region_size covers
        // `entries` entries), 8-aligned, atomics only.
        Some(unsafe { &*(self.base.add(size_of::<ClaimsHeader>() + i * size_of::<ClaimEntry>()) as *const ClaimEntry) })
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// True for the first claimer of `key` (it then holds the key until
    /// `now_ms + ttl_ms`), false while someone else holds it. Never fails:
    /// see the module's notes on eviction.
    /// `now_ms` must come from one clock shared by all processes (monotonic).
    pub fn claim<L: ShmLock>(&self, lock: &L, key: &[u8], now_ms: u64, ttl_ms: u64) -> bool {
        self.claim_probing(lock, key, now_ms, ttl_ms).0
    }

    /// As `claim`, and how many entries it examined.
    fn claim_probing<L: ShmLock>(&self, lock: &L, key: &[u8], now_ms: u64, ttl_ms: u64) -> (bool, usize) {
        let (h1, h2) = hashes(key);
        let expires = now_ms.saturating_add(ttl_ms);
        let guard = lock.guard();
        let (r, probes) = self.claim_locked(h1, h2, now_ms, expires);
        drop(guard);
        let h = self.header();
        // Relaxed: statistics.
        match r {
            Claim::Won => h.won.fetch_add(1, Ordering::Relaxed),
            Claim::Refused => h.refused.fetch_add(1, Ordering::Relaxed),
            Claim::Evicted => {
                h.won.fetch_add(1, Ordering::Relaxed);
                h.evicted.fetch_add(1, Ordering::Relaxed)
            }
        };
        (r != Claim::Refused, probes)
    }

    fn claim_locked(&self, h1: u64, h2: u64, now_ms: u64, expires: u64) -> (Claim, usize) {
        let start = (h1 % self.entries as u64) as usize;
        let window = MAX_PROBE.min(self.entries);
        let mut free = None;
        // The live entry nearest its expiry, taken when nothing is free.
        let mut nearest: Option<(&ClaimEntry, u64)> = None;
        let mut probes = 0;
        for i in 0..window {
            let Some(e) = self.entry((start + i) % self.entries) else { break };
            probes += 1;
            // Relaxed (all entry accesses): the lock orders every writer.
            let eh1 = e.h1.load(Ordering::Relaxed);
            if eh1 == 0 {
                free = free.or(Some(e));
                break; // end of the probe chain: the key is nowhere further
            }
            let exp = e.expires_ms.load(Ordering::Relaxed);
            let live = exp > now_ms;
            if eh1 == h1 && e.h2.load(Ordering::Relaxed) == h2 {
                if live {
                    return (Claim::Refused, probes);
                }
                e.expires_ms.store(expires, Ordering::Relaxed);
                return (Claim::Won, probes);
            }
            if !live && free.is_none() {
                free = Some(e); // reusable, but the key may still be further on
            }
            if live && nearest.is_none_or(|(_, x)| exp < x) {
                nearest = Some((e, exp));
            }
        }
        let (e, how) = match (free, nearest) {
            (Some(e), _) => (e, Claim::Won),
            (None, Some((e, _))) => (e, Claim::Evicted),
            (None, None) => return (Claim::Won, probes), // no entry at all: cannot happen (entries >= 1)
        };
        e.h1.store(h1, Ordering::Relaxed);
        e.h2.store(h2, Ordering::Relaxed);
        e.expires_ms.store(expires, Ordering::Relaxed);
        (how, probes)
    }

    /// Whether `key` is claimed at `now_ms`. No lock: a snapshot.
    pub fn is_claimed(&self, key: &[u8], now_ms: u64) -> bool {
        let (h1, h2) = hashes(key);
        let start = (h1 % self.entries as u64) as usize;
        for i in 0..MAX_PROBE.min(self.entries) {
            let Some(e) = self.entry((start + i) % self.entries) else { break };
            // Relaxed: a snapshot; a claim racing with this call may or may not show.
            let eh1 = e.h1.load(Ordering::Relaxed);
            if eh1 == 0 {
                break;
            }
            if eh1 == h1 && e.h2.load(Ordering::Relaxed) == h2 && e.expires_ms.load(Ordering::Relaxed) > now_ms {
                return true;
            }
        }
        false
    }

    pub fn stats(&self, now_ms: u64) -> ClaimsStats {
        let h = self.header();
        let live = (0..self.entries)
            .filter_map(|i| self.entry(i))
            // Relaxed: a status snapshot.
            .filter(|e| e.h1.load(Ordering::Relaxed) != 0 && e.expires_ms.load(Ordering::Relaxed) > now_ms)
            .count() as u32;
        // Relaxed: statistics.
        ClaimsStats {
            entries: self.entries as u32,
            live,
            won: h.won.load(Ordering::Relaxed),
            refused: h.refused.load(Ordering::Relaxed),
            evicted: h.evicted.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;

    fn table(entries: usize) -> (Vec<u64>, Claims) {
        let len = Claims::region_size(entries);
        let mut mem = vec![0u64; len / 8];
        // SAFETY: the Vec is ours, 8-aligned, and outlives the handle in each test.
        let c = unsafe { Claims::init(mem.as_mut_ptr() as *mut u8, len, entries) }.unwrap();
        (mem, c)
    }

    #[test]
    fn first_claimer_wins_until_expiry() {
        let (_m, c) = table(16);
        assert!(c.claim(&NoLock, b"k", 1000, 500));
        assert!(!c.claim(&NoLock, b"k", 1001, 500));
        assert!(c.claim(&NoLock, b"other", 1001, 500));
        assert!(c.is_claimed(b"k", 1499));
        assert!(!c.is_claimed(b"k", 1500));
        assert!(c.claim(&NoLock, b"k", 1500, 500), "expired: claimable again");
        assert!(!c.claim(&NoLock, b"k", 1999, 500));
        assert!(c.claim(&NoLock, b"", 0, 10), "the empty key is a key like any other");
        let st = c.stats(1600);
        assert_eq!((st.live, st.won, st.refused, st.evicted), (1, 4, 2, 0), "only k (until 2000) is live");
    }

    #[test]
    fn a_full_table_evicts_the_claim_nearest_expiry_and_never_refuses_a_new_key() {
        let (_m, c) = table(8);
        for i in 0..8u32 {
            assert!(c.claim(&NoLock, &i.to_le_bytes(), 0, 100 + i as u64));
        }
        // Every entry is live: the ninth key takes the entry expiring first (key 0).
        assert!(c.claim(&NoLock, b"ninth", 50, 100));
        assert!(!c.claim(&NoLock, b"ninth", 60, 100), "the ninth key is held now");
        assert!(!c.claim(&NoLock, &7u32.to_le_bytes(), 60, 100), "the other keys keep their claims");
        assert!(c.claim(&NoLock, &0u32.to_le_bytes(), 60, 100), "the evicted key lost its claim early");
        assert_eq!(c.stats(60).evicted, 2);
    }

    #[test]
    fn many_more_keys_than_entries_in_one_timeout_are_all_claimed_in_bounded_steps() {
        let (_m, c) = table(1024);
        let mut worst = 0;
        for i in 0..100_000u32 {
            let key = format!("key-{i}");
            let (won, probes) = c.claim_probing(&NoLock, key.as_bytes(), 1000, 60_000);
            assert!(won, "unique event {i} would have been dropped");
            worst = worst.max(probes);
            // A second worker reading the same event right after is refused.
            assert!(!c.claim(&NoLock, key.as_bytes(), 1001, 60_000));
        }
        assert!(worst <= MAX_PROBE, "a claim examined {worst} entries");
        let st = c.stats(1001);
        assert_eq!((st.won, st.refused), (100_000, 100_000));
    }

    #[test]
    fn attach_checks_the_region() {
        let (mut m, c) = table(32);
        let (p, len) = (m.as_mut_ptr() as *mut u8, Claims::region_size(32));
        assert!(c.claim(&NoLock, b"kept", 0, 1000));
        // SAFETY (all): the region is ours; bad sizes are refused before access.
        unsafe {
            let again = Claims::attach(p, len).unwrap();
            assert!(!again.claim(&NoLock, b"kept", 1, 1000));
            assert_eq!(
                Claims::attach(p, len + 8).err(),
                Some(ClaimsError::RegionSize { found: len as u64, expected: len as u64 + 8 })
            );
            (*(p as *const ClaimsHeader)).layout.store(9, Ordering::Relaxed);
            assert_eq!(
                Claims::attach(p, len).err().map(|e| e.to_string()),
                Some(format!("claims table has layout 9 but this module uses layout {CLAIMS_LAYOUT}"))
            );
            assert_eq!(Claims::init(p, len, 0).err(), Some(ClaimsError::BadEntries(0)));
            assert_eq!(Claims::attach(p.add(8), len - 8).err(), Some(ClaimsError::NotClaims));
        }
    }

    #[test]
    fn hashes_are_stable_and_distinct() {
        // Fixed values: a kept zone must hash keys the same after an upgrade.
        assert_eq!(hashes(b"abc"), (663322431001784909, 12601403168741882646));
        assert_ne!(hashes(b"abc"), hashes(b"abd"));
        assert_ne!(hashes(b""), hashes(b"\0"));
        assert_ne!(hashes(b"12345678"), hashes(b"123456780"));
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            assert!(seen.insert(hashes(format!("key-{i}").as_bytes()).0));
        }
    }
}
