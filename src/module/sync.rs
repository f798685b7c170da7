//! resty.sync's nginx side: the zone's sync table, the slab as its
//! allocator, who counts as alive for the runner lease, and the `sync`
//! section of the status document.
//!
//! The lease's expiry and every schedule (a task's last run) are on the
//! monotonic clock (`mono_ms`), which a wall-clock step does not move: a
//! step must not make a healthy runner look hung. Only an update's
//! last-modified time is wall-clock (unix time, for display and
//! get_last_modified_time).

use core::sync::atomic::Ordering;

use nginx_sys::{NGX_LOG_NOTICE, NGX_LOG_WARN};
use serde_json::{Value, json};

use crate::shm::lease::{Me, Role, Why};
use crate::shm::lifecycle::pid_alive;
use crate::shm::sync::{Slab, SyncTable};

use super::pid;
use super::process_state::this_process;
use super::time::mono_ms;
use super::zone::Zone;

/// Lua type tags of versions and data (lib/resty/sync.lua uses the same).
pub const T_STRING: u32 = 1;
pub const T_NUMBER: u32 = 2;
pub const T_BOOLEAN: u32 = 3;
pub const T_TABLE: u32 = 4;

/// The zone's sync table, if one was made.
pub fn table(zone: &Zone) -> Option<&'static SyncTable> {
    let h = zone.header();
    // Acquire: pairs with the Release store in make_table (length, zeroed table).
    let off = h.sync_off.load(Ordering::Acquire);
    let (p, len) = h.part(off, h.sync_len.load(Ordering::Relaxed))?;
    if len < SyncTable::region_size() {
        return None;
    }
    // SAFETY: made by make_table in this zone, which stays mapped for the process's life.
    Some(unsafe { SyncTable::at(p) })
}

/// The zone's sync table, made on first use (the first sync.new on the
/// zone); None when the zone has no room left for it.
pub fn table_or_make(zone: &Zone) -> Option<&'static SyncTable> {
    if let Some(t) = table(zone) {
        return Some(t);
    }
    let slab = zone.slab()?;
    let locked = slab.lock();
    let made = table(zone).is_some() || {
        let len = SyncTable::region_size();
        // SAFETY: a live slab pool whose mutex we hold; a zeroed table is a valid, empty one.
        let p = unsafe { nginx_sys::ngx_slab_calloc_locked(zone.pool, len) } as *mut u8;
        if !p.is_null() {
            let h = zone.header();
            h.sync_len.store(len as u64, Ordering::Relaxed);
            // Release: the length and the zeroed table before the offset.
            h.sync_off.store((p as usize).wrapping_sub(zone.header as usize) as u64, Ordering::Release);
        }
        !p.is_null()
    };
    drop(locked);
    if made { table(zone) } else { None }
}

/// The zone's slab pool as the store's allocator; called with the pool's mutex held.
pub struct ZoneSlab<'a>(pub &'a Zone);

impl Slab for ZoneSlab<'_> {
    fn alloc(&self, len: usize) -> Option<u64> {
        // SAFETY: a live slab pool; the store holds its mutex (zone.lock()), under
        // which log_nomem is only changed here: the store reports a refused
        // update itself (size, free bytes), so nginx's own "no memory" line is off.
        let p = unsafe {
            (*self.0.pool).set_log_nomem(0);
            let p = nginx_sys::ngx_slab_alloc_locked(self.0.pool, len);
            (*self.0.pool).set_log_nomem(1);
            p
        } as *mut u8;
        if p.is_null() {
            return None;
        }
        Some((p as usize).wrapping_sub(self.0.header as usize) as u64)
    }

    fn free(&self, off: u64) {
        // SAFETY: `off` came from alloc above, in this zone; the mutex is held.
        unsafe { nginx_sys::ngx_slab_free_locked(self.0.pool, self.at(off).cast()) }
    }

    fn free_bytes(&self) -> usize {
        self.0.free_bytes()
    }

    fn at(&self, off: u64) -> *mut u8 {
        (self.0.header as *mut u8).wrapping_add(off as usize)
    }
}

/// Whether `pid` may still run code: its process exists and, when the
/// lifecycle table tracks it, one of its records is live. A worker that
/// left through exit_process runs no more Lua even while its pid lingers.
pub fn alive(pid: i32) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Some(primary) = this_process().primary() else { return true };
    let mut tracked = false;
    for w in primary.header().lifecycle.workers().filter(|w| w.pid == pid) {
        if w.state.is_live() {
            return true;
        }
        tracked = true;
    }
    !tracked
}

/// One tick of instance `inst`'s runner lease; logs changes of owner.
pub fn tick(zone: &Zone, inst: usize, lease_ms: u64, exiting: bool) -> Option<Role> {
    let t = table(zone)?;
    let i = t.instances.get(inst)?;
    let l = this_process();
    let generation = l.generation.get();
    let current = l.primary().map_or(generation, |p| p.header().lifecycle.current_generation());
    let me = Me { pid: pid(), generation, current_generation: current, exiting };
    let role = i.lease.tick(&zone.lock(), me, mono_ms(), lease_ms, alive);
    // SAFETY: the cycle's log is valid in a running worker.
    let log = unsafe { (*nginx_sys::ngx_cycle).log };
    if let Role::TookOver { from, why } = role {
        let key = String::from_utf8_lossy(&t.instance_key(inst)).into_owned();
        let level = if matches!(why, Why::Hung) { NGX_LOG_WARN } else { NGX_LOG_NOTICE };
        if from == 0 {
            ngx::ngx_log_error!(level, log, "workerbus: sync \"{key}\": worker process {} is the runner", me.pid);
        } else {
            ngx::ngx_log_error!(
                level,
                log,
                "workerbus: sync \"{key}\": worker process {} is the runner, taken from pid {from} ({})",
                me.pid,
                why.name()
            );
        }
    }
    Some(role)
}

fn lua_value(t: u32, bytes: &[u8]) -> Value {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).into_owned();
    match t {
        T_NUMBER => s.parse::<f64>().map_or(Value::String(s), |n| json!(n)),
        T_BOOLEAN => json!(bytes == b"1"),
        _ => Value::String(s),
    }
}

fn type_name(t: u32) -> &'static str {
    match t {
        T_STRING => "string",
        T_NUMBER => "number",
        T_BOOLEAN => "boolean",
        T_TABLE => "table",
        _ => "none",
    }
}

/// The `sync` section: per instance its runner lease, per task its last
/// update and runs.
pub fn status(zone: &Zone) -> Option<Value> {
    let t = table(zone)?;
    let tasks = t.tasks_in_use();
    if tasks.is_empty() {
        return None;
    }
    // The lease's expiry is monotonic; `last_modified` below is already wall-clock.
    let now = mono_ms();
    let lock = zone.lock();
    let slab = ZoneSlab(zone);
    let mut instances: Vec<(usize, Vec<Value>)> = vec![];
    for (i, inst, tag) in tasks {
        let tk = t.task_ref(i)?;
        let (version, vtype, dtype, seq) = t
            .read(&lock, &slab, i, |h, v, _| (lua_value(h.vtype, v), h.vtype, h.dtype, h.seq))
            .unwrap_or((Value::Null, 0, 0, 0));
        // Relaxed: figures for status.
        let modified = tk.modified_ms.load(Ordering::Relaxed);
        let err = t.last_error(&lock, i);
        let o = json!({
            "tag": String::from_utf8_lossy(&tag),
            "version": version,
            "version_type": type_name(vtype),
            "data_type": type_name(dtype),
            "update_seq": seq,
            "last_modified": if modified == 0 { Value::Null } else { json!(modified as f64 / 1000.0) },
            "size": tk.size.load(Ordering::Relaxed),
            "runs": tk.runs.load(Ordering::Relaxed),
            "failures": tk.failures.load(Ordering::Relaxed),
            "too_large": tk.too_large.load(Ordering::Relaxed),
            "last_error": if err.is_empty() { Value::Null } else { json!(String::from_utf8_lossy(&err)) },
            "last_run_duration_ms": tk.last_duration_us.load(Ordering::Relaxed) as f64 / 1000.0,
            "last_run_pid": t.last_pid(i),
        });
        match instances.iter_mut().find(|(k, _)| *k == inst) {
            Some((_, v)) => v.push(o),
            None => instances.push((inst, vec![o])),
        }
    }
    let out: Vec<Value> = instances
        .into_iter()
        .filter_map(|(inst, tasks)| {
            let i = t.instances.get(inst)?;
            let lv = i.lease.view();
            Some(json!({
                "instance": String::from_utf8_lossy(&t.instance_key(inst)),
                "interval": i.interval_ms.load(Ordering::Relaxed) as f64 / 1000.0,
                "runner_pid": lv.pid,
                "runner_generation": lv.generation,
                "runs_under_way": lv.runs_under_way,
                "lease_expires_in": (lv.expires_ms as f64 - now as f64) / 1000.0,
                "runner_changes": lv.owners,
                "takeovers": lv.takeovers,
                "tasks": tasks,
            }))
        })
        .collect();
    Some(json!(out))
}
