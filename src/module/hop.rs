//! Where a wake-up's time goes: a timestamp at each hop of an event from its
//! post to its handler (bench/hops prints the medians per hop). Only in a
//! module built with cargo's `hop-trace` feature: in any other build every
//! function here is empty and inlined away, so the product's hot paths
//! carry no trace code (`make build` checks that no `workerbus_hop_*`
//! symbol is exported).
//!
//! The stamps live in one anonymous shared mapping that the master makes in
//! init_module and its workers inherit through fork: the last post and the
//! last deferred wake-up of any process, and per ring reader (a worker's
//! lifecycle record index) the time a poster sent it a datagram, and the
//! times it returned from epoll, posted its poller's semaphore, resumed the
//! poller (its first read after the post) and called the handler (stamped
//! by the handler itself, through `workerbus_hop_row`). A trace is only
//! meaningful for events posted one at a time, far apart (bench/hops posts
//! one every 5-15 ms): each wake-up cycle then overwrites the last one's.

/// The hops, in the order an event passes them.
#[derive(Clone, Copy)]
#[allow(dead_code)] // without the feature nothing reads the values
pub enum Hop {
    /// `post()` was entered (the poster).
    Post = 0,
    /// The poster's deferred wake-up ran, at the end of its event-loop iteration.
    Deferred = 1,
    /// The poster sent this reader its datagram.
    Send = 2,
    /// The reader's event loop returned from epoll with its socket readable.
    Epoll = 3,
    /// The reader posted its poller's semaphore (or, for its own post, the poster did).
    Sema = 4,
    /// The poller resumed: its first read of the ring after the semaphore post.
    Resumed = 5,
    /// The handler was called.
    Handler = 6,
}

pub const HOPS: usize = 7;

#[cfg(feature = "hop-trace")]
mod trace {
    use core::cell::Cell;
    use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

    use super::super::one_thread::OneThread;
    use super::super::process_state::this_process;
    use super::{HOPS, Hop};

    /// Readers traced (lifecycle record indexes beyond are not).
    const READERS: usize = 1024;

    /// The shared mapping: [0] the last post and deferred wake-up of any
    /// process, [1 + i] reader i's stamps. Plain data, no pointers.
    #[repr(C)]
    struct Stamps {
        rows: [[AtomicU64; HOPS]; READERS + 1],
    }

    /// Set in the master before fork; workers inherit the address of the same shared pages.
    static STAMPS: AtomicPtr<Stamps> = AtomicPtr::new(core::ptr::null_mut());
    /// The semaphore was posted and the poller has not read since.
    static AWAITING_RESUME: OneThread<Cell<bool>> = OneThread::new(Cell::new(false));

    use crate::module::time::mono_ns_now as now_ns;

    fn stamps() -> Option<&'static Stamps> {
        // Relaxed: written once in the master before fork.
        let p = STAMPS.load(Ordering::Relaxed);
        // SAFETY: a live shared mapping of size_of::<Stamps>() bytes, never
        // unmapped; all its fields are atomics, so shared references are sound.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    pub fn init() {
        if !STAMPS.load(Ordering::Relaxed).is_null() {
            return;
        }
        // SAFETY: a fresh anonymous shared mapping; zero pages are zero atomics.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                core::mem::size_of::<Stamps>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            // Relaxed: before fork.
            STAMPS.store(p.cast(), Ordering::Relaxed);
        }
    }

    fn row(reader: Option<usize>) -> Option<&'static [AtomicU64; HOPS]> {
        let s = stamps()?;
        match reader {
            None => Some(&s.rows[0]),
            Some(i) if i < READERS => Some(&s.rows[1 + i]),
            Some(_) => None,
        }
    }

    pub fn stamp_for(hop: Hop, reader: Option<usize>) {
        if let Some(r) = row(reader) {
            // Relaxed: a timestamp, read long after (the next handler call).
            r[hop as usize].store(now_ns(), Ordering::Relaxed);
        }
        if matches!(hop, Hop::Sema) && reader == this_process().record.get() {
            AWAITING_RESUME.get().set(true);
        }
    }

    pub fn on_read() {
        if AWAITING_RESUME.get().replace(false) {
            stamp_for(Hop::Resumed, this_process().record.get());
        }
    }

    /// Stamps `Handler` for this worker's reader and copies out the row
    /// (0: not stamped this cycle), then clears the reader's stamps.
    pub fn take_row(out: &mut [u64; HOPS]) -> bool {
        let me = this_process().record.get();
        let (Some(g), Some(r)) = (row(None), me.and_then(|i| row(Some(i)))) else { return false };
        stamp_for(Hop::Handler, me);
        for (h, o) in out.iter_mut().enumerate() {
            // Relaxed: see stamp_for.
            *o = if h <= Hop::Deferred as usize {
                g[h].load(Ordering::Relaxed)
            } else {
                r[h].swap(0, Ordering::Relaxed)
            };
        }
        true
    }
}

/// Master, init_module: makes the shared stamps (hop-trace builds only).
#[inline(always)]
pub fn init() {
    #[cfg(feature = "hop-trace")]
    trace::init();
}

/// Stamps `hop` now: `reader` None for the poster's own hops (Post, Deferred).
#[inline(always)]
pub fn stamp_for(_hop: Hop, _reader: Option<usize>) {
    #[cfg(feature = "hop-trace")]
    trace::stamp_for(_hop, _reader);
}

/// Stamps `hop` for this worker's own reader.
#[inline(always)]
pub fn stamp(_hop: Hop) {
    #[cfg(feature = "hop-trace")]
    trace::stamp_for(_hop, super::process_state::this_process().record.get());
}

/// The poller read the ring: its resumption, if a semaphore post awaits one.
#[inline(always)]
pub fn on_read() {
    #[cfg(feature = "hop-trace")]
    trace::on_read();
}

#[cfg(feature = "hop-trace")]
pub use trace::take_row;
