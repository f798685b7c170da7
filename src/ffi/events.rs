//! FFI for the event ring (resty.worker.events, resty.events).
