//! The nginx side of the node's session: it moves bytes between the
//! connection (src/pg/conn.rs) and the sans-IO session (src/pg/session/),
//! carries out the session's transport actions, puts its deliveries into
//! the node's ring and its log lines into nginx's log, and arms one timer
//! for when the session wants to run again. It runs from one posted event
//! (`drive`): the I/O handlers and the timer only post it, so nothing
//! re-enters it.

use std::net::SocketAddr;

use nginx_sys::{NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN, ngx_event_t, ngx_log_t};

use crate::module::ring_glue;
use crate::module::time::{mono_ms, now_ms};
use crate::module::zone::{PoolLock, Zone};
use crate::shm::pgbus::PgBus;
use crate::shm::ring::RecordIn;

use super::config::PgConfig;
use super::conn::{Conn, Io, TlsSetup};
use super::error::Error;
use super::session::{Action, Delivery, Level, Node, Session};
use super::wire;

/// What a session works with: settings, the node's shared state, and the
/// process-static events that drive it.
pub struct Env {
    pub conf: &'static PgConfig,
    /// The TLS context made with the configuration (none with sslmode=disable).
    pub tls: Option<&'static TlsSetup>,
    pub addr: SocketAddr,
    pub bus: &'static PgBus,
    pub zone: Zone,
    /// This node's id, carried in every post.
    pub origin: String,
    pub log: *mut ngx_log_t,
    pub drive_ev: *mut ngx_event_t,
    pub timer_ev: *mut ngx_event_t,
}

/// The node, as the session reaches it from inside nginx.
struct NginxNode<'a>(&'a Env);

impl Node for NginxNode<'_> {
    type Lock = PoolLock;

    fn bus(&self) -> &PgBus {
        self.0.bus
    }

    fn lock(&self) -> PoolLock {
        self.0.zone.lock()
    }

    fn deliver(&mut self, d: Delivery<'_>) -> Result<(), String> {
        let res = match d {
            Delivery::Event { flags, source, event, data } => {
                let rec = RecordIn { source, event, unique: b"", data, pid: 0, flags };
                ring_glue::post_relayed(0, &self.0.zone, &rec)
            }
            Delivery::Bus { channel, origin, payload } => {
                let mut data = Vec::with_capacity(origin.len() + 1 + payload.len());
                data.extend_from_slice(origin);
                data.push(0);
                data.extend_from_slice(payload);
                let rec =
                    RecordIn { source: wire::RING_SOURCE, event: channel, unique: b"", data: &data, pid: 0, flags: 0 };
                ring_glue::post_relayed(0, &self.0.zone, &rec)
            }
        };
        res.map(|_| ())
    }

    fn log(&mut self, level: Level, msg: &str) {
        let level = match level {
            Level::Error => NGX_LOG_ERR,
            Level::Warn => NGX_LOG_WARN,
            Level::Notice => NGX_LOG_NOTICE,
            Level::Info => NGX_LOG_INFO,
        };
        ngx::ngx_log_error!(level, self.0.log, "workerbus: {msg}");
    }

    fn wall_ms(&self) -> u64 {
        now_ms()
    }
}

pub struct Bridge {
    env: Env,
    session: Session,
    conn: Option<Conn>,
    /// The TCP connect finished (its first write event came).
    up: bool,
    /// A TLS handshake is under way.
    tls: bool,
}

fn io_error(what: &str) -> Error {
    Error::Io { what: what.into(), errno: std::io::Error::last_os_error().raw_os_error() }
}

impl Bridge {
    pub fn new(env: Env) -> Bridge {
        // SAFETY: getpid has no preconditions.
        let seed = mono_ms() ^ ((unsafe { libc::getpid() } as u64) << 32);
        let session = Session::new(env.conf, env.origin.clone(), seed);
        Bridge { env, session, conn: None, up: false, tls: false }
    }

    pub fn is_ready(&self) -> bool {
        self.session.is_ready()
    }

    /// Drops the session for good (lease lost or worker exiting).
    pub fn shutdown(&mut self) {
        self.session.terminate();
        if let Some(conn) = self.conn.as_mut() {
            let out = self.session.transmit();
            let _ = conn.send(out);
            out.clear();
        }
        self.conn = None;
        // SAFETY: the timer event is ours; deleting a timer that is not set is harmless.
        unsafe {
            if (*self.env.timer_ev).timer_set() != 0 {
                nginx_sys::ngx_del_timer(self.env.timer_ev);
            }
        }
    }

    fn actions(&mut self, now: u64) -> bool {
        let mut any = false;
        while let Some(a) = self.session.take_action() {
            any = true;
            match a {
                Action::Close => {
                    self.conn = None;
                    self.up = false;
                    self.tls = false;
                }
                Action::Connect => {
                    self.up = false;
                    self.tls = false;
                    match Conn::connect(self.env.addr, self.env.log, self.env.drive_ev) {
                        Ok(c) => {
                            c.set_keepalive((self.env.conf.keepalive_ms / 1000) as u32);
                            self.conn = Some(c);
                        }
                        Err(e) => {
                            let e = Error::Io { what: e, errno: None };
                            self.session.failed(e, now, &mut NginxNode(&self.env));
                        }
                    }
                }
                Action::StartTls => self.tls = true,
            }
        }
        any
    }

    /// Moves what can move now. True when something happened.
    fn step(&mut self, now: u64) -> Result<bool, Error> {
        let Some(conn) = self.conn.as_mut() else { return Ok(false) };
        if !self.up {
            // SAFETY: the connection is live while self.conn holds it.
            let writable = unsafe { (*(*conn.connection()).write).ready() != 0 };
            if !writable {
                return Ok(false);
            }
            if let Some(e) = conn.connect_error() {
                return Err(Error::Io {
                    what: format!("cannot connect to {}", self.env.addr),
                    errno: e.raw_os_error(),
                });
            }
            self.up = true;
            self.session.connected(now);
            return Ok(true);
        }
        if self.tls {
            let Some(tls) = self.env.tls else {
                return Err(Error::Tls("no TLS context (sslmode=disable)".into()));
            };
            if !conn.tls_step(tls, &self.env.conf.host).map_err(Error::Tls)? {
                return Ok(false);
            }
            self.tls = false;
            self.session.tls_ready(now);
            return Ok(true);
        }
        let mut moved = false;
        let out = self.session.transmit();
        while !out.is_empty() {
            match conn.send(out) {
                Io::Done(n) => {
                    let _ = out.split_to(n.min(out.len()));
                    moved = true;
                }
                Io::Again => break,
                Io::Closed | Io::Failed => return Err(io_error("cannot write to the server")),
            }
        }
        let mut tmp = [0u8; 16384];
        match conn.recv(&mut tmp) {
            Io::Done(n) => {
                self.session.received(&tmp[..n], now, &mut NginxNode(&self.env));
                moved = true;
            }
            Io::Again => {}
            Io::Closed => return Err(Error::Closed),
            Io::Failed => return Err(io_error("cannot read from the server")),
        }
        Ok(moved)
    }

    /// Runs the session until it waits for I/O or a timer.
    pub fn drive(&mut self) {
        for _ in 0..256 {
            let now = mono_ms();
            self.session.poll(now, &mut NginxNode(&self.env));
            let acted = self.actions(now);
            let moved = match self.step(now) {
                Ok(m) => m,
                Err(e) => {
                    self.session.failed(e, now, &mut NginxNode(&self.env));
                    true
                }
            };
            if acted || moved {
                continue;
            }
            if self.session.is_idle() && !self.env.bus.holder_sleep() {
                // Work arrived while going to sleep.
                continue;
            }
            self.arm_timer(now);
            return;
        }
        // Still busy after many steps: continue on the next loop iteration.
        // SAFETY: the drive event lives in process-static memory.
        unsafe {
            if (*self.env.drive_ev).posted() == 0 {
                nginx_sys::ngx_post_event(self.env.drive_ev, &raw mut nginx_sys::ngx_posted_events);
            }
        }
    }

    fn arm_timer(&self, now: u64) {
        let Some(at) = self.session.wakeup_at() else { return };
        let ms = at.saturating_sub(now).max(1);
        // SAFETY: the timer event lives in process-static memory; cancelable (set at init).
        unsafe { nginx_sys::ngx_add_timer(self.env.timer_ev, ms as _) };
    }

    /// Info line when this worker starts holding the connection.
    pub fn log_takeover(&self, from: i32) {
        ngx::ngx_log_error!(
            NGX_LOG_INFO,
            self.env.log,
            "workerbus: postgres: worker process {} holds the connection (previous holder: {})",
            // SAFETY: set by nginx at process start.
            unsafe { nginx_sys::ngx_pid },
            if from == 0 { "none".to_string() } else { format!("pid {from}") }
        );
    }
}
