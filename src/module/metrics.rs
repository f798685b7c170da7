//! `workerbus_metrics;` in a location: the status snapshot in Prometheus's
//! text format (rendered by src/prom.rs). Off unless configured.

use core::ffi::{c_char, c_void};

use nginx_sys::{ngx_command_t, ngx_conf_t, ngx_http_request_t, ngx_int_t};
use ngx::core::NGX_CONF_OK;

use super::http;
use super::status::snapshot;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub unsafe extern "C" fn set_metrics(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    http::set_handler(cf, handler);
    NGX_CONF_OK
}

/// The metrics text of this process's view of the node.
pub fn text() -> String {
    crate::prom::render(&snapshot())
}

unsafe extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a content handler with a live request.
    let r = unsafe { &mut *r };
    if let Err(rc) = http::accept_get(r) {
        return rc;
    }
    http::send(r, CONTENT_TYPE, text().as_bytes())
}
