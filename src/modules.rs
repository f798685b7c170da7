//! The nginx modules this shared object carries, as `load_module` reads
//! them: the core module (zones, lifecycle, events; src/module), the
//! PostgreSQL bridge's core module (src/pg) and the http module (the
//! status and metrics handlers). The bridge's process hooks run from the
//! core module's (module::extension), which knows when a worker started.

use core::ffi::c_char;
use core::ptr;

use nginx_sys::ngx_module_t;

use crate::module::{ngx_http_workerbus_module, ngx_workerbus_module};
use crate::pg::glue::ngx_workerbus_pg_module;

// Written out by hand: ngx's `ngx_modules!` macro miscounts more than one
// module in 0.5.1.
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static mut ngx_modules: [*const ngx_module_t; 4] = [
    &raw const ngx_workerbus_module,
    &raw const ngx_workerbus_pg_module,
    &raw const ngx_http_workerbus_module,
    ptr::null(),
];

#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static mut ngx_module_names: [*const c_char; 4] = [
    c"ngx_workerbus_module".as_ptr(),
    c"ngx_workerbus_pg_module".as_ptr(),
    c"ngx_http_workerbus_module".as_ptr(),
    ptr::null(),
];

#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static mut ngx_module_order: [*const c_char; 1] = [ptr::null()];
