//! Clocks. `now_ms` and `mono_ms` are nginx's cached time (no syscall: as
//! of the event loop's last time update); `mono_ms_now` reads the monotonic
//! clock at the call, for stamps that must not lag behind a long handler
//! (ring readers' signs of life, a post judging whether a reader is
//! responsive). The wall clock is for
//! display only; every judgement of age (heartbeats, hangs, claim expiry,
//! how long ago a worker died) uses the monotonic clock, which an NTP step
//! does not move. CLOCK_MONOTONIC counts from boot for the whole system, so
//! stamps written by one process are comparable in every other.

/// Milliseconds since the epoch, as of the event loop's last time update.
pub fn now_ms() -> u64 {
    let tp = nginx_sys::ngx_timeofday();
    (tp.sec as u64).saturating_mul(1000).saturating_add(tp.msec as u64)
}

/// Monotonic milliseconds (nginx's `ngx_current_msec`: CLOCK_MONOTONIC_COARSE
/// on Linux), as of the event loop's last time update.
pub fn mono_ms() -> u64 {
    // SAFETY: a word nginx updates on its own thread, the one running us.
    unsafe { core::ptr::read_volatile(&raw const nginx_sys::ngx_current_msec) as u64 }
}

/// The wall-clock time (ms since the epoch) of a monotonic stamp, for display.
pub fn wall_of(mono: u64) -> u64 {
    now_ms().saturating_sub(mono_ms().saturating_sub(mono))
}

/// CLOCK_MONOTONIC read now, in nanoseconds (clock_gettime per call: the
/// same clock in every process of the host, immune to wall-clock steps).
pub fn mono_ns_now() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Monotonic milliseconds read now (mono_ns_now).
pub fn mono_ms_now() -> u64 {
    mono_ns_now() / 1_000_000
}

/// The CPU time this thread has run, in microseconds (a syscall: for
/// timing a handler without the time other processes took its core).
pub fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec; Linux has CLOCK_THREAD_CPUTIME_ID.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000).saturating_add(ts.tv_nsec as u64 / 1000)
}
