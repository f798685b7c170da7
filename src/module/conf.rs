//! Main-context directives: `workerbus_zone`, `workerbus_heartbeat`,
//! `workerbus_hang_timeout`. Each handler turns its raw arguments into typed
//! values first and reports a bad value with the directive and the value.
//! The configuration they fill is read back through the cycle
//! (`of_cycle`, `running`), as nginx's own modules do with ngx_get_conf.

use core::ffi::{c_char, c_void};
use core::ptr;

use nginx_sys::{
    NGX_CONF_TAKE1, NGX_CONF_TAKE23, NGX_DIRECT_CONF, NGX_LOG_EMERG, NGX_MAIN_CONF, ngx_command_t, ngx_conf_t,
    ngx_cycle_t, ngx_msec_t, ngx_shm_zone_t, ngx_str_t,
};
use ngx::core::{CoreModuleMainConf, NGX_CONF_ERROR, NGX_CONF_OK, NgxCoreModule};

use super::{WorkerbusModule, directive, zone};
use crate::shm::lifecycle::{MAX_WORKER_RECORDS, records_for, records_needed};

/// Zone used when the configuration names none, so that `load_module` alone
/// is enough for the Lua modules.
pub const DEFAULT_ZONE_NAME: &str = "workerbus";
/// 32m: its ring (half the zone, 16 MB) holds 100,000 events of 64 bytes
/// with room to spare (about 150,000 at ~110 bytes each in the ring), the
/// burst a user of the original sizes a 64m lua_shared_dict for. Pages
/// of a shared zone cost memory only once written.
pub const DEFAULT_ZONE_SIZE: usize = 32 * 1024 * 1024;
/// Below this the zone cannot hold its header, lifecycle table and a ring worth having.
pub const MIN_ZONE_SIZE: usize = 256 * 1024;
pub const MAX_ZONES: usize = 16;
const DEFAULT_HEARTBEAT_MS: ngx_msec_t = 1000;
const DEFAULT_HANG_TIMEOUT_MS: ngx_msec_t = 5000;
const UNSET_MSEC: ngx_msec_t = ngx_msec_t::MAX;

/// The core module's configuration, one per cycle, allocated in the cycle pool.
#[repr(C)]
pub struct CoreConf {
    pub zones: [*mut ngx_shm_zone_t; MAX_ZONES],
    pub nzones: usize,
    pub heartbeat_ms: ngx_msec_t,
    pub hang_timeout_ms: ngx_msec_t,
}

impl CoreConf {
    pub fn zones(&self) -> &[*mut ngx_shm_zone_t] {
        &self.zones[..self.nzones.min(MAX_ZONES)]
    }
}

/// Where every directive of the core module may stand: the main context only.
const MAIN: u32 = NGX_MAIN_CONF | NGX_DIRECT_CONF;

pub static mut CORE_COMMANDS: [ngx_command_t; 4] = [
    directive(ngx::ngx_string!("workerbus_zone"), MAIN | NGX_CONF_TAKE23, set_zone),
    directive(ngx::ngx_string!("workerbus_heartbeat"), MAIN | NGX_CONF_TAKE1, set_heartbeat),
    directive(ngx::ngx_string!("workerbus_hang_timeout"), MAIN | NGX_CONF_TAKE1, set_hang_timeout),
    ngx_command_t::empty(),
];

/// This module's configuration in `cycle` (none in nginx's init cycle,
/// which has no configuration yet).
pub fn of_cycle(cycle: *const ngx_cycle_t) -> Option<&'static CoreConf> {
    // SAFETY: nginx's cycles are live while a process runs on them; the
    // slot of this module in conf_ctx holds what create() made for it.
    WorkerbusModule::main_conf(unsafe { cycle.as_ref()? })
}

/// The configuration of the cycle this process runs (in the master during a
/// load: the one being replaced, or none on the first start).
pub fn running() -> Option<&'static CoreConf> {
    // SAFETY: ngx_cycle is nginx's running cycle, read on its one thread.
    of_cycle(unsafe { nginx_sys::ngx_cycle })
}

/// `workerbus_heartbeat` of the running configuration.
pub fn heartbeat_ms() -> ngx_msec_t {
    running().map_or(DEFAULT_HEARTBEAT_MS, |c| c.heartbeat_ms)
}

/// `workerbus_hang_timeout` of `conf` (the default without one).
pub fn hang_timeout_ms(conf: Option<&CoreConf>) -> u64 {
    conf.map_or(DEFAULT_HANG_TIMEOUT_MS, |c| c.hang_timeout_ms) as u64
}

/// `worker_processes` of `cycle` (nginx's core configuration), at least 1.
pub fn worker_processes(cycle: *const ngx_cycle_t) -> u32 {
    // SAFETY: a configured cycle, whose core module configuration nginx made.
    let ccf = unsafe { cycle.as_ref() }.and_then(NgxCoreModule::main_conf);
    ccf.map_or(1, |c| c.worker_processes.max(1) as u32)
}

/// create_conf's work: a configuration with its times unset. Null when the
/// cycle's pool has no room.
pub fn create(cycle: *mut ngx_cycle_t) -> *mut CoreConf {
    // SAFETY: nginx passes the cycle being configured; its pool lives as long as the cycle.
    let p = unsafe { nginx_sys::ngx_pcalloc((*cycle).pool, size_of::<CoreConf>()) } as *mut CoreConf;
    if p.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: p is a fresh, zeroed, suitably aligned allocation of CoreConf's size.
    unsafe {
        (*p).heartbeat_ms = UNSET_MSEC;
        (*p).hang_timeout_ms = UNSET_MSEC;
    }
    p
}

/// init_conf's work: defaults, the default zone, and the check of
/// worker_processes against every zone (whose init learns it through the
/// zone's own data).
pub fn finish(cycle: *mut ngx_cycle_t, cc: &mut CoreConf) -> *mut c_char {
    if cc.heartbeat_ms == UNSET_MSEC {
        cc.heartbeat_ms = DEFAULT_HEARTBEAT_MS;
    }
    if cc.hang_timeout_ms == UNSET_MSEC {
        cc.hang_timeout_ms = DEFAULT_HANG_TIMEOUT_MS;
    }
    if add_default_zone(cycle, cc) != NGX_CONF_OK {
        return NGX_CONF_ERROR;
    }
    if let Err(why) = check_workers(cycle, cc) {
        // SAFETY: the cycle being configured has a log.
        ngx::ngx_log_error!(NGX_LOG_EMERG, unsafe { (*cycle).log }, "{}", why);
        return NGX_CONF_ERROR;
    }
    NGX_CONF_OK
}

/// worker_processes sizes every zone's lifecycle table and its ring's
/// readers: refuse a count the tables cannot hold, or a zone too small for
/// them, naming the directive and the value.
fn check_workers(cycle: *mut ngx_cycle_t, cc: &CoreConf) -> Result<(), String> {
    let workers = worker_processes(cycle) as usize;
    for &z in cc.zones() {
        zone::set_workers(z, workers);
    }
    let needed = records_needed(workers);
    if needed > MAX_WORKER_RECORDS {
        return Err(format!(
            "workerbus: \"worker_processes {workers}\" is too many: the lifecycle table holds at most \
             {MAX_WORKER_RECORDS} workers, and a reload's drain needs room for two per worker process; \
             use at most {}",
            MAX_WORKER_RECORDS / 2
        ));
    }
    let records = records_for(workers);
    for &z in cc.zones() {
        // SAFETY: zones recorded in this cycle's configuration.
        let (name, size) = unsafe { (show(&(*z).shm.name), (*z).shm.size) };
        let need = super::layout::estimate(size, records);
        if need > size {
            return Err(format!(
                "workerbus: zone \"{name}\" of {}k is too small for \"worker_processes {workers}\" \
                 ({records} worker records and their ring readers need about {}k); \
                 raise its size in \"workerbus_zone {name} <size>;\"",
                size / 1024,
                need.div_ceil(1024)
            ));
        }
    }
    Ok(())
}

/// Adds the default zone when the configuration declares none.
fn add_default_zone(cycle: *mut ngx_cycle_t, cc: &mut CoreConf) -> *mut c_char {
    if cc.nzones == 0 {
        // SAFETY: a configuration context nginx accepts for ngx_shared_memory_add:
        // it reads only cycle, pool, log and (when null) skips the file name.
        let mut cf: ngx_conf_t = unsafe { core::mem::zeroed() };
        // SAFETY: the cycle is valid for the duration of the call.
        unsafe {
            cf.cycle = cycle;
            cf.pool = (*cycle).pool;
            cf.log = (*cycle).log;
        }
        match zone::add(&mut cf, DEFAULT_ZONE_NAME.as_bytes(), DEFAULT_ZONE_SIZE, false) {
            Some(z) => {
                cc.zones[0] = z;
                cc.nzones = 1;
            }
            None => return NGX_CONF_ERROR,
        }
    }
    NGX_CONF_OK
}

/// The directive's arguments after its name.
unsafe fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: during a directive handler cf->args holds the directive's words.
    unsafe {
        let a = &*(*cf).args;
        let words = core::slice::from_raw_parts(a.elts as *const ngx_str_t, a.nelts);
        words.get(1..).unwrap_or(&[])
    }
}

/// Logs `"directive" directive: msg` at the line being parsed.
fn emerg(cf: *mut ngx_conf_t, cmd: *mut ngx_command_t, msg: &str) -> *mut c_char {
    // SAFETY: cmd is the command table entry nginx is running.
    let name = unsafe { show(&(*cmd).name) };
    ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"{}\" directive: {}", name, msg);
    NGX_CONF_ERROR
}

fn show(s: &ngx_str_t) -> String {
    String::from_utf8_lossy(s.as_bytes()).into_owned()
}

/// `workerbus_zone NAME SIZE [overflow=refuse|overwrite];`
unsafe extern "C" fn set_zone(cf: *mut ngx_conf_t, cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: NGX_DIRECT_CONF gives this module's CoreConf for the cycle.
    let cc = unsafe { &mut *(conf as *mut CoreConf) };
    // SAFETY: called by nginx as a directive handler.
    let (name, size, opt) = match unsafe { args(cf) } {
        [name, size] => (name, size, None),
        [name, size, opt] => (name, size, Some(opt)),
        _ => return emerg(cf, cmd, "takes a zone name, a size and optionally overflow=refuse|overwrite"),
    };
    let name_s = show(name);
    // What a post does when the ring is full: refused while a responsive
    // worker has not read what it would overwrite, or overwrite the oldest.
    let overwrite = match opt.map(|o| o.as_bytes()) {
        None | Some(b"overflow=refuse") => false,
        Some(b"overflow=overwrite") => true,
        Some(_) => {
            let o = opt.map(show).unwrap_or_default();
            return emerg(
                cf,
                cmd,
                &format!(
                    "invalid parameter \"{o}\" for zone \"{name_s}\": use overflow=refuse (the default) or \
                     overflow=overwrite"
                ),
            );
        }
    };
    if name.is_empty() {
        return emerg(cf, cmd, "invalid zone name \"\"");
    }
    if !name.as_bytes().iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) {
        return emerg(cf, cmd, &format!("invalid zone name \"{name_s}\": use letters, digits, '_', '-' and '.'"));
    }
    let mut sv = *size;
    // SAFETY: ngx_parse_size reads the string and does not keep it.
    let bytes = unsafe { nginx_sys::ngx_parse_size(&mut sv) };
    if bytes <= 0 {
        return emerg(cf, cmd, &format!("invalid zone size \"{}\" for zone \"{name_s}\"", show(size)));
    }
    let bytes = bytes as usize;
    if bytes < MIN_ZONE_SIZE {
        return emerg(
            cf,
            cmd,
            &format!("zone \"{name_s}\" is too small: \"{}\", the minimum is {}k", show(size), MIN_ZONE_SIZE / 1024),
        );
    }
    for &z in cc.zones() {
        // SAFETY: zones recorded earlier in this cycle's configuration.
        if unsafe { (*z).shm.name.as_bytes() } == name.as_bytes() {
            return emerg(cf, cmd, &format!("duplicate zone \"{name_s}\""));
        }
    }
    if cc.nzones >= MAX_ZONES {
        return emerg(cf, cmd, &format!("too many zones: at most {MAX_ZONES}"));
    }
    match zone::add(cf, name.as_bytes(), bytes, overwrite) {
        Some(z) => {
            cc.zones[cc.nzones] = z;
            cc.nzones += 1;
            NGX_CONF_OK
        }
        None => NGX_CONF_ERROR,
    }
}

fn parse_msec(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
    field: fn(&mut CoreConf) -> &mut ngx_msec_t,
) -> *mut c_char {
    // SAFETY: NGX_DIRECT_CONF gives this module's CoreConf for the cycle.
    let cc = unsafe { &mut *(conf as *mut CoreConf) };
    // SAFETY: called by nginx as a directive handler.
    let [value] = (unsafe { args(cf) }) else {
        return emerg(cf, cmd, "takes one time value");
    };
    if *field(cc) != UNSET_MSEC {
        return emerg(cf, cmd, "is duplicate");
    }
    let mut v = *value;
    // SAFETY: ngx_parse_time reads the string and does not keep it.
    let ms = unsafe { nginx_sys::ngx_parse_time(&mut v, 0) };
    if ms < 100 {
        let why = if ms < 0 { "invalid time" } else { "time below 100ms" };
        return emerg(cf, cmd, &format!("{why} \"{}\"", show(value)));
    }
    *field(cc) = ms as ngx_msec_t;
    NGX_CONF_OK
}

/// `workerbus_heartbeat TIME;` how often each worker stamps its record.
unsafe extern "C" fn set_heartbeat(cf: *mut ngx_conf_t, cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    parse_msec(cf, cmd, conf, |c| &mut c.heartbeat_ms)
}

/// `workerbus_hang_timeout TIME;` heartbeat overrun after which a live worker counts as hung.
unsafe extern "C" fn set_hang_timeout(cf: *mut ngx_conf_t, cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    parse_msec(cf, cmd, conf, |c| &mut c.hang_timeout_ms)
}
