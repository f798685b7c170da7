//! Wake-ups by eventfd between the workers of one generation. The master
//! makes one eventfd per worker slot when it loads a configuration
//! (init_module), before it forks that generation's workers, so each of
//! them inherits the whole table: a worker watches its own slot's eventfd
//! from its event loop, and a poster wakes another worker of its generation
//! with one write() to that worker's slot. Cheaper than the datagram
//! (wake.rs) for both sides (docs/event-ring.md: about half the wake-up
//! time, a third of the sender's cost), and not a "sync" wake-up, which a
//! unix socket's is: the kernel takes that as a sign that the sender is
//! about to sleep, and may put the woken worker on its core. A reader of
//! another generation (a reload in progress), a helper process, or a table
//! that could not be made, is woken by datagram as before; so are the
//! other parts (the PostgreSQL bridge's holder), whose wake-ups say for
//! whom.
//!
//! One table per generation: a respawned worker inherits its slot's
//! eventfd with the rest (what its dead predecessor left unread is one
//! spurious wake-up), and the two generations' workers of a slot during a
//! reload never share one (neither can drain the other's wake-up).

use core::cell::{Cell, RefCell};

use nginx_sys::{NGX_LOG_ERR, ngx_connection_t, ngx_cycle_t, ngx_event_t};

use super::one_thread::OneThread;
use super::process_state::this_process;

struct Table {
    /// The generation whose workers the table's eventfds belong to (0: none).
    generation: Cell<u64>,
    /// One eventfd per worker slot, in slot order (-1: not made).
    fds: RefCell<Vec<i32>>,
    /// This worker's own slot's eventfd in its event loop (null: none).
    conn: Cell<*mut ngx_connection_t>,
}

static TABLE: OneThread<Table> = OneThread::new(Table {
    generation: Cell::new(0),
    fds: RefCell::new(Vec::new()),
    conn: Cell::new(core::ptr::null_mut()),
});

/// The most worker slots the table covers (each worker holds all of them).
const MAX_SLOTS: u32 = 256;

/// Master, init_module: the eventfds of `generation`'s `workers` slots.
/// The previous generation's are closed here (its workers keep their own
/// copies; the master never forks another worker of it).
pub fn begin_generation(cycle: *mut ngx_cycle_t, generation: u64, workers: u32) {
    let t = TABLE.get();
    let mut fds = t.fds.borrow_mut();
    close_all(&mut fds);
    t.generation.set(0);
    if workers > MAX_SLOTS {
        // Every worker would hold them all: past this, datagrams.
        return;
    }
    for _ in 0..workers {
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: nginx passes init_module a live cycle.
            let log = unsafe { (*cycle).log };
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "workerbus: wake-up eventfd: {err}; workers wake each other by datagram"
            );
            close_all(&mut fds);
            return;
        }
        fds.push(fd);
    }
    t.generation.set(generation);
}

/// Closes the table's descriptors (this process's copies) and empties it.
fn close_all(fds: &mut Vec<i32>) {
    for fd in fds.drain(..) {
        if fd >= 0 {
            // SAFETY: the table's descriptors are this process's own.
            unsafe { libc::close(fd) };
        }
    }
}

/// Worker start: watches this worker's own slot's eventfd (false: it has
/// none, and is woken by datagram only).
pub fn register(cycle: *mut ngx_cycle_t, on_wake: unsafe extern "C" fn(*mut ngx_event_t)) -> bool {
    let t = TABLE.get();
    let l = this_process();
    if t.generation.get() == 0 || t.generation.get() != l.generation.get() || !t.conn.get().is_null() {
        return false;
    }
    let Some(&fd) = t.fds.borrow().get(l.slot.get() as usize) else { return false };
    // SAFETY: cycle is live.
    let log = unsafe { (*cycle).log };
    // SAFETY: ngx_get_connection takes a descriptor this process owns.
    let c = unsafe { nginx_sys::ngx_get_connection(fd, log) };
    if c.is_null() {
        return false;
    }
    // SAFETY: c is a fresh connection with its read event, from this worker's pool.
    unsafe {
        let rev = (*c).read;
        (*rev).handler = Some(on_wake);
        (*rev).log = log;
        // Not a client connection: nginx must not report it as left open at
        // exit. Not idle either: the datagram socket is the one nginx
        // closes at a graceful shutdown, which is how the poller learns it.
        (*rev).set_channel(1);
        let add = nginx_sys::ngx_event_actions.add;
        // Level-triggered: the handler reads the counter back to zero.
        if add.is_none_or(|f| f(rev, libc::EPOLLIN as _, 0) != 0) {
            // The connection owns fd now and closes it: forget it here.
            t.fds.borrow_mut()[l.slot.get() as usize] = -1;
            nginx_sys::ngx_close_connection(c);
            return false;
        }
    }
    t.conn.set(c);
    true
}

/// Reads this worker's eventfd back to zero (its read handler).
pub fn drain(ev: *mut ngx_event_t) {
    // SAFETY: ev is the read event of the connection register() made.
    let fd = unsafe { (*((*ev).data as *mut ngx_connection_t)).fd };
    let mut n = 0u64;
    // SAFETY: reads 8 bytes into n; non-blocking (EAGAIN when already zero).
    unsafe { libc::read(fd, (&raw mut n).cast(), 8) };
}

/// Wakes the worker in `slot` of `generation` by its eventfd, when that
/// generation is the one this process holds the table of: false when the
/// caller must send a datagram instead.
pub fn wake(generation: u64, slot: u32) -> bool {
    let t = TABLE.get();
    if generation == 0 || generation != t.generation.get() {
        return false;
    }
    let Some(&fd) = t.fds.borrow().get(slot as usize) else { return false };
    if fd < 0 {
        return false;
    }
    let one = 1u64;
    // SAFETY: writes 8 bytes from `one`; non-blocking (a counter near its
    // limit, which nothing here reaches, would only refuse).
    unsafe { libc::write(fd, (&raw const one).cast(), 8) == 8 }
}

/// Worker exit: stops watching its eventfd (the other slots' stay open to
/// the end of the process, which posts until then).
pub fn unregister() {
    let t = TABLE.get();
    let c = t.conn.replace(core::ptr::null_mut());
    if !c.is_null() {
        if let Some(fd) = t.fds.borrow_mut().get_mut(this_process().slot.get() as usize) {
            *fd = -1;
        }
        // SAFETY: the connection was made by register() in this process.
        unsafe { nginx_sys::ngx_close_connection(c) };
    }
}
