//! The sync store (resty.sync): per instance a lease that picks its runner,
//! per task (instance, tag) the last published update.
//!
//! An update — version, data, their Lua types, last-modified time and the
//! update's sequence number — is ONE block allocated in the zone's slab. The
//! runner fills a fresh block outside the lock, then publishes it by swapping
//! the task's block offset and sequence under the zone's lock, and frees the
//! old block there. Readers copy a block out under the same lock, so a block
//! is never freed while copied and a reader never sees the version of one
//! update with the data of another. Readers first compare the task's
//! sequence word (lock-free) with the one they copied last: a worker copies
//! data out only when it changed.
//!
//! Allocation is fallible: an update the zone cannot hold is refused with
//! its size and the zone's free bytes, and the previous one stays.

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use super::lease::Lease;
use super::lock::ShmLock;
use super::racy;

pub const SYNC_INSTANCES: usize = 32;
pub const SYNC_TASKS: usize = 128;
/// Longest instance key and tag, in bytes.
pub const SYNC_KEY_MAX: usize = 64;
/// Longest last error kept per task (longer ones are cut).
pub const SYNC_ERR_MAX: usize = 96;

/// The zone's allocator, as the store needs it. `alloc` and `free` are
/// called with the zone's lock held. Offsets are from the zone's header.
pub trait Slab {
    fn alloc(&self, len: usize) -> Option<u64>;
    fn free(&self, off: u64);
    fn free_bytes(&self) -> usize;
    fn at(&self, off: u64) -> *mut u8;
}

#[repr(C)]
pub struct Instance {
    /// 0: unused. Stored (Release) after the key.
    key_len: AtomicU32,
    _pad: u32,
    key: [AtomicU64; SYNC_KEY_MAX / 8],
    pub lease: Lease,
    pub interval_ms: AtomicU64,
}

#[repr(C)]
pub struct Task {
    /// 0: unused. Stored (Release) after the key and instance.
    key_len: AtomicU32,
    instance: AtomicU32,
    key: [AtomicU64; SYNC_KEY_MAX / 8],
    /// Sequence of the published update (0: none yet); Lua reads its low
    /// 32 bits directly, so it is a u32 on its own 8 bytes.
    seq: AtomicU32,
    /// 1: a run of the task was asked for (resty.sync's trigger) and not
    /// yet taken by the runner. Kept in the zone so that a trigger made
    /// while no live runner holds the lease reaches the next one. It sits
    /// where padding was: the layout is unchanged.
    trigger: AtomicU32,
    /// Offset of the published block (0: none).
    block: AtomicU64,
    /// A block being filled, and by whom: freed by the next writer if that
    /// writer died before publishing it.
    pending: AtomicU64,
    pending_pid: AtomicI32,
    last_pid: AtomicI32,
    /// Bytes of the published data.
    pub size: AtomicU64,
    /// When the update was published: wall clock (ms since the epoch), for
    /// display and get_last_modified_time only.
    pub modified_ms: AtomicU64,
    pub runs: AtomicU64,
    pub failures: AtomicU64,
    pub too_large: AtomicU64,
    /// When the last counted run started: monotonic ms (the schedule a new
    /// runner keeps), as resty.sync passes it.
    pub last_run_ms: AtomicU64,
    pub last_duration_us: AtomicU64,
    err_len: AtomicU32,
    _pad2: u32,
    err: [AtomicU64; SYNC_ERR_MAX / 8],
}

#[repr(C)]
pub struct SyncTable {
    pub instances: [Instance; SYNC_INSTANCES],
    pub tasks: [Task; SYNC_TASKS],
}

/// The head of a published block; version bytes then data bytes follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockHead {
    pub seq: u64,
    pub modified_ms: u64,
    pub vtype: u32,
    pub dtype: u32,
    pub vlen: u64,
    pub dlen: u64,
}

pub const HEAD: usize = size_of::<BlockHead>();

#[derive(Debug, PartialEq, Eq)]
pub enum SyncError {
    KeyTooLong(usize),
    EmptyKey,
    Full(&'static str, usize),
    TooLarge {
        size: usize,
        free: usize,
    },
    /// An instance or task index past the table (which, and the index).
    BadIndex(&'static str, usize),
}

impl core::fmt::Display for SyncError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SyncError::KeyTooLong(n) => write!(f, "name of {n} bytes is longer than {SYNC_KEY_MAX}"),
            SyncError::EmptyKey => write!(f, "empty name"),
            SyncError::Full(what, n) => write!(f, "all {n} sync {what} of the zone are in use"),
            SyncError::TooLarge { size, free } => {
                write!(f, "an update of {size} bytes does not fit: the zone has {free} bytes free")
            }
            SyncError::BadIndex(what, i) => write!(f, "bad sync {what} index {i}"),
        }
    }
}

fn key_eq(words: &[AtomicU64], len: &AtomicU32, key: &[u8], scratch: &mut Vec<u8>) -> bool {
    // Acquire: the key words were stored before the length.
    let n = len.load(Ordering::Acquire) as usize;
    if n != key.len() {
        return false;
    }
    racy::load_vec(words, n, scratch);
    scratch.as_slice() == key
}

fn check_key(key: &[u8]) -> Result<(), SyncError> {
    if key.is_empty() {
        return Err(SyncError::EmptyKey);
    }
    if key.len() > SYNC_KEY_MAX {
        return Err(SyncError::KeyTooLong(key.len()));
    }
    Ok(())
}

impl SyncTable {
    pub const fn region_size() -> usize {
        size_of::<SyncTable>()
    }

    /// # Safety
    /// `p` points to a zero-filled (or earlier laid out) `SyncTable` in
    /// memory that stays mapped while the reference is used.
    pub unsafe fn at<'a>(p: *mut u8) -> &'a SyncTable {
        // SAFETY: guaranteed by the caller; every field is an atomic.
        unsafe { &*(p as *const SyncTable) }
    }

    /// Index of the instance named `key`, made on first use.
    pub fn instance<L: ShmLock>(&self, lock: &L, key: &[u8]) -> Result<usize, SyncError> {
        check_key(key)?;
        let mut s = Vec::with_capacity(SYNC_KEY_MAX);
        let _g = lock.guard();
        let mut free = None;
        for (i, inst) in self.instances.iter().enumerate() {
            if key_eq(&inst.key, &inst.key_len, key, &mut s) {
                return Ok(i);
            }
            // Relaxed: under the lock, where instances are made.
            if free.is_none() && inst.key_len.load(Ordering::Relaxed) == 0 {
                free = Some(i);
            }
        }
        let i = free.ok_or(SyncError::Full("instances", SYNC_INSTANCES))?;
        let inst = &self.instances[i];
        racy::store(&inst.key, &[key]);
        // Release: the key words before the length that makes them visible.
        inst.key_len.store(key.len() as u32, Ordering::Release);
        Ok(i)
    }

    /// Index of task `tag` of instance `instance`, made on first use.
    pub fn task<L: ShmLock>(&self, lock: &L, instance: usize, tag: &[u8]) -> Result<usize, SyncError> {
        check_key(tag)?;
        if instance >= SYNC_INSTANCES {
            return Err(SyncError::BadIndex("instance", instance));
        }
        let mut s = Vec::with_capacity(SYNC_KEY_MAX);
        let _g = lock.guard();
        let mut free = None;
        for (i, t) in self.tasks.iter().enumerate() {
            // Relaxed: stored before key_len, which key_eq reads with Acquire.
            if key_eq(&t.key, &t.key_len, tag, &mut s) && t.instance.load(Ordering::Relaxed) as usize == instance {
                return Ok(i);
            }
            // Relaxed: under the lock, where tasks are made.
            if free.is_none() && t.key_len.load(Ordering::Relaxed) == 0 {
                free = Some(i);
            }
        }
        let i = free.ok_or(SyncError::Full("tasks", SYNC_TASKS))?;
        let t = &self.tasks[i];
        racy::store(&t.key, &[tag]);
        // Relaxed + Release below: published with the length.
        t.instance.store(instance as u32, Ordering::Relaxed);
        t.key_len.store(tag.len() as u32, Ordering::Release);
        Ok(i)
    }

    pub fn task_ref(&self, i: usize) -> Option<&Task> {
        self.tasks.get(i)
    }

    /// Publishes a new update of task `i`; returns its sequence number.
    /// `now_ms` is wall-clock: it only becomes the last-modified time.
    #[allow(clippy::too_many_arguments)]
    pub fn publish<L: ShmLock, S: Slab>(
        &self,
        lock: &L,
        slab: &S,
        i: usize,
        pid: i32,
        alive: impl Fn(i32) -> bool,
        vtype: u32,
        version: &[u8],
        dtype: u32,
        data: &[u8],
        now_ms: u64,
    ) -> Result<u32, SyncError> {
        let t = self.tasks.get(i).ok_or(SyncError::BadIndex("task", i))?;
        let size = HEAD + version.len() + data.len();
        let off = {
            let _g = lock.guard();
            // Relaxed: pending and pending_pid change only under the lock.
            let left = t.pending.load(Ordering::Relaxed);
            if left != 0 {
                let by = t.pending_pid.load(Ordering::Relaxed);
                if by == pid || !alive(by) {
                    slab.free(left);
                }
                // A live writer's block is left to it (it never happens with one runner).
                t.pending.store(0, Ordering::Relaxed);
            }
            let Some(off) = slab.alloc(size) else {
                t.too_large.fetch_add(1, Ordering::Relaxed);
                return Err(SyncError::TooLarge { size, free: slab.free_bytes() });
            };
            t.pending.store(off, Ordering::Relaxed);
            t.pending_pid.store(pid, Ordering::Relaxed);
            off
        };
        let p = slab.at(off);
        // SAFETY: `p` is a fresh block of `size` bytes that only this process
        // reaches until it is published below.
        unsafe {
            core::ptr::copy_nonoverlapping(version.as_ptr(), p.add(HEAD), version.len());
            core::ptr::copy_nonoverlapping(data.as_ptr(), p.add(HEAD + version.len()), data.len());
        }
        let _g = lock.guard();
        // Relaxed: under the lock, where updates are published.
        let seq = t.seq.load(Ordering::Relaxed).wrapping_add(1).max(1);
        let head = BlockHead {
            seq: seq as u64,
            modified_ms: now_ms,
            vtype,
            dtype,
            vlen: version.len() as u64,
            dlen: data.len() as u64,
        };
        // SAFETY: the head fits at the start of the block; still unpublished.
        unsafe { core::ptr::write_unaligned(p as *mut BlockHead, head) };
        let old = t.block.swap(off, Ordering::Relaxed);
        t.pending.store(0, Ordering::Relaxed);
        t.size.store(data.len() as u64, Ordering::Relaxed);
        t.modified_ms.store(now_ms, Ordering::Relaxed);
        t.last_pid.store(pid, Ordering::Relaxed);
        // Release: a reader that sees the new sequence and then takes the lock
        // copies this block (the lock orders the rest; this orders the hint).
        t.seq.store(seq, Ordering::Release);
        if old != 0 {
            slab.free(old);
        }
        Ok(seq)
    }

    /// Sequence number of task `i`'s update (0: none), read without the lock.
    pub fn seq(&self, i: usize) -> u32 {
        // Acquire: pairs with publish's Release.
        self.tasks.get(i).map_or(0, |t| t.seq.load(Ordering::Acquire))
    }

    /// Asks for a run of task `i` (false: no such task).
    pub fn trigger(&self, i: usize) -> bool {
        let Some(t) = self.tasks.get(i) else { return false };
        // Release: pairs with take_trigger's Acquire (what the caller did
        // before triggering is seen by the run that takes the trigger).
        t.trigger.store(1, Ordering::Release);
        true
    }

    /// Whether a run of task `i` was asked for; `take` clears the request.
    pub fn take_trigger(&self, i: usize, take: bool) -> bool {
        let Some(t) = self.tasks.get(i) else { return false };
        // Acquire (AcqRel for the swap): pairs with trigger's Release.
        if take { t.trigger.swap(0, Ordering::AcqRel) != 0 } else { t.trigger.load(Ordering::Acquire) != 0 }
    }

    /// Address of task `i`'s sequence word, for readers that poll it directly.
    pub fn seq_ptr(&self, i: usize) -> *const u32 {
        self.tasks.get(i).map_or(core::ptr::null(), |t| t.seq.as_ptr() as *const u32)
    }

    /// Calls `f` with the published block of task `i` (head, version,
    /// data) while holding the lock; None when nothing was published.
    pub fn read<L: ShmLock, S: Slab, R>(
        &self,
        lock: &L,
        slab: &S,
        i: usize,
        f: impl FnOnce(&BlockHead, &[u8], &[u8]) -> R,
    ) -> Option<R> {
        let t = self.tasks.get(i)?;
        let _g = lock.guard();
        // Relaxed: under the lock, where blocks are swapped and freed.
        let off = t.block.load(Ordering::Relaxed);
        if off == 0 {
            return None;
        }
        let p = slab.at(off);
        // SAFETY: a published block starts with its head, followed by vlen +
        // dlen bytes; the lock keeps it from being freed while we read.
        unsafe {
            let head = core::ptr::read_unaligned(p as *const BlockHead);
            let v = core::slice::from_raw_parts(p.add(HEAD), head.vlen as usize);
            let d = core::slice::from_raw_parts(p.add(HEAD + head.vlen as usize), head.dlen as usize);
            Some(f(&head, v, d))
        }
    }

    /// Counts a finished run of task `i`, with its error if it failed;
    /// `started_ms` is monotonic.
    pub fn record_run<L: ShmLock>(&self, lock: &L, i: usize, started_ms: u64, duration_us: u64, err: Option<&[u8]>) {
        let Some(t) = self.tasks.get(i) else { return };
        // Relaxed: statistics for status.
        t.runs.fetch_add(1, Ordering::Relaxed);
        t.last_run_ms.store(started_ms, Ordering::Relaxed);
        t.last_duration_us.store(duration_us, Ordering::Relaxed);
        if let Some(e) = err {
            t.failures.fetch_add(1, Ordering::Relaxed);
            let e = &e[..e.len().min(SYNC_ERR_MAX)];
            let _g = lock.guard();
            racy::store(&t.err, &[e]);
            t.err_len.store(e.len() as u32, Ordering::Relaxed);
        }
    }

    /// Every task in use: (index, instance key, tag).
    pub fn tasks_in_use(&self) -> Vec<(usize, usize, Vec<u8>)> {
        let mut out = vec![];
        for (i, t) in self.tasks.iter().enumerate() {
            // Acquire: the key words were stored before the length.
            let n = t.key_len.load(Ordering::Acquire) as usize;
            if n == 0 {
                continue;
            }
            let mut k = vec![];
            racy::load_vec(&t.key, n, &mut k);
            // Relaxed: stored before the length.
            out.push((i, t.instance.load(Ordering::Relaxed) as usize, k));
        }
        out
    }

    pub fn instance_key(&self, i: usize) -> Vec<u8> {
        let mut k = vec![];
        if let Some(inst) = self.instances.get(i) {
            // Acquire: the key words were stored before the length.
            racy::load_vec(&inst.key, inst.key_len.load(Ordering::Acquire) as usize, &mut k);
        }
        k
    }

    /// The last error of task `i` (taken under the lock: it is rewritten there).
    pub fn last_error<L: ShmLock>(&self, lock: &L, i: usize) -> Vec<u8> {
        let mut e = vec![];
        if let Some(t) = self.tasks.get(i) {
            let _g = lock.guard();
            // Relaxed: under the lock.
            racy::load_vec(&t.err, t.err_len.load(Ordering::Relaxed) as usize, &mut e);
        }
        e
    }

    pub fn last_pid(&self, i: usize) -> i32 {
        // Relaxed: a figure for status.
        self.tasks.get(i).map_or(0, |t| t.last_pid.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// A slab over a Vec: a first-fit list of live blocks, bounded in bytes.
    pub struct VecSlab {
        mem: RefCell<Vec<u8>>,
        live: RefCell<BTreeMap<u64, usize>>,
    }

    impl VecSlab {
        fn new(n: usize) -> VecSlab {
            VecSlab { mem: RefCell::new(vec![0; n]), live: RefCell::new(BTreeMap::new()) }
        }
        fn used(&self) -> usize {
            self.live.borrow().values().sum()
        }
    }

    impl Slab for VecSlab {
        fn alloc(&self, len: usize) -> Option<u64> {
            let cap = self.mem.borrow().len() as u64;
            let mut at = 8u64;
            for (&o, &l) in self.live.borrow().iter() {
                if at + len as u64 <= o {
                    break;
                }
                at = at.max(o + l as u64);
            }
            if at + len as u64 > cap {
                return None;
            }
            self.live.borrow_mut().insert(at, len);
            Some(at)
        }
        fn free(&self, off: u64) {
            assert!(self.live.borrow_mut().remove(&off).is_some(), "double free at {off}");
        }
        fn free_bytes(&self) -> usize {
            self.mem.borrow().len() - self.used()
        }
        fn at(&self, off: u64) -> *mut u8 {
            self.mem.borrow_mut().as_mut_ptr().wrapping_add(off as usize)
        }
    }

    fn table() -> Box<SyncTable> {
        // SAFETY: atomics only; all-zero is the empty table.
        unsafe { Box::new(core::mem::zeroed()) }
    }

    fn get(t: &SyncTable, s: &VecSlab, i: usize) -> Option<(BlockHead, Vec<u8>, Vec<u8>)> {
        t.read(&NoLock, s, i, |h, v, d| (*h, v.to_vec(), d.to_vec()))
    }

    #[test]
    fn names_are_found_again() {
        let t = table();
        let a = t.instance(&NoLock, b"sync#1").unwrap();
        let b = t.instance(&NoLock, b"sync#2").unwrap();
        assert_ne!(a, b);
        assert_eq!(t.instance(&NoLock, b"sync#1").unwrap(), a);
        let x = t.task(&NoLock, a, b"ex1").unwrap();
        let y = t.task(&NoLock, b, b"ex1").unwrap();
        assert_ne!(x, y);
        assert_eq!(t.task(&NoLock, a, b"ex1").unwrap(), x);
        assert_eq!(t.instance(&NoLock, &[b'k'; 65]), Err(SyncError::KeyTooLong(65)));
        assert_eq!(t.task(&NoLock, a, b""), Err(SyncError::EmptyKey));
        assert_eq!(t.tasks_in_use().len(), 2);
        assert_eq!(t.instance_key(b), b"sync#2");
    }

    #[test]
    fn publish_replaces_and_frees() {
        let t = table();
        let s = VecSlab::new(1 << 16);
        let i = t.task(&NoLock, 0, b"a").unwrap();
        assert_eq!(get(&t, &s, i), None);
        assert_eq!(t.seq(i), 0);
        let q1 = t.publish(&NoLock, &s, i, 1, |_| true, 1, b"v1", 2, b"data one", 1000).unwrap();
        let q2 = t.publish(&NoLock, &s, i, 1, |_| true, 2, b"7", 1, b"two", 2000).unwrap();
        assert_eq!((q1, q2, t.seq(i)), (1, 2, 2));
        let (h, v, d) = get(&t, &s, i).unwrap();
        assert_eq!((h.seq, h.modified_ms, h.vtype, h.dtype), (2, 2000, 2, 1));
        assert_eq!((v.as_slice(), d.as_slice()), (&b"7"[..], &b"two"[..]));
        assert_eq!(s.used(), HEAD + 4, "only the newest block is kept");
    }

    #[test]
    fn too_large_keeps_the_previous_update() {
        let t = table();
        let s = VecSlab::new(4096);
        let i = t.task(&NoLock, 0, b"a").unwrap();
        t.publish(&NoLock, &s, i, 1, |_| true, 1, b"v1", 1, b"small", 1).unwrap();
        let big = vec![7u8; 5000];
        let e = t.publish(&NoLock, &s, i, 1, |_| true, 1, b"v2", 1, &big, 2).unwrap_err();
        assert_eq!(e, SyncError::TooLarge { size: HEAD + 5002, free: 4096 - HEAD - 7 });
        assert!(e.to_string().starts_with("an update of 5042 bytes does not fit: the zone has"));
        let (h, v, d) = get(&t, &s, i).unwrap();
        assert_eq!((h.seq, v.as_slice(), d.as_slice()), (1, &b"v1"[..], &b"small"[..]));
        assert_eq!(t.tasks[i].too_large.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_dead_writers_block_is_freed_by_the_next() {
        let t = table();
        let s = VecSlab::new(1 << 16);
        let i = t.task(&NoLock, 0, b"a").unwrap();
        // A writer (pid 5) allocated and died before publishing.
        let off = s.alloc(100).unwrap();
        t.tasks[i].pending.store(off, Ordering::Relaxed);
        t.tasks[i].pending_pid.store(5, Ordering::Relaxed);
        t.publish(&NoLock, &s, i, 6, |p| p != 5, 1, b"v", 1, b"d", 1).unwrap();
        assert_eq!(s.used(), HEAD + 2);
    }

    #[test]
    fn triggers_are_kept_until_taken_and_coalesce() {
        let t = table();
        let i = t.task(&NoLock, 0, b"a").unwrap();
        let j = t.task(&NoLock, 0, b"b").unwrap();
        assert!(!t.take_trigger(i, false));
        assert!(t.trigger(i) && t.trigger(i));
        assert!(t.take_trigger(i, false), "a peek leaves it");
        assert!(!t.take_trigger(j, true), "per task");
        assert!(t.take_trigger(i, true), "two triggers, one run");
        assert!(!t.take_trigger(i, true));
        assert!(!t.trigger(SYNC_TASKS) && !t.take_trigger(SYNC_TASKS, true));
    }

    #[test]
    fn runs_and_errors_are_counted() {
        let t = table();
        let i = t.task(&NoLock, 0, b"a").unwrap();
        t.record_run(&NoLock, i, 10, 5, None);
        t.record_run(&NoLock, i, 20, 6, Some(b"boom"));
        let tk = &t.tasks[i];
        assert_eq!((tk.runs.load(Ordering::Relaxed), tk.failures.load(Ordering::Relaxed)), (2, 1));
        assert_eq!(t.last_error(&NoLock, i), b"boom");
        t.record_run(&NoLock, i, 30, 6, Some(&[b'x'; 200]));
        assert_eq!(t.last_error(&NoLock, i).len(), SYNC_ERR_MAX);
    }
}
