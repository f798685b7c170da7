//! The Lua event poller's ngx.semaphore, which a wake-up posts.
//!
//! Lifetime contract: the module keeps the address of an
//! `ngx_http_lua_sema_t` that Lua owns and frees when its semaphore object
//! is collected. So Lua registers the address only together with an anchor
//! that keeps the object alive for as long as the address is registered
//! (events_core.lua stores the semaphore in the Lua registry, not in a
//! module upvalue that a re-`require` would drop), replaces both together,
//! and clears both before it lets the semaphore go. On this side the
//! address is forgotten when Lua registers another one or NULL, and at
//! worker exit, so nothing posts a semaphore after its worker stopped
//! reading.

use core::cell::Cell;
use core::ffi::c_void;

use super::one_thread::OneThread;

/// lua-nginx-module's `ngx_http_lua_ffi_sema_post(sem, n)`.
type SemaPost = unsafe extern "C" fn(sem: *mut c_void, n: i32) -> i32;

struct Registered {
    sem: Cell<*mut c_void>,
    /// Looked up on first use: the Lua module is loaded before ours is called.
    post: Cell<Option<SemaPost>>,
}

static REGISTERED: OneThread<Registered> =
    OneThread::new(Registered { sem: Cell::new(core::ptr::null_mut()), post: Cell::new(None) });

/// Registers the poller's semaphore (NULL forgets it): see the contract above.
pub fn register(sem: *mut c_void) {
    REGISTERED.get().sem.set(sem);
}

pub fn is_registered() -> bool {
    !REGISTERED.get().sem.get().is_null()
}

/// Posts the registered semaphore once, if there is one.
pub fn post() {
    let r = REGISTERED.get();
    let sem = r.sem.get();
    if sem.is_null() {
        return;
    }
    let f = match r.post.get() {
        Some(f) => f,
        None => {
            // SAFETY: dlsym with a NUL-terminated name; the Lua module is loaded RTLD_GLOBAL.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"ngx_http_lua_ffi_sema_post".as_ptr()) };
            if p.is_null() {
                return;
            }
            // SAFETY: the symbol has this signature in lua-nginx-module 0.10.x.
            let f = unsafe { core::mem::transmute::<*mut c_void, SemaPost>(p) };
            r.post.set(Some(f));
            f
        }
    };
    // SAFETY: by the contract above, a registered address belongs to a
    // semaphore Lua keeps alive until it registers another one or NULL.
    unsafe { f(sem, 1) };
}
