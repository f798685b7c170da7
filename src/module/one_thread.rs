//! The wrapper that lets per-process state live in a `static`.

/// A value reached from one thread only: nginx runs every module hook, timer,
/// event handler and Lua FFI call of a process on its one event-loop thread
/// (workerbus starts no threads), which is what makes the `Sync` below true.
pub struct OneThread<T>(T);

// SAFETY: see the type's comment: one thread per process touches the value.
unsafe impl<T> Sync for OneThread<T> {}

impl<T> OneThread<T> {
    pub const fn new(v: T) -> Self {
        OneThread(v)
    }

    pub fn get(&'static self) -> &'static T {
        &self.0
    }
}
