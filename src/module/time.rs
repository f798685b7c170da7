//! Wall-clock milliseconds from nginx's cached time (no syscall).

/// Milliseconds since the epoch, as of the event loop's last time update.
pub fn now_ms() -> u64 {
    let tp = nginx_sys::ngx_timeofday();
    (tp.sec as u64).saturating_mul(1000).saturating_add(tp.msec as u64)
}
