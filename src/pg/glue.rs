//! The bridge's nginx side: the `workerbus_postgres` directive, the
//! per-worker tick (lease, channel interest), the events that drive the
//! holder's session, the calls behind the C ABI, and the status section.

// As in src/module: these take the pointers nginx hands to its hooks, valid
// for the call by nginx's contract, so these lints would only repeat it.
#![allow(clippy::not_unsafe_ptr_arg_deref, clippy::missing_safety_doc)]

use core::cell::{Cell, OnceCell};
use core::ffi::{c_char, c_void};
use core::sync::atomic::Ordering::Relaxed;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};

use nginx_sys::{
    NGX_CONF_1MORE, NGX_CORE_MODULE, NGX_DIRECT_CONF, NGX_LOG_EMERG, NGX_LOG_WARN, NGX_MAIN_CONF, ngx_command_t,
    ngx_conf_t, ngx_core_module_t, ngx_cycle_t, ngx_event_t, ngx_module_t,
};
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use serde_json::{Value, json};

use crate::module::event::Event;
use crate::module::extension::{self, Extension};
use crate::module::one_thread::OneThread;
use crate::module::pid;
use crate::module::process_state::this_process;
use crate::module::time::mono_ms;
use crate::module::zone::Zone;
use crate::shm::lifecycle::pid_alive;
use crate::shm::pgbus::{CH_LISTENING, Lease, PgBus, state_name};

use super::config::{self, PgConfig};
use super::conn::TlsSetup;
use super::driver::{Bridge, Env};
use super::session::OUTBOX;
use super::wire;

/// The parsed directive, owned by the configuration cycle's pool.
pub struct PgSetup {
    pub cfg: PgConfig,
    pub addr: SocketAddr,
    /// The TLS context (none with `sslmode=disable`), made with the
    /// configuration; freed with the cycle's pool.
    pub tls: Option<TlsSetup>,
}

const TICK_MS: u64 = 500;
const LEASE_MS: u64 = 3000;

/// This worker's side of the bridge, made once in init_worker and then
/// reached by shared reference only (see module::process_state for the
/// rule): the settings are fixed, the rest are `Cell`s taken out and put
/// back around their use, and the events nginx points at are handed out
/// as raw pointers.
struct PgWorker {
    setup: &'static PgSetup,
    bus: &'static PgBus,
    zone: Zone,
    origin: String,
    tick: Event,
    drive: Event,
    timer: Event,
    /// The holder's session; out of the cell while it runs.
    bridge: Cell<Option<Box<Bridge>>>,
    /// Channels this worker's Lua code waits on or subscribes to, with counts.
    interest: Cell<HashMap<Vec<u8>, u32>>,
    stopped: Cell<bool>,
}

impl PgWorker {
    fn has_bridge(&self) -> bool {
        let b = self.bridge.take();
        let has = b.is_some();
        self.bridge.set(b);
        has
    }

    /// Ends the session, if any.
    fn drop_bridge(&self) -> bool {
        match self.bridge.take() {
            Some(mut b) => {
                b.shutdown();
                true
            }
            None => false,
        }
    }

    fn with_interest<R>(&self, f: impl FnOnce(&mut HashMap<Vec<u8>, u32>) -> R) -> R {
        let mut m = self.interest.take();
        let r = f(&mut m);
        self.interest.set(m);
        r
    }

    fn log(&'static self) -> *mut nginx_sys::ngx_log_t {
        self.tick.log()
    }
}

static PG: OneThread<OnceCell<PgWorker>> = OneThread::new(OnceCell::new());

fn pg() -> Option<&'static PgWorker> {
    PG.get().get()
}

// ---- directive ----------------------------------------------------------

unsafe extern "C" fn free_setup(data: *mut c_void) {
    // SAFETY: data is the Box::into_raw of set_postgres, freed once with its pool.
    drop(unsafe { Box::from_raw(data as *mut PgSetup) });
}

fn emerg(cf: *mut ngx_conf_t, msg: &str) -> *mut c_char {
    ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"workerbus_postgres\" directive: {}", msg);
    NGX_CONF_ERROR
}

fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

// ---- the bridge's nginx module -------------------------------------------

/// The bridge's configuration, one per cycle, in the cycle pool.
#[repr(C)]
pub struct PgConf {
    /// `workerbus_postgres`, parsed (null: no bridge). Freed with the cycle pool.
    pub pg: *const PgSetup,
}

static mut PG_CTX: ngx_core_module_t =
    ngx_core_module_t { name: ngx::ngx_string!("workerbus_pg"), create_conf: Some(create_conf), init_conf: None };

static mut PG_COMMANDS: [ngx_command_t; 2] = [
    crate::module::directive(
        ngx::ngx_string!("workerbus_postgres"),
        NGX_MAIN_CONF | NGX_DIRECT_CONF | NGX_CONF_1MORE,
        set_postgres,
    ),
    ngx_command_t::empty(),
];

#[used]
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static mut ngx_workerbus_pg_module: ngx_module_t = ngx_module_t {
    ctx: &raw const PG_CTX as *mut c_void,
    // SAFETY: only the address is taken; nginx reads the table, never moves it.
    commands: unsafe { &raw mut PG_COMMANDS[0] },
    type_: NGX_CORE_MODULE as _,
    ..ngx_module_t::default()
};

unsafe extern "C" fn create_conf(cycle: *mut ngx_cycle_t) -> *mut c_void {
    // The status section and the wake-up subscriber, in the master before
    // the workers fork (again at each load: the same functions).
    extension::register(Extension { name: "postgres", status, on_wake, worker_start, worker_exit });
    // SAFETY: nginx passes the cycle being configured; its pool lives as long as the cycle.
    unsafe { nginx_sys::ngx_pcalloc((*cycle).pool, size_of::<PgConf>()) }
}

fn pg_conf(cycle: *const ngx_cycle_t) -> Option<&'static PgConf> {
    // SAFETY: conf_ctx has an entry per module index; ours was made by create_conf.
    unsafe {
        let ctx = (*cycle).conf_ctx;
        let module = &raw const ngx_workerbus_pg_module;
        let p = *ctx.add((*module).index);
        (p as *const PgConf).as_ref()
    }
}

/// `workerbus_postgres URL [options];`
pub unsafe extern "C" fn set_postgres(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: NGX_DIRECT_CONF gives this module's PgConf for the cycle.
    let cc = unsafe { &mut *(conf as *mut PgConf) };
    if !cc.pg.is_null() {
        return emerg(cf, "is duplicate");
    }
    // SAFETY: during a directive handler cf->args holds the directive's words.
    let words = unsafe {
        let a = &*(*cf).args;
        core::slice::from_raw_parts(a.elts as *const nginx_sys::ngx_str_t, a.nelts)
    };
    let mut args = Vec::new();
    for w in words.iter().skip(1) {
        match core::str::from_utf8(w.as_bytes()) {
            Ok(s) => args.push(s),
            Err(_) => return emerg(cf, "arguments must be UTF-8"),
        }
    }
    let cfg = match config::parse(&args, |f| std::fs::read_to_string(f).map_err(|e| io_reason(&e))) {
        Ok(c) => c,
        Err(e) => return emerg(cf, &e),
    };
    // IPv4 first: "localhost" often lists ::1 first while servers listen on 127.0.0.1.
    let pick = |a: std::vec::IntoIter<SocketAddr>| {
        let all: Vec<SocketAddr> = a.collect();
        all.iter().find(|x| x.is_ipv4()).or(all.first()).copied()
    };
    let addr = match (cfg.host.as_str(), cfg.port).to_socket_addrs().map(pick) {
        Ok(Some(a)) => a,
        Ok(None) => return emerg(cf, &format!("host \"{}\" has no address", cfg.host)),
        Err(e) => return emerg(cf, &format!("cannot resolve host \"{}\": {}", cfg.host, io_reason(&e))),
    };
    // The TLS context, once for the configuration: the CA file is read here
    // (as root, and by `nginx -t`), not by a worker at connect time.
    let tls = if cfg.sslmode.may_use_tls() {
        if let Some(ca) = cfg.sslrootcert.as_deref()
            && let Err(e) = std::fs::File::open(ca)
        {
            return emerg(cf, &format!("cannot read sslrootcert \"{ca}\": {}", io_reason(&e)));
        }
        // SAFETY: cf is the live configuration; its pool is the cycle's.
        let (pool, log) = unsafe { ((*cf).pool, (*cf).log) };
        match TlsSetup::new(pool, log, cfg.sslmode, cfg.sslrootcert.as_deref()) {
            Ok(t) => Some(t),
            Err(e) => return emerg(cf, &e),
        }
    } else {
        None
    };
    let setup = Box::into_raw(Box::new(PgSetup { cfg, addr, tls }));
    // SAFETY: cf->pool is the cycle's pool; the cleanup frees the setup with it.
    unsafe {
        let cln = nginx_sys::ngx_pool_cleanup_add((*cf).pool, 0);
        if cln.is_null() {
            drop(Box::from_raw(setup));
            return NGX_CONF_ERROR;
        }
        (*cln).handler = Some(free_setup);
        (*cln).data = setup.cast();
    }
    cc.pg = setup;
    NGX_CONF_OK
}

// ---- worker hooks ---------------------------------------------------------

fn node_origin(zone: &Zone) -> String {
    let lc = &zone.header().lifecycle;
    // Relaxed: written once when the zone was created.
    let (m, s) = (lc.node_master_pid.load(Relaxed), lc.node_started_ms.load(Relaxed));
    wire::clean_origin(&format!("{}/{m}/{s}", crate::module::status::host_name()))
}

/// Worker start (the zones are attached, the ring reader set up).
fn worker_start(cycle: *mut ngx_cycle_t) {
    let Some(cc) = pg_conf(cycle) else { return };
    if cc.pg.is_null() {
        return;
    }
    // SAFETY: set by set_postgres; lives in the cycle pool as long as this cycle.
    let setup: &'static PgSetup = unsafe { &*cc.pg };
    let l = this_process();
    let Some(zone) = l.primary() else { return };
    let h = zone.header();
    // SAFETY: laid out by parts::lay_out inside this zone.
    let bus = h.part(h.pg_off, h.pg_len).and_then(|(p, n)| unsafe { PgBus::attach(p, n) });
    // SAFETY: nginx passes a live cycle.
    let log = unsafe { (*cycle).log };
    let Some(bus) = bus else {
        ngx::ngx_log_error!(
            NGX_LOG_WARN,
            log,
            "workerbus: postgres bridge disabled: zone \"{}\" was made without room for it; restart nginx",
            String::from_utf8_lossy(zone.name())
        );
        return;
    };
    let worker = PgWorker {
        setup,
        bus,
        zone,
        origin: node_origin(&zone),
        tick: Event::new(),
        drive: Event::new(),
        timer: Event::new(),
        bridge: Cell::new(None),
        interest: Cell::new(HashMap::new()),
        stopped: Cell::new(false),
    };
    if PG.get().set(worker).is_err() {
        return; // init_worker runs once per worker
    }
    let Some(p) = pg() else { return };
    // Cancelable (Event::init): a graceful shutdown does not wait for the bridge's timers.
    p.tick.init(log, on_tick);
    p.drive.init(log, on_drive);
    p.timer.init(log, on_timer);
    p.tick.add_timer(1);
}

/// Worker exit: close the session, give the lease up.
fn worker_exit() {
    let Some(p) = pg() else { return };
    stop(p);
}

fn stop(p: &'static PgWorker) {
    p.stopped.set(true);
    p.drop_bridge();
    p.bus.release(&p.zone.lock(), pid());
    for ev in [&p.tick, &p.timer, &p.drive] {
        ev.cancel();
    }
}

fn exiting() -> bool {
    // SAFETY: globals nginx sets from its signal handlers, read on the loop thread.
    unsafe { nginx_sys::ngx_exiting != 0 || nginx_sys::ngx_quit != 0 || nginx_sys::ngx_terminate != 0 }
}

unsafe extern "C" fn on_tick(_ev: *mut ngx_event_t) {
    let Some(p) = pg() else { return };
    if p.stopped.get() {
        return;
    }
    if exiting() {
        stop(p);
        return;
    }
    let (setup, bus, zone) = (p.setup, p.bus, p.zone);
    let now = mono_ms();
    let lock = zone.lock();
    // Every node listens to the cluster-wide events channel.
    let mut added = bus.want_channel(&lock, wire::EVENTS_CHANNEL.as_bytes(), now).unwrap_or(false);
    p.with_interest(|interest| {
        for ch in interest.keys() {
            added |= bus.want_channel(&lock, ch, now).unwrap_or(false);
        }
    });
    let l = this_process();
    let newest = zone.header().lifecycle.current_generation();
    let lease = bus.try_lease(&lock, pid(), l.slot.get(), l.generation.get(), newest, now, LEASE_MS, pid_alive);
    match lease {
        Lease::Held | Lease::Acquired { .. } => {
            bus.set_holder_nonce(crate::module::wake::nonce().unwrap_or(0));
            if !p.has_bridge() {
                let from = if let Lease::Acquired { from } = lease { from } else { 0 };
                let b = Bridge::new(Env {
                    conf: &setup.cfg,
                    tls: setup.tls.as_ref(),
                    addr: setup.addr,
                    bus,
                    zone,
                    origin: p.origin.clone(),
                    log: p.log(),
                    drive_ev: p.drive.as_ptr(),
                    timer_ev: p.timer.as_ptr(),
                });
                b.log_takeover(from);
                p.bridge.set(Some(Box::new(b)));
            }
            // Also the holder's periodic work (UNLISTEN, retention) runs from drive.
            post_drive(p);
        }
        Lease::Other(_) => {
            if p.has_bridge() {
                ngx::ngx_log_error!(
                    nginx_sys::NGX_LOG_INFO,
                    p.log(),
                    "workerbus: postgres: worker process {} hands the connection over",
                    pid()
                );
                p.drop_bridge();
            }
            if added {
                wake_holder(p, bus, true);
            }
        }
    }
    p.tick.add_timer(TICK_MS as _);
}

fn post_drive(p: &'static PgWorker) {
    p.drive.post();
}

/// Runs the holder's session, unless the lease went to another worker
/// meanwhile (this one was stopped or hung past its lease): then it closes
/// at once, before reading anything the new holder also receives.
fn drive_session() {
    let Some(p) = pg() else { return };
    let Some(mut b) = p.bridge.take() else { return };
    if p.bus.holder().0 != pid() {
        ngx::ngx_log_error!(
            NGX_LOG_WARN,
            p.log(),
            "workerbus: postgres: worker process {} lost the lease (another worker holds the connection); closing",
            pid()
        );
        b.shutdown();
        return;
    }
    b.drive();
    // Put back, unless the worker stopped (or another session began) meanwhile.
    if p.stopped.get() {
        b.shutdown();
    } else if let Some(mut newer) = p.bridge.replace(Some(b)) {
        newer.shutdown();
    }
}

unsafe extern "C" fn on_drive(_ev: *mut ngx_event_t) {
    drive_session();
}

unsafe extern "C" fn on_timer(_ev: *mut ngx_event_t) {
    drive_session();
}

/// From the wake-up handler: work may be waiting for the holder.
fn on_wake() {
    let Some(p) = pg() else { return };
    if p.has_bridge() {
        post_drive(p);
    }
}

/// Wakes the holder if it sleeps (or always, with `force`).
fn wake_holder(p: &'static PgWorker, bus: &PgBus, force: bool) {
    if !bus.take_holder_waiting() && !force {
        return;
    }
    let (holder, _) = bus.holder();
    if holder == pid() {
        post_drive(p);
    } else if holder != 0 {
        crate::module::wake::signal_extensions(holder, bus.holder_nonce());
    }
}

// ---- calls behind the C ABI ------------------------------------------------

fn ready() -> Result<(&'static PgWorker, &'static PgSetup, &'static PgBus, Zone), String> {
    crate::module::process::ensure_worker_started();
    let p = pg().ok_or("the PostgreSQL bridge is not configured (no workerbus_postgres directive)")?;
    Ok((p, p.setup, p.bus, p.zone))
}

/// (max channel bytes, max payload bytes) when configured.
pub fn limits() -> Option<(usize, usize)> {
    let (_, s, _, _) = ready().ok()?;
    Some((s.cfg.max_channel(), wire::MAX_PAYLOAD))
}

pub fn post(channel: &[u8], payload: &[u8]) -> Result<(), String> {
    let (p, s, bus, zone) = ready()?;
    wire::check_channel(channel, s.cfg.max_channel())?;
    wire::check_payload(payload)?;
    bus.push(&zone.lock(), channel, payload)?;
    wake_holder(p, bus, false);
    Ok(())
}

pub fn post_event(source: &[u8], event: &[u8], data: &[u8], flags: u32) -> Result<(), String> {
    let (p, _, bus, zone) = ready()?;
    for (what, v) in [("source", source), ("event", event), ("data", data)] {
        if v.contains(&0) {
            return Err(format!("{what} must not contain NUL bytes"));
        }
        if core::str::from_utf8(v).is_err() {
            return Err(format!("{what} must be valid UTF-8"));
        }
    }
    let body = wire::encode_event(flags, source, event, data);
    // A signed event carries its signature in the payload too.
    let max = wire::MAX_PAYLOAD - if p.setup.cfg.secret.is_some() { wire::SIGNATURE_RESERVE } else { 0 };
    if body.len() > max {
        return Err(format!("event too large ({} bytes, max {max})", body.len()));
    }
    bus.push(&zone.lock(), wire::EVENTS_CHANNEL.as_bytes(), &body)?;
    wake_holder(p, bus, false);
    Ok(())
}

/// A light thread starts (+1) or stops (-1) waiting on or subscribing to a channel.
pub fn listen(channel: &[u8], delta: i32) -> Result<bool, String> {
    let (p, s, bus, zone) = ready()?;
    wire::check_channel(channel, s.cfg.max_channel())?;
    let lock = zone.lock();
    if delta > 0 {
        p.with_interest(|i| *i.entry(channel.to_vec()).or_insert(0) += 1);
        let added = bus.want_channel(&lock, channel, mono_ms())?;
        if added {
            wake_holder(p, bus, true);
        }
    } else if delta < 0 {
        let last = p.with_interest(|i| {
            let Some(n) = i.get_mut(channel) else { return false };
            *n = n.saturating_sub(1);
            let last = *n == 0;
            if last {
                i.remove(channel);
            }
            last
        });
        if last {
            // Mark it used now: UNLISTEN comes unlisten_after from here.
            let _ = bus.want_channel(&lock, channel, mono_ms());
        }
    }
    Ok(bus.is_listening(&lock, channel))
}

// ---- status ----------------------------------------------------------------

fn status() -> Value {
    let Some(p) = pg() else { return Value::Null };
    let (s, bus, zone) = (p.setup, p.bus, p.zone);
    let lock = zone.lock();
    let now = mono_ms();
    let c = &bus.counters;
    let text = |t| String::from_utf8_lossy(&bus.text(&lock, t)).into_owned();
    let chans: Vec<Value> = bus
        .channels(&lock)
        .into_iter()
        .map(|(n, st, used)| {
            json!({
                "name": String::from_utf8_lossy(&n),
                "state": if st == CH_LISTENING { "listening" } else { "pending" },
                "idle": (now.saturating_sub(used) as f64) / 1000.0,
            })
        })
        .collect();
    let (qbytes, qcap) = bus.queue_bytes();
    let err_ms = bus.last_error_ms.load(Relaxed);
    let (holder, _) = bus.holder();
    let (horizon, horizon_hi, tracked) = bus.durable_figures();
    let probe_us = c.probe_us.load(Relaxed);
    json!({
        "server": s.cfg.describe(),
        "state": state_name(bus.state.load(Relaxed)),
        "state_since": (bus.state_since_ms.load(Relaxed) as f64) / 1000.0,
        "server_version": text(&bus.server_version),
        "holder_pid": holder,
        "channel_prefix": s.cfg.prefix,
        "channels": chans,
        "notifications_in": c.notifications_in.load(Relaxed),
        "notifications_out": c.notifications_out.load(Relaxed),
        "posts_queued": c.posts_queued.load(Relaxed),
        "queue_depth": bus.queue_len(),
        "queue_bytes": qbytes,
        "queue_capacity": qcap,
        "queue_overflow": c.queue_overflow.load(Relaxed),
        "flushes": c.flushes.load(Relaxed),
        "connects": c.connects.load(Relaxed),
        "reconnects": c.reconnects.load(Relaxed),
        "connect_failures": c.connect_failures.load(Relaxed),
        "takeovers": c.takeovers.load(Relaxed),
        "undeliverable": c.undeliverable.load(Relaxed),
        "posts_refused": c.posts_refused.load(Relaxed),
        "rejected": c.rejected.load(Relaxed),
        "signed": s.cfg.secret.is_some(),
        "probes": c.probes.load(Relaxed),
        "probe_failures": c.probe_failures.load(Relaxed),
        "probe_ms": if probe_us == 0 { Value::Null } else { json!((probe_us as f64) / 1000.0) },
        "probe_seconds": if probe_us == 0 { Value::Null } else { json!((probe_us as f64) / 1e6) },
        "request_timeouts": c.request_timeouts.load(Relaxed),
        "keepalive": (s.cfg.keepalive_ms as f64) / 1000.0,
        "request_timeout": (s.cfg.request_timeout_ms as f64) / 1000.0,
        "last_error": text(&bus.last_error),
        "last_error_at": if err_ms == 0 { Value::Null } else { json!((err_ms as f64) / 1000.0) },
        "durable": if s.cfg.durable { json!({
            "table": OUTBOX,
            "horizon": horizon,
            "horizon_next": horizon_hi,
            "tracked": tracked,
            "max_id": bus.max_id.load(Relaxed),
            "replayed": c.replayed.load(Relaxed),
            "duplicates_skipped": c.duplicates_skipped.load(Relaxed),
            "rebases": c.rebases.load(Relaxed),
            "track_overflow": c.track_overflow.load(Relaxed),
            "retention": (s.cfg.retention_ms as f64) / 1000.0,
        }) } else { Value::Null },
    })
}
