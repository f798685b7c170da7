//! Wake-ups instead of polling. The master makes one eventfd per worker slot
//! before it forks (kept across reloads, so any worker of any generation can
//! wake any slot); each worker adds its slot's descriptor to its event loop.
//! A worker whose Lua poller is about to sleep sets its bit in the zone's
//! idle mask; a poster clears the mask and writes only to the slots that
//! were idle, so a burst of posts costs one atomic load each and no syscall.
//! The wake-up handler posts the Lua poller's ngx.semaphore.

use crate::shm::idle::MAX_WAKE_SLOTS;
use core::ffi::c_void;

use nginx_sys::{NGX_LOG_ALERT, NGX_LOG_ERR, ngx_connection_t, ngx_cycle_t, ngx_event_t, ngx_log_t};

use super::local::local;

pub type SemaPost = unsafe extern "C" fn(sem: *mut c_void, n: i32) -> i32;

/// Master: makes sure slots 0..n have an eventfd. Called on every load.
pub fn ensure_fds(n: usize, log: *mut ngx_log_t) {
    let l = local();
    while l.wake_fds.len() < n.min(MAX_WAKE_SLOTS) {
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            ngx::ngx_log_error!(NGX_LOG_ALERT, log, "workerbus: eventfd() failed: {err}; workers fall back to polling");
            return;
        }
        l.wake_fds.push(fd);
    }
}

/// Worker: adds this slot's eventfd to the event loop.
pub fn register(cycle: *mut ngx_cycle_t, slot: u32) {
    let l = local();
    let Some(&fd) = l.wake_fds.get(slot as usize) else { return };
    // SAFETY: cycle is live; ngx_get_connection takes a descriptor nginx then owns in this process.
    let c = unsafe { nginx_sys::ngx_get_connection(fd, (*cycle).log) };
    if c.is_null() {
        return;
    }
    // SAFETY: c is a fresh connection with its read event, from this worker's pool.
    unsafe {
        let rev = (*c).read;
        (*rev).handler = Some(on_wake);
        (*rev).log = (*cycle).log;
        // Not a client connection: nginx must not report it as left open at exit.
        (*rev).set_channel(1);
        let add = nginx_sys::ngx_event_actions.add;
        let ok = add.is_some_and(|f| f(rev, (libc::EPOLLIN | libc::EPOLLRDHUP) as _, 0) == 0);
        if !ok {
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                (*cycle).log,
                "workerbus: cannot watch the wake-up descriptor; polling only"
            );
            nginx_sys::ngx_free_connection(c);
            return;
        }
    }
    l.wake_conn = c;
}

/// Drains the eventfd and wakes the Lua poller.
unsafe extern "C" fn on_wake(ev: *mut ngx_event_t) {
    // SAFETY: ev is the read event of the wake-up connection registered above.
    let c = unsafe { (*ev).data as *mut ngx_connection_t };
    let mut v = 0u64;
    // SAFETY: reading 8 bytes from an eventfd into a u64; non-blocking.
    unsafe { libc::read((*c).fd, (&raw mut v).cast(), 8) };
    let l = local();
    l.wakeups_received += 1;
    post_sema(l.sema);
    // The PostgreSQL bridge's holder is woken through the same descriptor.
    crate::pg::glue::on_wake();
}

/// Posts the registered ngx.semaphore (lua-nginx-module's FFI entry point,
/// looked up once; it only bumps the count and posts an nginx event).
pub fn post_sema(sem: *mut c_void) {
    if sem.is_null() {
        return;
    }
    let l = local();
    if l.sema_post.is_none() {
        // SAFETY: dlsym with a NUL-terminated name; the Lua module is loaded RTLD_GLOBAL.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"ngx_http_lua_ffi_sema_post".as_ptr()) };
        if p.is_null() {
            return;
        }
        // SAFETY: the symbol has this signature in lua-nginx-module 0.10.x.
        l.sema_post = Some(unsafe { core::mem::transmute::<*mut c_void, SemaPost>(p) });
    }
    if let Some(f) = l.sema_post {
        // SAFETY: sem was registered by Lua from a live ngx.semaphore it keeps referenced.
        unsafe { f(sem, 1) };
    }
}

/// Wakes the idle workers of zone `index` at the end of this event-loop
/// iteration rather than at once: a handler posting a burst then pays for
/// one wake-up per idle worker in all, not one each time a fast reader
/// drained the ring and went idle again.
pub fn wake_later(index: usize) {
    let l = local();
    l.wake_zones |= 1u32 << (index % 32);
    let ev = &mut l.wake_ev;
    if ev.posted() != 0 {
        return;
    }
    if ev.handler.is_none() {
        ev.handler = Some(on_deferred_wake);
        ev.data = (&raw mut l.dummy_conn).cast();
        // SAFETY: ngx_cycle is the running cycle of this worker.
        ev.log = unsafe { (*nginx_sys::ngx_cycle).log };
    }
    // SAFETY: the event lives in process-static memory; the queue is nginx's own.
    unsafe { nginx_sys::ngx_post_event(ev, &raw mut nginx_sys::ngx_posted_events) };
}

unsafe extern "C" fn on_deferred_wake(_ev: *mut ngx_event_t) {
    let l = local();
    let zones = core::mem::take(&mut l.wake_zones);
    for (i, z) in l.zones.iter().enumerate() {
        if zones & (1u32 << (i % 32)) != 0 {
            z.header().idle.wake_idle(signal);
        }
    }
}

/// Writes to a slot's eventfd.
pub fn signal(slot: usize) {
    let Some(&fd) = local().wake_fds.get(slot) else { return };
    let one = 1u64;
    // SAFETY: writing 8 bytes to an eventfd this process inherited from the master.
    unsafe { libc::write(fd, (&raw const one).cast(), 8) };
}

/// Worker exit: close our copy of the descriptor's connection.
pub fn unregister() {
    let l = local();
    if !l.wake_conn.is_null() {
        // SAFETY: the connection was made by register() in this process.
        unsafe { nginx_sys::ngx_close_connection(l.wake_conn) };
        l.wake_conn = core::ptr::null_mut();
    }
    l.sema = core::ptr::null_mut();
}
