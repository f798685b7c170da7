//! The nginx glue: module tables, directives, zones, process hooks, the
//! heartbeat timer and the status handler. Two nginx modules live in the one
//! shared object: a core module (main-context directives, zones, lifecycle)
//! and an http module (the `workerbus_status` and `workerbus_metrics`
//! location handlers).

// The glue's functions take the pointers nginx hands to module hooks (cycle,
// log, configuration); nginx guarantees them valid for the call, which is the
// contract of every function here, so the two lints below would only repeat it.
#![allow(clippy::not_unsafe_ptr_arg_deref, clippy::missing_safety_doc)]

pub mod conf;
pub mod event;
pub mod extension;
pub mod heartbeat;
pub mod hop;
pub mod http;
pub mod layout;
pub mod metrics;
pub mod one_thread;
pub mod preload;
pub mod process;
pub mod process_state;
pub mod ring_glue;
pub mod sema;
pub mod status;
pub mod sync;
pub mod time;
pub mod wake;
pub mod wake_fd;
pub mod zone;

use core::ffi::{c_char, c_void};
use core::ptr;

use nginx_sys::{
    NGX_CONF_NOARGS, NGX_CORE_MODULE, NGX_HTTP_LOC_CONF, NGX_HTTP_MODULE, ngx_command_t, ngx_core_module_t,
    ngx_http_module_t, ngx_module_t,
};
use ngx::core::{CoreModule, CoreModuleMainConf};

pub use conf::CoreConf;

/// The core module, as the ngx crate's traits know it: its configuration is
/// reached through the cycle with `WorkerbusModule::main_conf` (conf.rs).
pub struct WorkerbusModule;

impl CoreModule for WorkerbusModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: a static nginx reads and writes (its index) only while it
        // loads modules, before any module code asks for it.
        unsafe { &*ptr::addr_of!(ngx_workerbus_module) }
    }
}

// SAFETY: create_conf (process.rs, conf::create) makes a CoreConf for every cycle.
unsafe impl CoreModuleMainConf for WorkerbusModule {
    type MainConf = CoreConf;
}

/// The core module's context: its name and configuration hooks.
static mut CORE_CTX: ngx_core_module_t = ngx_core_module_t {
    name: ngx::ngx_string!("workerbus"),
    create_conf: Some(process::create_conf),
    init_conf: Some(process::init_conf),
};

#[used]
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static mut ngx_workerbus_module: ngx_module_t = ngx_module_t {
    ctx: &raw const CORE_CTX as *mut c_void,
    // SAFETY: only the address is taken; nginx reads the table, never moves it.
    commands: unsafe { &raw mut conf::CORE_COMMANDS[0] },
    type_: NGX_CORE_MODULE as _,
    init_module: Some(process::init_module),
    init_process: Some(process::init_process),
    exit_process: Some(process::exit_process),
    ..ngx_module_t::default()
};

/// The http module's directives: each installs its content handler in the location.
pub static mut HTTP_COMMANDS: [ngx_command_t; 3] = [
    directive(ngx::ngx_string!("workerbus_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, status::set_status),
    directive(ngx::ngx_string!("workerbus_metrics"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, metrics::set_metrics),
    ngx_command_t::empty(),
];

/// The http module has no configuration of its own: `workerbus_status` and
/// `workerbus_metrics` only install a content handler in the location.
static mut HTTP_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: None,
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: None,
    merge_loc_conf: None,
};

#[used]
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_workerbus_module: ngx_module_t = ngx_module_t {
    ctx: &raw const HTTP_CTX as *mut c_void,
    // SAFETY: as above.
    commands: unsafe { &raw mut HTTP_COMMANDS[0] },
    type_: NGX_HTTP_MODULE as _,
    ..ngx_module_t::default()
};

/// This process's pid (nginx's `ngx_pid`, set at process start: the
/// master's in the master, each worker's own after fork).
pub fn pid() -> i32 {
    // SAFETY: a word nginx writes at process start, before any module code runs.
    unsafe { nginx_sys::ngx_pid }
}

/// The tag nginx compares to decide whether a shared zone is ours.
pub fn zone_tag() -> *mut c_void {
    (&raw mut ngx_workerbus_module).cast()
}

/// A directive of this module: its name, the contexts and argument counts
/// nginx accepts it with, and the handler that parses it (handlers find
/// their configuration themselves, so conf and offset stay 0).
pub const fn directive(
    name: nginx_sys::ngx_str_t,
    flags: u32,
    set: unsafe extern "C" fn(*mut nginx_sys::ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
) -> ngx_command_t {
    ngx_command_t { name, type_: flags as _, set: Some(set), conf: 0, offset: 0, post: ptr::null_mut() }
}
