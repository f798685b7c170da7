//! How another part of the crate plugs into the glue without the glue
//! naming it: process hooks, a status section and a wake-up subscriber. The PostgreSQL
//! bridge (src/pg) is one; it registers itself from its own nginx module's
//! configuration hook, in the master before the workers fork, so every
//! process of the cycle has the same list.

use core::cell::Cell;

use nginx_sys::ngx_cycle_t;
use serde_json::Value;

use super::one_thread::OneThread;

/// Parts that can register: a handful is all the crate has.
const MAX: usize = 4;

#[derive(Clone, Copy)]
pub struct Extension {
    /// Key of its section in the status document.
    pub name: &'static str,
    /// Its status section (`null` when not configured).
    pub status: fn() -> Value,
    /// Called when this worker's wake-up socket fires.
    pub on_wake: fn(),
    /// The worker started (its zones attached, its ring reader set up):
    /// from init_process or from the first Lua call, whichever comes first.
    pub worker_start: fn(*mut ngx_cycle_t),
    /// The worker exits through nginx, before its lifecycle record closes.
    pub worker_exit: fn(),
}

static LIST: OneThread<Cell<[Option<Extension>; MAX]>> = OneThread::new(Cell::new([None; MAX]));

/// Registers `ext`, or replaces the one of the same name (each
/// configuration load registers again).
pub fn register(ext: Extension) {
    let mut list = LIST.get().get();
    let slot = list
        .iter()
        .position(|e| e.is_some_and(|e| e.name == ext.name))
        .or_else(|| list.iter().position(Option::is_none));
    if let Some(i) = slot {
        list[i] = Some(ext);
        LIST.get().set(list);
    }
}

/// Every registered extension, in registration order.
pub fn each(mut f: impl FnMut(&Extension)) {
    for e in LIST.get().get().iter().flatten() {
        f(e);
    }
}
