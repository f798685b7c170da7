//! The master's configuration phase (init_by_lua runs in it): no worker
//! exists yet and, on a first start, the zones may not be mapped either
//! (init_by_lua runs before zone init unless lua_shared_dict zones exist;
//! docs/lifecycle.md, "init_by_lua is not a worker", says why and what).
//! Calls from Lua there must never start a "worker" in the master (its
//! children would inherit it), so:
//! - zone indexes resolve against the configuration being loaded;
//! - posted events are held in the master's memory and posted by
//!   init_module, after the new generation's first event was recorded, so
//!   every worker of the generation reads them, and a respawn does not;
//! - every other call that needs a zone fails with a message that says so.

use core::cell::Cell;

use nginx_sys::{NGX_LOG_ERR, NGX_PROCESS_WORKER, ngx_cycle_t};

use crate::shm::ring::RecordIn;

use super::conf::{self, CoreConf, DEFAULT_ZONE_NAME};
use super::one_thread::OneThread;
use super::pid;
use super::zone::Zone;

/// Largest event (source + event + unique + data) held for the workers.
const MAX_HELD_EVENT: usize = 64 * 1024;
/// Most bytes of events held at once.
const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;

pub const NOT_HERE: &str = "not available in init_by_lua: the zones are not ready and no worker runs yet \
                            (configure and post work there; call this from init_worker_by_lua or later)";

/// An event posted during the configuration phase.
pub struct Held {
    zone: Vec<u8>,
    source: Vec<u8>,
    event: Vec<u8>,
    unique: Vec<u8>,
    data: Vec<u8>,
    flags: u32,
}

/// The configuration phase, between create_conf and init_module (master).
struct Loading {
    /// The configuration being loaded (null outside the phase).
    conf: Cell<*mut CoreConf>,
    /// The events posted in the phase, for init_module.
    held: Cell<Vec<Held>>,
}

static LOADING: OneThread<Loading> =
    OneThread::new(Loading { conf: Cell::new(core::ptr::null_mut()), held: Cell::new(Vec::new()) });

/// create_conf: a configuration load begins (init_by_lua may run before
/// init_module); what an earlier, failed load held is dropped.
pub fn begin(conf: *mut CoreConf) {
    let l = LOADING.get();
    l.conf.set(conf);
    drop(l.held.take());
}

/// True in the master (or single process) while a configuration loads,
/// before init_module: where init_by_lua runs.
pub fn in_config_phase() -> bool {
    // SAFETY: set by nginx at process start.
    let process = unsafe { nginx_sys::ngx_process } as u32;
    !LOADING.get().conf.get().is_null() && process != NGX_PROCESS_WORKER
}

fn conf() -> Option<&'static CoreConf> {
    // SAFETY: set by create_conf to the configuration of the cycle being
    // loaded, which outlives the configuration phase.
    unsafe { LOADING.get().conf.get().as_ref() }
}

/// Works on the events held so far (taken out for the call and put back
/// after it, so no borrow of the state is open).
fn with_held<R>(f: impl FnOnce(&mut Vec<Held>) -> R) -> R {
    let cell = &LOADING.get().held;
    let mut held = cell.take();
    let r = f(&mut held);
    cell.set(held);
    r
}

fn zone_name(cc: &CoreConf, i: usize) -> Option<Vec<u8>> {
    // SAFETY: zones recorded in the configuration being loaded.
    cc.zones().get(i).map(|&z| unsafe { (*z).shm.name.as_bytes().to_vec() })
}

/// Index a zone will have in the workers: its place among the zones
/// declared so far ("" is the primary one).
pub fn zone_index(name: &[u8]) -> Result<i32, String> {
    let cc = conf().ok_or("no configuration is being loaded")?;
    if name.is_empty() {
        return Ok(0);
    }
    for i in 0..cc.nzones {
        if zone_name(cc, i).as_deref() == Some(name) {
            return Ok(i as i32);
        }
    }
    if cc.nzones == 0 && name == DEFAULT_ZONE_NAME.as_bytes() {
        // Declared by init_conf later, as the only zone, unless a
        // workerbus_zone line follows: init_module checks the name.
        return Ok(0);
    }
    let n = String::from_utf8_lossy(name);
    Err(format!(
        "no workerbus zone \"{n}\" declared before init_by_lua runs; declare it with \"workerbus_zone {n} <size>;\" \
         before the http block"
    ))
}

fn held_zone_name(index: i32) -> Option<Vec<u8>> {
    let cc = conf()?;
    if index == 0 && cc.nzones == 0 {
        return Some(DEFAULT_ZONE_NAME.as_bytes().to_vec());
    }
    zone_name(cc, usize::try_from(index).ok()?)
}

/// Largest event the configuration phase holds for zone `index`.
pub fn max_payload(index: i32) -> usize {
    let Some(cc) = conf() else { return 0 };
    // SAFETY: zones recorded in the configuration being loaded.
    let size =
        cc.zones().get(index.max(0) as usize).map_or(super::conf::DEFAULT_ZONE_SIZE, |&z| unsafe { (*z).shm.size });
    // Well below what the zone's ring takes (an eighth of the zone).
    (size / 16).min(MAX_HELD_EVENT)
}

/// Holds an event until init_module posts it.
pub fn hold(index: i32, rec: &RecordIn) -> Result<i64, String> {
    let zone = held_zone_name(index).ok_or_else(|| format!("bad zone index {index}"))?;
    let len = rec.source.len() + rec.event.len() + rec.unique.len() + rec.data.len();
    if len > max_payload(index) {
        return Err(format!(
            "event of {len} bytes is larger than the {} bytes an event posted in init_by_lua may have",
            max_payload(index)
        ));
    }
    with_held(|held| {
        let total: usize = held.iter().map(|h| h.source.len() + h.event.len() + h.unique.len() + h.data.len()).sum();
        if total + len > MAX_HELD_BYTES {
            return Err(format!("events posted in init_by_lua exceed {} bytes in all", MAX_HELD_BYTES));
        }
        held.push(Held {
            zone,
            source: rec.source.to_vec(),
            event: rec.event.to_vec(),
            unique: rec.unique.to_vec(),
            data: rec.data.to_vec(),
            flags: rec.flags,
        });
        Ok(0)
    })
}

/// init_module: the configuration phase ends; post what it held into the
/// new generation (its first event was recorded before), under the
/// configuration of `cycle`, the one being loaded.
pub fn flush(zones: &[Zone], cycle: *mut ngx_cycle_t) {
    let l = LOADING.get();
    l.conf.set(core::ptr::null_mut());
    // SAFETY: nginx passes init_module a live cycle.
    let log = unsafe { (*cycle).log };
    let cc = conf::of_cycle(cycle);
    let me = pid();
    for h in l.held.take() {
        let rec =
            RecordIn { source: &h.source, event: &h.event, unique: &h.unique, data: &h.data, pid: me, flags: h.flags };
        let posted = match zones.iter().position(|z| z.name() == h.zone) {
            Some(i) => super::ring_glue::post_with(i, &zones[i], &rec, cc).map(|_| ()),
            None => Err("the zone is not in the configuration".into()),
        };
        if let Err(e) = posted {
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "workerbus: event \"{}\" by \"{}\" posted in init_by_lua to zone \"{}\" was not delivered: {e}",
                String::from_utf8_lossy(&h.event),
                String::from_utf8_lossy(&h.source),
                String::from_utf8_lossy(&h.zone)
            );
        }
    }
}
