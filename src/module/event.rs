//! nginx events this crate owns (timers and posted events): one process-wide
//! dummy connection for their `data`, and the three moves every owner makes
//! on them (set up, post unless posted, cancel).
//!
//! An `Event` lives in process-static memory (the methods take `&'static
//! self`), so nginx may keep its address in the timer tree or the posted
//! queue for as long as it likes; only the process's one thread touches it
//! (see one_thread.rs).

use core::cell::UnsafeCell;

use nginx_sys::{ngx_connection_t, ngx_event_t, ngx_log_t, ngx_msec_t};

use super::one_thread::OneThread;

/// What every event here points `data` at: nginx's timer code logs
/// `ev->data` as a connection's fd at debug level, as for its own timers.
static DUMMY: OneThread<UnsafeCell<ngx_connection_t>> =
    // SAFETY: an all-zero connection is only ever read for its fd field (set to -1 below).
    OneThread::new(UnsafeCell::new(unsafe { core::mem::zeroed() }));

fn dummy_connection() -> *mut ngx_connection_t {
    let c = DUMMY.get().get();
    // SAFETY: process-static, touched by this thread only, and nothing holds
    // a reference into it (nginx only reads its fd through the pointer).
    unsafe { (*c).fd = -1 };
    c
}

/// An nginx event owned by this crate.
pub struct Event(UnsafeCell<ngx_event_t>);

impl Event {
    /// An unused event (all zero is nginx's own "unused" state).
    pub const fn new() -> Self {
        // SAFETY: an all-zero ngx_event_t is nginx's unused event.
        Event(UnsafeCell::new(unsafe { core::mem::zeroed() }))
    }

    /// The address nginx keeps.
    pub fn as_ptr(&'static self) -> *mut ngx_event_t {
        self.0.get()
    }

    /// Whether `init` ran.
    pub fn is_set_up(&'static self) -> bool {
        // SAFETY: a read of our own process-static event on its one thread.
        unsafe { (*self.0.get()).handler.is_some() }
    }

    /// Sets the handler and the log, points `data` at the dummy connection,
    /// and makes the event cancelable (a timer that only keeps a background
    /// task alive does not hold up a graceful shutdown). Only while the event
    /// is neither armed nor posted.
    pub fn init(&'static self, log: *mut ngx_log_t, handler: unsafe extern "C" fn(*mut ngx_event_t)) {
        let ev = self.0.get();
        // SAFETY: our own process-static event, touched by this thread only;
        // the caller sets it up before arming or posting it.
        unsafe {
            (*ev).handler = Some(handler);
            (*ev).log = log;
            (*ev).data = dummy_connection().cast();
            (*ev).set_cancelable(1);
        }
    }

    /// The log set by `init` (null before).
    pub fn log(&'static self) -> *mut ngx_log_t {
        // SAFETY: as in is_set_up.
        unsafe { (*self.0.get()).log }
    }

    /// Arms (or re-arms) the event's timer.
    pub fn add_timer(&'static self, ms: ngx_msec_t) {
        // SAFETY: the event is process-static (nginx may keep its address)
        // and was set up by init, on this thread.
        unsafe { nginx_sys::ngx_add_timer(self.0.get(), ms) }
    }

    /// Whether the event waits in nginx's posted queue.
    pub fn is_posted(&'static self) -> bool {
        // SAFETY: as in is_set_up.
        unsafe { (*self.0.get()).posted() != 0 }
    }

    /// Posts the event to nginx's queue, unless it is already there.
    pub fn post(&'static self) {
        let ev = self.0.get();
        // SAFETY: as in add_timer; nginx's posted queue is this thread's too.
        unsafe {
            if (*ev).posted() == 0 {
                nginx_sys::ngx_post_event(ev, &raw mut nginx_sys::ngx_posted_events);
            }
        }
    }

    /// Takes the event out of the timer tree and the posted queue, where it is.
    pub fn cancel(&'static self) {
        let ev = self.0.get();
        // SAFETY: as in add_timer; each removal only where the event is.
        unsafe {
            if (*ev).timer_set() != 0 {
                nginx_sys::ngx_del_timer(ev);
            }
            if (*ev).posted() != 0 {
                nginx_sys::ngx_delete_posted_event(ev);
            }
        }
    }
}

impl Default for Event {
    fn default() -> Self {
        Event::new()
    }
}
