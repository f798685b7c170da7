//! Wake-ups instead of polling. Each worker binds its own datagram socket
//! in the abstract unix namespace, named after its pid and a random nonce,
//! and watches it from its event loop, beside its slot's eventfd
//! (wake_fd.rs). A worker whose Lua poller is about to sleep sets the idle
//! flag of its own ring reader (one per worker process, never shared
//! between generations); a poster clears the flags and wakes each reader
//! that was idle: a worker of its own generation through that worker's
//! slot's eventfd, any other by one datagram to the address the reader
//! registered when it attached. So a burst of posts costs one atomic load
//! each and no syscall, and no worker can take another's wake-up: during a
//! reload the two generations' workers of a slot have separate readers,
//! flags, sockets and eventfd tables. The handler posts the Lua poller's
//! ngx.semaphore. A poster's own reader is woken in place (its semaphore
//! posted, nothing sent). The socket also wakes the other parts (the
//! PostgreSQL bridge's holder): a datagram of one byte says for whom, so a
//! wake-up meant only for the holder runs its flush first and does not
//! resume the poller for nothing.

use core::cell::Cell;
use core::sync::atomic::Ordering;

use nginx_sys::{NGX_LOG_ERR, ngx_connection_t, ngx_cycle_t, ngx_event_t};

use super::event::Event;
use super::hop::{self, Hop};
use super::one_thread::OneThread;
use super::process_state::this_process;
use super::time::thread_cpu_us;
use super::zone::Zone;
use super::{extension, pid, sema, wake_fd};
use crate::shm::lifecycle::READERS_PER_RECORD;

/// This process's wake-up state.
struct Wake {
    /// This worker's own wake-up socket in its event loop (null: none), and
    /// the nonce in its name.
    conn: Cell<*mut ngx_connection_t>,
    nonce: Cell<u64>,
    /// Unbound socket this process sends wake-ups from (-1 until needed).
    send_fd: Cell<i32>,
    /// Deferred wake-up: posted once per event-loop iteration, for these zones (bits).
    deferred: Event,
    zones: Cell<u32>,
    /// Wake-ups of this worker's own reader, made in place (wake_zone).
    local: Cell<u64>,
    /// Wake-ups this process sent other workers: by eventfd, by datagram.
    by_eventfd: Cell<u64>,
    by_datagram: Cell<u64>,
    /// A post woke this worker's own poller: its first handler is being
    /// timed (wake_after_own, on_read).
    after_own: Cell<Option<OwnRun>>,
    /// The CPU time this worker's own first handler took last time it was timed.
    own_handler_us: Cell<u64>,
}

/// The own poller's run after a post that woke it.
#[derive(Clone, Copy)]
struct OwnRun {
    /// This thread's CPU time at its first ring read (0: not yet).
    first_read_us: u64,
    /// Whether the other workers' wake-ups wait for its first handler.
    held: bool,
}

/// The most CPU time an own handler may take for the other workers'
/// wake-ups to wait for it: after a longer one they go out at once (the
/// woken workers may then take this worker's core, which costs it less
/// than they would wait).
const HOLD_MAX_US: u64 = 50;

static WAKE: OneThread<Wake> = OneThread::new(Wake {
    conn: Cell::new(core::ptr::null_mut()),
    nonce: Cell::new(0),
    send_fd: Cell::new(-1),
    deferred: Event::new(),
    zones: Cell::new(0),
    local: Cell::new(0),
    by_eventfd: Cell::new(0),
    by_datagram: Cell::new(0),
    after_own: Cell::new(None),
    own_handler_us: Cell::new(0),
});

/// The abstract socket address of (pid, nonce), and its length.
fn address(pid: i32, nonce: u64) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; all zero is a valid empty address.
    let mut a: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // A leading NUL: the abstract namespace (no file, gone with the socket).
    let name = format!("\0workerbus/{pid}/{nonce:016x}");
    for (d, s) in a.sun_path.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let len = core::mem::offset_of!(libc::sockaddr_un, sun_path) + name.len().min(a.sun_path.len());
    (a, len as libc::socklen_t)
}

fn datagram_socket() -> i32 {
    // SAFETY: socket has no memory preconditions.
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) }
}

fn random_nonce() -> u64 {
    let mut n = 0u64;
    // SAFETY: writes at most 8 bytes into n.
    let got = unsafe { libc::getrandom((&raw mut n).cast(), 8, libc::GRND_NONBLOCK) };
    if got != 8 {
        // No entropy yet: the pid and the time still make a name nobody expects.
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: ts is a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        n = (ts.tv_sec as u64).wrapping_mul(1_000_000_007) ^ ts.tv_nsec as u64;
    }
    n
}

/// Worker: binds this process's wake-up socket and adds it to the event
/// loop. Without it (logged) the Lua poller falls back to its interval.
pub fn register(cycle: *mut ngx_cycle_t) {
    let w = WAKE.get();
    if !w.conn.get().is_null() {
        return;
    }
    // SAFETY: cycle is live.
    let log = unsafe { (*cycle).log };
    let fail = |what: &str| {
        let err = std::io::Error::last_os_error();
        ngx::ngx_log_error!(NGX_LOG_ERR, log, "workerbus: wake-up socket: {what}: {err}; the event poller polls");
    };
    let fd = datagram_socket();
    if fd < 0 {
        return fail("socket() failed");
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let nonce = random_nonce();
    let (addr, len) = address(pid, nonce);
    // SAFETY: addr is a valid sockaddr_un of len bytes.
    if unsafe { libc::bind(fd, (&raw const addr).cast(), len) } != 0 {
        fail("bind() failed");
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        return;
    }
    // SAFETY: ngx_get_connection takes a descriptor nginx then owns in this process.
    let c = unsafe { nginx_sys::ngx_get_connection(fd, log) };
    if c.is_null() {
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        return;
    }
    // SAFETY: c is a fresh connection with its read event, from this worker's pool.
    unsafe {
        let rev = (*c).read;
        (*rev).handler = Some(on_wake);
        (*rev).log = log;
        // Not a client connection: nginx must not report it as left open at exit.
        (*rev).set_channel(1);
        // "Idle": at the start of a graceful shutdown nginx calls our handler
        // with `close` set, which is how the poller learns it must stop
        // (its semaphore wait would otherwise hold the worker up).
        (*c).set_idle(1);
        let add = nginx_sys::ngx_event_actions.add;
        // Level-triggered (no NGX_CLEAR_EVENT): the handler drains anyway.
        if add.is_none_or(|f| f(rev, libc::EPOLLIN as _, 0) != 0) {
            fail("cannot watch it");
            nginx_sys::ngx_close_connection(c);
            return;
        }
    }
    w.conn.set(c);
    w.nonce.set(nonce);
    // The other workers of this generation wake this one by eventfd when
    // they can (wake_fd.rs); the socket stays for the rest.
    wake_fd::register(cycle, on_wake_fd);
}

/// Whether posters can wake this worker.
pub fn available() -> bool {
    !WAKE.get().conn.get().is_null()
}

/// The nonce of this worker's wake-up address, when it has one.
pub fn nonce() -> Option<u64> {
    available().then(|| WAKE.get().nonce.get())
}

/// Drains the socket and wakes the Lua poller.
unsafe extern "C" fn on_wake(ev: *mut ngx_event_t) {
    // SAFETY: ev is the read event of the wake-up connection registered above.
    let c = unsafe { (*ev).data as *mut ngx_connection_t };
    // SAFETY: as above; nginx sets `close` on idle connections when it starts
    // a graceful shutdown. Cleared so later wake-ups read as wake-ups again.
    let closing = unsafe {
        let closing = (*c).close() != 0;
        (*c).set_close(0);
        closing
    };
    if closing {
        // The semaphore's resumption is a posted event, and nginx 1.22 does
        // not run posted events before it blocks in epoll again: a datagram
        // to ourselves ends that wait at once, so the poller stops now
        // rather than at the next timer (the heartbeat, or never).
        sema::post();
        signal(pid(), WAKE.get().nonce.get());
        return;
    }
    hop::stamp(Hop::Epoll);
    // SAFETY: as above.
    let fd = unsafe { (*c).fd };
    // Up to 8 datagrams per recvmmsg() call: the usual one costs one call
    // (non-blocking, it returns what is there), not a second that finds EAGAIN.
    let mut b = [[0u8; 8]; 8];
    // SAFETY: plain data; all zero is an empty message header.
    let mut msgs: [libc::mmsghdr; 8] = unsafe { core::mem::zeroed() };
    let mut iovs: [libc::iovec; 8] =
        core::array::from_fn(|_| libc::iovec { iov_base: core::ptr::null_mut(), iov_len: 0 });
    for ((m, iov), buf) in msgs.iter_mut().zip(iovs.iter_mut()).zip(b.iter_mut()) {
        *iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut ring = false;
    loop {
        // SAFETY: each header points at its own iovec and local buffer, alive for the call; non-blocking.
        let n = unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), 8, libc::MSG_DONTWAIT, core::ptr::null_mut()) };
        let got = n.max(0) as usize;
        // Anything but an extension's byte is the ring's (an empty datagram too).
        ring |= msgs[..got].iter().zip(&b).any(|(m, buf)| m.msg_len == 0 || buf[0] != FOR_EXTENSIONS);
        if got < 8 {
            break;
        }
    }
    woken(ring);
}

/// The eventfd of this worker's slot (wake_fd.rs) is readable: a ring
/// wake-up from another worker of its generation.
unsafe extern "C" fn on_wake_fd(ev: *mut ngx_event_t) {
    hop::stamp(Hop::Epoll);
    wake_fd::drain(ev);
    woken(true);
}

/// After a wake-up was read: the other parts, then the poller.
fn woken(ring: bool) {
    // Other parts (the PostgreSQL bridge's holder) are woken through the
    // same descriptors; first, so that their posted event (the holder's
    // flush) runs before the poller's resumption.
    extension::each(|e| (e.on_wake)());
    // Only a ring wake-up resumes the poller: a wake-up meant for the holder
    // alone (`signal_extensions`) would resume it to find nothing.
    if ring {
        hop::stamp(Hop::Sema);
        sema::post();
    }
}

/// This process's wake-up state, its end-of-iteration event set up.
fn wake_state() -> &'static Wake {
    let w = WAKE.get();
    if !w.deferred.is_set_up() {
        // SAFETY: ngx_cycle is the running cycle, whose log lives as long as it.
        w.deferred.init(unsafe { (*nginx_sys::ngx_cycle).log }, on_deferred_wake);
    }
    w
}

/// Wakes the idle workers of zone `index` after a post: at once for the
/// first post of an event-loop iteration (a sparse poster's event reaches
/// the other workers without waiting for the rest of its iteration, its
/// own handler included), at the iteration's end for the posts after it (a
/// handler posting a burst pays for two wake-ups per idle worker in all,
/// not one each time a fast reader drained the ring and went idle again).
pub fn wake_after_post(index: usize, zone: &Zone) {
    let w = wake_state();
    if w.deferred.is_posted() {
        w.zones.set(w.zones.get() | 1u32 << (index % 32));
        return;
    }
    wake_zone(zone);
    // Posted with no zone yet: it marks this iteration's wake-up as made,
    // and the posts after this one add their zones.
    w.deferred.post();
}

/// As wake_after_post, when the post also woke this worker's own poller:
/// the other workers' wake-ups go out once its first handler has run (its
/// next ring read, `on_read`), or at the iteration's end if it reads
/// nothing. On 2 cores the woken workers would otherwise take the poster's
/// core before its own handler; this way the own handler runs at once and
/// the others wait for it alone, not for the rest of the iteration. After
/// an own handler that took more than HOLD_MAX_US of CPU time they are not
/// held (the handler is still timed, so a faster one brings the hold back).
pub fn wake_after_own(index: usize, zone: &Zone) {
    let w = wake_state();
    let first = !w.deferred.is_posted() && w.after_own.get().is_none();
    let hold = w.own_handler_us.get() <= HOLD_MAX_US;
    if first {
        w.after_own.set(Some(OwnRun { first_read_us: 0, held: hold }));
    }
    if !hold {
        return wake_after_post(index, zone);
    }
    w.zones.set(w.zones.get() | 1u32 << (index % 32));
    w.deferred.post();
}

/// A ring read by this process (the FFI's next record). After
/// wake_after_own, the first one starts the own handler's clock and the
/// second one stops it, and sends the wake-ups held for it.
pub fn on_read() {
    let w = WAKE.get();
    let Some(run) = w.after_own.get() else { return };
    // CPU time, not the clock: the other workers, once woken, may take this
    // worker's core in the middle of its handler, and that time must not
    // count against the handler (it would then lose the hold, and be
    // interrupted again).
    let now = thread_cpu_us().max(1);
    if run.first_read_us == 0 {
        w.after_own.set(Some(OwnRun { first_read_us: now, ..run }));
        return;
    }
    w.after_own.set(None);
    w.own_handler_us.set(now.saturating_sub(run.first_read_us));
    if run.held {
        wake_held();
    }
}

/// The CPU time this worker's own first handler took when last timed (status).
pub fn own_handler_us() -> u64 {
    WAKE.get().own_handler_us.get()
}

/// Sends the wake-ups held for the zones in `zones`.
fn wake_held() {
    let l = this_process();
    let bits = WAKE.get().zones.replace(0);
    if bits != 0 {
        hop::stamp_for(Hop::Deferred, None);
    }
    // By index, copying one zone at a time: this runs once per event-loop
    // iteration with posts, and needs no copy of the whole list.
    let mut i = 0;
    while let Some(z) = l.zone_at(i) {
        if bits & (1u32 << (i % 32)) != 0 {
            wake_zone(&z);
        }
        i += 1;
    }
}

unsafe extern "C" fn on_deferred_wake(_ev: *mut ngx_event_t) {
    WAKE.get().after_own.set(None);
    wake_held();
}

/// Wake-ups sent by one sendmmsg() call at most.
const BATCH: usize = 16;

/// Wakes every idle reader of a zone's ring, now, except a worker's own
/// (its posts wake its poller directly: ring_glue::post). The datagrams
/// go out in one sendmmsg() per 16 readers: on a kernel without forced
/// preemption a woken worker takes the poster's core only when the call
/// returns, so the last reader's wake-up does not wait for the first
/// ones' handlers.
pub fn wake_zone(z: &Zone) {
    let Some(r) = z.ring else { return };
    let l = this_process();
    // This process's readers (one per Lua VM), skipped: its own posts wake them in place.
    let own = if l.is_worker.get() { l.record.get() } else { None };
    let records = r.max_readers() / READERS_PER_RECORD;
    let mine = |i: usize| own.is_some_and(|rec| records > 0 && i % records == rec);
    let lc = l.primary().map(|p| p.header().lifecycle.records());
    // The generation and slot of reader i's worker, when its record is
    // still that worker's (the eventfd is the slot's, whoever holds it).
    let worker_of = |i: usize, pid: i32| {
        let rec = lc?.get(i % records.max(1))?;
        (rec.pid.load(Ordering::Acquire) == pid)
            .then(|| (rec.generation.load(Ordering::Relaxed), rec.slot.load(Ordering::Relaxed)))
    };
    let mut batch: Vec<(libc::sockaddr_un, libc::socklen_t)> = Vec::new();
    r.wake_idle_except(mine, |i, pid, nonce| {
        if pid != 0 {
            hop::stamp_for(Hop::Send, Some(i));
            let w = WAKE.get();
            if worker_of(i, pid).is_some_and(|(g, slot)| wake_fd::wake(g, slot)) {
                w.by_eventfd.set(w.by_eventfd.get() + 1);
                return;
            }
            w.by_datagram.set(w.by_datagram.get() + 1);
            batch.push(address(pid, nonce));
            if batch.len() == BATCH {
                send_all(&batch, FOR_RING);
                batch.clear();
            }
        }
    });
    send_all(&batch, FOR_RING);
}

/// One datagram of one byte to each address (at most BATCH), in as few
/// sendmmsg() calls as the kernel allows: a full queue means wake-ups are
/// already waiting there, a gone address that the worker is gone; both
/// are skipped.
fn send_all(to: &[(libc::sockaddr_un, libc::socklen_t)], what: u8) {
    let n = to.len().min(BATCH);
    if n == 0 {
        return;
    }
    let Some(fd) = send_fd() else { return };
    let mut byte = what;
    let mut iov = libc::iovec { iov_base: (&raw mut byte).cast(), iov_len: 1 };
    // SAFETY: plain data; all zero is an empty message header.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { core::mem::zeroed() };
    for (m, (a, len)) in msgs.iter_mut().zip(to) {
        m.msg_hdr.msg_name = (a as *const libc::sockaddr_un).cast_mut().cast();
        m.msg_hdr.msg_namelen = *len;
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut done = 0;
    while done < n {
        // SAFETY: msgs[done..n] point at live addresses and the one-byte
        // buffer above (only read by the kernel); non-blocking.
        let sent =
            unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr().add(done), (n - done) as libc::c_uint, libc::MSG_DONTWAIT) };
        // The message after the ones sent failed (or, on -1, the first): skip it.
        done += sent.max(0) as usize + 1;
    }
}

/// The unbound socket this process sends wake-ups from, made on first use.
fn send_fd() -> Option<i32> {
    let w = WAKE.get();
    if w.send_fd.get() < 0 {
        w.send_fd.set(datagram_socket());
    }
    (w.send_fd.get() >= 0).then(|| w.send_fd.get())
}

/// How many wake-ups this worker gave its own poller in place (status:
/// `wakeups_local` of the worker that answers).
pub fn local_wakeups() -> u64 {
    WAKE.get().local.get()
}

/// The ring wake-ups this process sent other workers, by eventfd and by
/// datagram (status: `wakeups_by_eventfd`, `wakeups_by_datagram`).
pub fn sent_wakeups() -> (u64, u64) {
    let w = WAKE.get();
    (w.by_eventfd.get(), w.by_datagram.get())
}

/// A post woke this worker's own poller in place (ring_glue::post).
pub fn count_local() {
    let w = WAKE.get();
    w.local.set(w.local.get() + 1);
}

/// The byte of a wake-up for the other parts only (not the ring's poller).
const FOR_EXTENSIONS: u8 = b'x';
/// The byte of a ring wake-up.
const FOR_RING: u8 = b'w';

/// Wakes the ring's poller (and the other parts) of the worker that
/// registered (pid, nonce).
pub fn signal(pid: i32, nonce: u64) {
    send(pid, nonce, FOR_RING);
}

/// Wakes only the other parts (the PostgreSQL bridge's holder) of the
/// worker that registered (pid, nonce); its ring poller sleeps on.
pub fn signal_extensions(pid: i32, nonce: u64) {
    send(pid, nonce, FOR_EXTENSIONS);
}

/// Sends one datagram to the worker that registered (pid, nonce). A full
/// queue means wake-ups are already waiting there; a gone address, that
/// the worker is gone: both are fine to ignore.
fn send(pid: i32, nonce: u64, what: u8) {
    send_all(&[address(pid, nonce)], what);
}

/// Worker exit (after the ring readers were released): close the socket and
/// forget the poller's semaphore.
pub fn unregister() {
    wake_fd::unregister();
    let c = WAKE.get().conn.replace(core::ptr::null_mut());
    if !c.is_null() {
        // SAFETY: the connection was made by register() in this process.
        unsafe { nginx_sys::ngx_close_connection(c) };
    }
    sema::forget_all();
}
