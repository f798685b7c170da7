//! The Lua event pollers' ngx.semaphores (one per Lua VM: http, stream),
//! which a wake-up posts, each through its own subsystem's function.
//!
//! Lifetime contract: the module keeps the address of an
//! `ngx_http_lua_sema_t` (`ngx_stream_lua_sema_t` for stream) that Lua owns and frees when its semaphore object
//! is collected. So Lua registers the address only together with an anchor
//! that keeps the object alive for as long as the address is registered
//! (events_core.lua stores the semaphore in the Lua registry, not in a
//! module upvalue that a re-`require` would drop), replaces both together,
//! and clears both before it lets the semaphore go. On this side the
//! address is forgotten when Lua registers another one or NULL, and at
//! worker exit, so nothing posts a semaphore after its worker stopped
//! reading.

use core::cell::Cell;
use core::ffi::{CStr, c_void};

use crate::shm::lifecycle::READERS_PER_RECORD;

use super::one_thread::OneThread;

/// A Lua VM of this process: the one of lua-nginx-module (http) or of
/// stream-lua-nginx-module (stream). Each has its own ring readers and its
/// own poller semaphore (docs/events.md, "http and stream").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vm {
    Http = 0,
    Stream = 1,
}

impl Vm {
    pub const ALL: [Vm; READERS_PER_RECORD] = [Vm::Http, Vm::Stream];

    /// The VM behind the C ABI's `vm` argument (0 http, 1 stream).
    pub fn from_index(i: i32) -> Option<Vm> {
        match i {
            0 => Some(Vm::Http),
            1 => Some(Vm::Stream),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Vm::Http => "http",
            Vm::Stream => "stream",
        }
    }

    /// The subsystem's `ngx_*_lua_ffi_sema_post(sem, n)`: each VM's
    /// semaphores are its own module's structures, posted by its own code.
    fn post_symbol(self) -> &'static CStr {
        match self {
            Vm::Http => c"ngx_http_lua_ffi_sema_post",
            Vm::Stream => c"ngx_stream_lua_ffi_sema_post",
        }
    }
}

/// `ngx_http_lua_ffi_sema_post(sem, n)` / `ngx_stream_lua_ffi_sema_post(sem, n)`.
type SemaPost = unsafe extern "C" fn(sem: *mut c_void, n: i32) -> i32;

struct Registered {
    sem: [Cell<*mut c_void>; READERS_PER_RECORD],
    /// Looked up when a semaphore is registered: the VM's module is loaded by then.
    post: [Cell<Option<SemaPost>>; READERS_PER_RECORD],
}

static REGISTERED: OneThread<Registered> = OneThread::new(Registered {
    sem: [Cell::new(core::ptr::null_mut()), Cell::new(core::ptr::null_mut())],
    post: [Cell::new(None), Cell::new(None)],
});

fn lookup(vm: Vm) -> Option<SemaPost> {
    // SAFETY: dlsym with a NUL-terminated name; the Lua modules are loaded
    // RTLD_GLOBAL (stream-lua may be absent: NULL then).
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, vm.post_symbol().as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: both symbols have this signature in lua-nginx-module 0.10.x
    // and stream-lua-nginx-module 0.0.x.
    Some(unsafe { core::mem::transmute::<*mut c_void, SemaPost>(p) })
}

/// Registers VM `vm`'s poller semaphore (NULL forgets it): see the contract
/// above. Fails, naming the function, when the VM's module has no
/// semaphore post function to call (nothing is registered then).
pub fn register(vm: Vm, sem: *mut c_void) -> Result<(), String> {
    let r = REGISTERED.get();
    let i = vm.index();
    if sem.is_null() {
        r.sem[i].set(sem);
        return Ok(());
    }
    if r.post[i].get().is_none() {
        let Some(f) = lookup(vm) else {
            r.sem[i].set(core::ptr::null_mut());
            return Err(format!(
                "cannot wake the {} poller: {} not found in this nginx",
                vm.name(),
                vm.post_symbol().to_string_lossy()
            ));
        };
        r.post[i].set(Some(f));
    }
    r.sem[i].set(sem);
    Ok(())
}

/// Forgets every VM's semaphore (worker exit).
pub fn forget_all() {
    for s in &REGISTERED.get().sem {
        s.set(core::ptr::null_mut());
    }
}

pub fn is_registered(vm: Vm) -> bool {
    !REGISTERED.get().sem[vm.index()].get().is_null()
}

/// Posts each registered semaphore once (every VM of this process: a
/// wake-up does not say for whom it is, and a poller woken with nothing to
/// read only looks and sleeps again).
pub fn post() {
    let r = REGISTERED.get();
    for i in 0..READERS_PER_RECORD {
        let sem = r.sem[i].get();
        let Some(f) = r.post[i].get() else { continue };
        if sem.is_null() {
            continue;
        }
        // SAFETY: by the contract above, a registered address belongs to a
        // semaphore of this VM that Lua keeps alive until it registers
        // another one or NULL; f is that VM's own post function.
        unsafe { f(sem, 1) };
    }
}
