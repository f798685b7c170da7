//! Helpers for tests that fork real processes over one shared mapping.

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// An anonymous `MAP_SHARED` mapping: zero-filled, page-aligned, shared
/// with every child forked while it exists.
pub struct Shm {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Shm {
    pub fn new(len: usize) -> Shm {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes failed");
        Shm { ptr: p as *mut u8, len }
    }

    /// A `T` at byte offset `off` (T: atomics only, so any bits are valid).
    pub fn at<T>(&self, off: usize) -> &T {
        assert!(off + size_of::<T>() <= self.len && off.is_multiple_of(align_of::<T>()));
        // SAFETY: in bounds and aligned (asserted); callers use atomic types only.
        unsafe { &*(self.ptr.add(off) as *const T) }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer referenced (children have exited).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Fork tests run one at a time: a child inherits only the forking thread,
/// so other test threads must not be busy (holding malloc's lock, say).
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` in a child process, which exits with its return value (101 if
/// it panics). Returns the child's pid.
pub fn fork(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `f` and then _exit, never returning into
    // the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: _exit skips atexit handlers and stdio flushing of the
        // parent's copied state, which is what a forked child wants.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for `pid`: its exit code, or 128 + the signal that killed it.
pub fn wait(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid({pid})");
    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) }
}

pub fn my_pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Waits until `cond` holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

pub fn yield_cpu() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// FNV-style running checksum of a stream of u64s.
pub fn mix(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(17)
}

/// SIGKILLs our child `pid` and reaps it: its exit status (128 + 9 unless
/// it had already exited).
pub fn kill(pid: i32) -> i32 {
    // SAFETY: signalling our own child, not yet reaped (its pid is not reused).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait(pid)
}

/// Milliseconds of the monotonic clock, the same in every process.
pub fn mono_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// xorshift64*: reproducible random choices from a printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// `TEST_SEED` if set, else one from the clock (callers print it, so that
/// a failure can be replayed with `TEST_SEED=...`).
pub fn seed() -> u64 {
    if let Some(s) = std::env::var("TEST_SEED").ok().and_then(|s| s.parse().ok()) {
        return s;
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    t | 1
}
