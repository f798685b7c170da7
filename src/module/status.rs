//! `workerbus_status;` in a location: a JSON snapshot of the module's zones,
//! generations, workers and event ring, or, for a browser (`Accept:
//! text/html`), a live page that polls that JSON. Off unless configured,
//! like stub_status. `workerbus_metrics` (metrics.rs) renders the same snapshot.

use core::ffi::{c_char, c_void};

use nginx_sys::{ngx_command_t, ngx_conf_t, ngx_http_request_t, ngx_int_t};
use ngx::core::NGX_CONF_OK;
use serde_json::{Value, json};

use crate::shm::lifecycle::Lifecycle;

use super::http;
use super::pid;
use super::process_state::this_process;
use super::ring_glue;
use super::time::{mono_ms, wall_of};
use super::zone::Zone;

/// The live status page: one self-contained file (inline CSS and JS) that
/// polls this same location for JSON.
const PAGE: &str = include_str!("status.html");

/// `workerbus_status;`
pub unsafe extern "C" fn set_status(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    http::set_handler(cf, handler);
    NGX_CONF_OK
}

fn secs(ms: u64) -> Value {
    if ms == 0 { Value::Null } else { json!((ms as f64) / 1000.0) }
}

/// The host name, for the node identity.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn node(lc: &Lifecycle) -> Value {
    use core::sync::atomic::Ordering::Relaxed;
    // Relaxed: written once when the zone was created, before any worker existed.
    let (master, started) = (lc.node_master_pid.load(Relaxed), lc.node_started_ms.load(Relaxed));
    let host = host_name();
    json!({
        "id": format!("{host}/{master}/{started}"),
        "host": host,
        "master_pid": master,
        "started": secs(started),
    })
}

fn lifecycle(primary: &Zone, now: u64) -> (Value, Value) {
    let lc = &primary.header().lifecycle;
    let gens: Vec<Value> = lc
        .generations()
        .iter()
        .map(|g| {
            json!({
                "generation": g.generation,
                "master_pid": g.master_pid,
                "worker_processes": g.worker_count,
                "started": secs(g.started_ms),
                "live_workers": lc.live_count(g.generation),
                "first_event_seq": ring_glue::first_seq(primary, g.generation),
            })
        })
        .collect();
    let mut views: Vec<_> = lc.workers().collect();
    views.sort_by_key(|w| (w.generation, w.slot, w.started_ms));
    let workers: Vec<Value> = views
        .iter()
        .map(|w| {
            let mut o = json!({
                // The privileged agent has no slot: its role says what it is.
                "slot": if w.is_agent() { Value::Null } else { json!(w.slot) },
                "role": if w.is_agent() { "privileged agent" } else { "worker" },
                "pid": w.pid,
                "generation": w.generation,
                "state": w.state.name(),
                "started": secs(wall_of(w.started_ms)),
                "heartbeat_age": (now.saturating_sub(w.heartbeat_ms) as f64) / 1000.0,
            });
            if w.ended_ms != 0 {
                o["ended"] = secs(wall_of(w.ended_ms));
            }
            if w.replaced_by != 0 {
                o["replaced_by"] = json!(w.replaced_by);
            }
            o
        })
        .collect();
    (json!(gens), json!(workers))
}

/// The whole status document, as seen from this process.
pub fn snapshot() -> Value {
    let l = this_process();
    let now = mono_ms();
    let zones: Vec<Value> = l
        .zones()
        .iter()
        .map(|z| {
            let (size, free) = (z.size(), z.free_bytes());
            let used = size.saturating_sub(free);
            let mut parts = serde_json::Map::new();
            let mut laid_out = 0;
            for (name, bytes) in super::layout::parts(z.header()) {
                parts.insert(name.into(), json!(bytes));
                laid_out += bytes;
            }
            parts.insert("other".into(), json!(used.saturating_sub(laid_out)));
            let mut o = json!({
                "name": String::from_utf8_lossy(z.name()),
                "size": size,
                "used": used,
                "free": free,
                "parts": parts,
            });
            if let Some(ev) = ring_glue::status(z) {
                o["events"] = ev;
            }
            if let Some(sy) = super::sync::status(z) {
                o["sync"] = sy;
            }
            o
        })
        .collect();
    let mut doc = json!({
        "module": "workerbus",
        "version": env!("CARGO_PKG_VERSION"),
        "abi": crate::abi::ABI_VERSION,
        "pid": pid(),
        "generation": l.generation.get(),
        "local_wakeups": super::wake::local_wakeups(),
        "wakeups_by_eventfd": super::wake::sent_wakeups().0,
        "wakeups_by_datagram": super::wake::sent_wakeups().1,
        "own_handler_us": super::wake::own_handler_us(),
        "zones": zones,
    });
    if let Some(primary) = l.primary() {
        let lc = &primary.header().lifecycle;
        let (gens, workers) = lifecycle(&primary, now);
        doc["node"] = node(lc);
        doc["current_generation"] = json!(lc.current_generation());
        doc["generations"] = gens;
        doc["workers"] = workers;
        let h = primary.header();
        // Relaxed: statistics.
        doc["crashes_seen"] = json!(h.crashes_seen.load(core::sync::atomic::Ordering::Relaxed));
        doc["hangs_seen"] = json!(h.hangs_seen.load(core::sync::atomic::Ordering::Relaxed));
    }
    super::extension::each(|e| doc[e.name] = (e.status)());
    doc
}

unsafe extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a content handler with a live request.
    let r = unsafe { &mut *r };
    if let Err(rc) = http::accept_get(r) {
        return rc;
    }
    if http::wants_html(r) {
        return http::send(r, "text/html; charset=utf-8", PAGE.as_bytes());
    }
    let mut body = serde_json::to_vec_pretty(&snapshot()).unwrap_or_default();
    body.push(b'\n');
    http::send(r, "application/json", &body)
}
