//! The node's one PostgreSQL session, run by the lease holder: connect (TLS
//! when asked), authenticate, LISTEN the registry's channels, send queued
//! posts one transaction per flush, turn notifications into ring events,
//! and in durable mode keep the outbox table, replay after a reconnect and
//! expire old rows. A state machine driven by one posted event (`drive`):
//! the I/O handlers and timers only post it.
//!
//! One request is in flight at a time; each ends with ReadyForQuery.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use nginx_sys::{NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN, ngx_event_t, ngx_log_t};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::escape::escape_identifier;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use crate::module::ring_glue;
use crate::module::time::now_ms;
use crate::module::zone::Zone;
use crate::shm::pgbus::{CH_LISTENING, CH_WANTED, PgBus, ST_BACKOFF, ST_CONNECTING, ST_READY};
use crate::shm::ring::RecordIn;

use super::config::{PgConfig, SslMode};
use super::conn::{Conn, Io};
use super::glue::PgSetup;
use super::wire;

/// Posts per flush transaction, and their bytes.
const FLUSH_MAX: usize = 500;
const FLUSH_BYTES: usize = 1 << 20;
const REPLAY_LIMIT: usize = 5000;
pub const OUTBOX: &str = "workerbus_outbox";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Down,
    Connecting,
    SslReply,
    SslHandshake,
    Auth,
    Ready,
}

enum Op {
    Setup,
    Baseline,
    Replay,
    Listen(Vec<Vec<u8>>),
    Unlisten(Vec<Vec<u8>>),
    Flush { n: u64, bytes: u64 },
    Retention,
}

/// A durable notification kept back during a replay: id, channel, origin, payload.
type Held = (u64, Vec<u8>, Vec<u8>, Vec<u8>);

/// What a session works with: settings, the node's shared state, and the
/// process-static events that drive it.
pub struct Env {
    pub conf: &'static PgConfig,
    pub addr: SocketAddr,
    pub bus: &'static PgBus,
    pub zone: Zone,
    /// This node's id, carried in every post.
    pub origin: String,
    pub log: *mut ngx_log_t,
    pub drive_ev: *mut ngx_event_t,
    pub timer_ev: *mut ngx_event_t,
}

pub struct Bridge {
    env: Env,
    conn: Option<Conn>,
    phase: Phase,
    out: BytesMut,
    inb: BytesMut,
    scram: Option<sasl::ScramSha256>,
    ops: VecDeque<Op>,
    op_err: Option<String>,
    rows: Vec<Vec<Option<Vec<u8>>>>,
    attempt: u32,
    retry_at: u64,
    deadline: u64,
    setup_done: bool,
    need_sync: bool,
    next_retention: u64,
    rng: u64,
    ever_ready: bool,
    failed_since_ready: bool,
    /// Durable notifications that arrive while a replay runs: delivered
    /// after it, in id order, so a reconnect does not reorder them.
    held: Vec<Held>,
}

fn err_text(fields: &postgres_protocol::message::backend::ErrorResponseBody) -> String {
    let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
    let mut it = fields.fields();
    while let Ok(Some(f)) = it.next() {
        match f.type_() {
            b'S' => sev = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => msg = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    format!("{sev}: {msg} (SQLSTATE {code})")
}

impl Bridge {
    pub fn new(env: Env) -> Bridge {
        // SAFETY: getpid has no preconditions.
        let seed = now_ms() ^ ((unsafe { libc::getpid() } as u64) << 32) | 1;
        Bridge {
            env,
            conn: None,
            phase: Phase::Down,
            out: BytesMut::new(),
            inb: BytesMut::new(),
            scram: None,
            ops: VecDeque::new(),
            op_err: None,
            rows: Vec::new(),
            attempt: 0,
            retry_at: 0,
            deadline: 0,
            setup_done: false,
            need_sync: true,
            next_retention: 0,
            rng: seed,
            ever_ready: false,
            failed_since_ready: false,
            held: Vec::new(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    fn lock(&self) -> crate::module::zone::PoolLock {
        self.env.zone.lock()
    }

    fn arm_timer(&self, ms: u64) {
        // SAFETY: the timer event lives in process-static memory; cancelable (set at init).
        unsafe { nginx_sys::ngx_add_timer(self.env.timer_ev, ms.max(1) as _) };
    }

    fn random(&mut self) -> u64 {
        // xorshift64: jitter only, no security purpose.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Closes the session and schedules the next attempt with exponential
    /// backoff and jitter. One log line per attempt.
    fn fail(&mut self, why: &str) {
        let was_ready = self.phase == Phase::Ready;
        self.conn = None;
        self.phase = Phase::Down;
        self.ops.clear();
        self.op_err = None;
        self.out.clear();
        self.inb.clear();
        self.scram = None;
        self.setup_done = false;
        self.need_sync = true;
        self.held.clear();
        if was_ready {
            self.attempt = 0;
        }
        let c = self.env.conf;
        let base = c.backoff_min_ms.saturating_mul(1u64 << self.attempt.min(20)).min(c.backoff_max_ms);
        let delay = base / 2 + self.random() % (base / 2 + 1);
        self.attempt += 1;
        let now = now_ms();
        self.retry_at = now + delay;
        self.failed_since_ready = true;
        self.env.bus.set_state(ST_BACKOFF, now);
        self.env.bus.set_text(&self.lock(), &self.env.bus.last_error, why.as_bytes());
        // Relaxed: figures.
        self.env.bus.last_error_ms.store(now, core::sync::atomic::Ordering::Relaxed);
        if !was_ready {
            self.env.bus.counters.connect_failures.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        }
        let level = if was_ready { NGX_LOG_WARN } else { NGX_LOG_ERR };
        ngx::ngx_log_error!(
            level,
            self.env.log,
            "workerbus: postgres {}: {}{why}; retrying in {delay}ms (attempt {})",
            c.describe(),
            if was_ready { "connection lost: " } else { "" },
            self.attempt
        );
        self.arm_timer(delay);
    }

    /// Drops the session for good (lease lost or worker exiting).
    pub fn shutdown(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            let mut b = BytesMut::new();
            frontend::terminate(&mut b);
            let _ = conn.send(&b);
        }
        self.conn = None;
        self.phase = Phase::Down;
        // SAFETY: the timer event is ours; deleting a timer that is not set is harmless.
        unsafe {
            if (*self.env.timer_ev).timer_set() != 0 {
                nginx_sys::ngx_del_timer(self.env.timer_ev);
            }
        }
    }

    fn start_connect(&mut self) {
        let now = now_ms();
        self.env.bus.set_state(ST_CONNECTING, now);
        self.deadline = now + self.env.conf.connect_timeout_ms;
        match Conn::connect(self.env.addr, self.env.log, self.env.drive_ev) {
            Ok(c) => {
                self.conn = Some(c);
                self.phase = Phase::Connecting;
                self.arm_timer(self.env.conf.connect_timeout_ms);
            }
            Err(e) => self.fail(&e),
        }
    }

    fn startup(&mut self) {
        let c = self.env.conf;
        let params = [
            ("user", c.user.as_str()),
            ("database", c.dbname.as_str()),
            ("application_name", c.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        let _ = frontend::startup_message(params.iter().copied(), &mut self.out);
        self.phase = Phase::Auth;
    }

    /// Runs the state machine until it waits for I/O or a timer.
    pub fn drive(&mut self) {
        for _ in 0..64 {
            let now = now_ms();
            if self.phase != Phase::Down && self.phase != Phase::Ready && now >= self.deadline {
                self.fail(&format!("no session within connect_timeout ({}ms)", self.env.conf.connect_timeout_ms));
                return;
            }
            match self.phase {
                Phase::Down => {
                    if now < self.retry_at {
                        self.arm_timer(self.retry_at - now);
                        return;
                    }
                    self.start_connect();
                    if self.phase == Phase::Down {
                        return;
                    }
                }
                Phase::Connecting => {
                    let Some(conn) = self.conn.as_ref() else { return };
                    // SAFETY: the connection is live while self.conn holds it.
                    let writable = unsafe { (*(*conn.connection()).write).ready() != 0 };
                    if !writable {
                        return;
                    }
                    if let Some(e) = conn.connect_error() {
                        self.fail(&format!("cannot connect to {}: {e}", self.env.addr));
                        return;
                    }
                    if self.env.conf.sslmode == SslMode::Disable {
                        self.startup();
                    } else {
                        frontend::ssl_request(&mut self.out);
                        self.phase = Phase::SslReply;
                    }
                }
                Phase::SslReply => {
                    if let Err(e) = self.write_out() {
                        self.fail(&e);
                        return;
                    }
                    if !self.out.is_empty() {
                        return;
                    }
                    let Some(conn) = self.conn.as_mut() else { return };
                    let mut b = [0u8; 1];
                    match conn.recv(&mut b) {
                        Io::Done(_) if b[0] == b'S' => self.phase = Phase::SslHandshake,
                        Io::Done(_) if b[0] == b'N' => {
                            if self.env.conf.sslmode == SslMode::Prefer {
                                self.startup();
                            } else {
                                self.fail(&format!(
                                    "the server does not accept TLS but sslmode is {}",
                                    self.env.conf.sslmode.name()
                                ));
                                return;
                            }
                        }
                        Io::Done(_) => {
                            self.fail("unexpected answer to the TLS request");
                            return;
                        }
                        Io::Again => return,
                        Io::Closed | Io::Failed => {
                            self.fail("connection closed during the TLS request");
                            return;
                        }
                    }
                }
                Phase::SslHandshake => {
                    let Some(tls) = PgSetup::this_worker().and_then(|s| s.tls.as_ref()) else {
                        self.fail("no TLS context");
                        return;
                    };
                    let Some(conn) = self.conn.as_mut() else { return };
                    match conn.tls_step(tls, &self.env.conf.host) {
                        Ok(false) => return,
                        Ok(true) => self.startup(),
                        Err(e) => {
                            self.fail(&e);
                            return;
                        }
                    }
                }
                Phase::Auth | Phase::Ready => {
                    if let Err(e) = self.io() {
                        self.fail(&e);
                        return;
                    }
                    if self.phase == Phase::Ready && self.ops.is_empty() {
                        if !self.schedule() {
                            if self.env.bus.holder_sleep() {
                                return;
                            }
                            continue;
                        }
                        if let Err(e) = self.write_out() {
                            self.fail(&e);
                        }
                    }
                    return;
                }
            }
        }
        // Still busy after many steps: continue on the next loop iteration.
        // SAFETY: the drive event lives in process-static memory.
        unsafe {
            if (*self.env.drive_ev).posted() == 0 {
                nginx_sys::ngx_post_event(self.env.drive_ev, &raw mut nginx_sys::ngx_posted_events);
            }
        }
    }

    fn write_out(&mut self) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else { return Err("no connection".into()) };
        while !self.out.is_empty() {
            match conn.send(&self.out) {
                Io::Done(n) => {
                    let _ = self.out.split_to(n.min(self.out.len()));
                }
                Io::Again => return Ok(()),
                Io::Closed | Io::Failed => return Err("cannot write to the server".into()),
            }
        }
        Ok(())
    }

    fn io(&mut self) -> Result<(), String> {
        self.write_out()?;
        let mut tmp = [0u8; 16384];
        loop {
            let Some(conn) = self.conn.as_mut() else { return Err("no connection".into()) };
            match conn.recv(&mut tmp) {
                Io::Done(n) => self.inb.extend_from_slice(&tmp[..n]),
                Io::Again => break,
                Io::Closed => return Err("the server closed the connection".into()),
                Io::Failed => return Err("cannot read from the server".into()),
            }
            while let Some(m) = Message::parse(&mut self.inb).map_err(|e| format!("protocol error: {e}"))? {
                self.handle(m)?;
            }
        }
        while let Some(m) = Message::parse(&mut self.inb).map_err(|e| format!("protocol error: {e}"))? {
            self.handle(m)?;
        }
        self.write_out()
    }

    fn password(&self) -> Result<&[u8], String> {
        self.env
            .conf
            .password
            .as_deref()
            .map(str::as_bytes)
            .ok_or_else(|| "the server asks for a password and none is configured".to_string())
    }

    fn handle(&mut self, m: Message) -> Result<(), String> {
        match m {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                let pw = self.password()?.to_vec();
                frontend::password_message(&pw, &mut self.out).map_err(|e| e.to_string())?;
            }
            Message::AuthenticationMd5Password(b) => {
                let pw = self.password()?.to_vec();
                let h = md5_hash(self.env.conf.user.as_bytes(), &pw, b.salt());
                frontend::password_message(h.as_bytes(), &mut self.out).map_err(|e| e.to_string())?;
            }
            Message::AuthenticationSasl(b) => {
                let mut mechs = b.mechanisms();
                let mut scram = false;
                while let Some(m) = mechs.next().map_err(|e| e.to_string())? {
                    scram |= m == sasl::SCRAM_SHA_256;
                }
                if !scram {
                    return Err("the server offers no SASL mechanism this client supports".into());
                }
                let pw = self.password()?.to_vec();
                let s = sasl::ScramSha256::new(&pw, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut self.out)
                    .map_err(|e| e.to_string())?;
                self.scram = Some(s);
            }
            Message::AuthenticationSaslContinue(b) => {
                let s = self.scram.as_mut().ok_or("unexpected SASL message")?;
                s.update(b.data()).map_err(|e| format!("SCRAM: {e}"))?;
                frontend::sasl_response(s.message(), &mut self.out).map_err(|e| e.to_string())?;
            }
            Message::AuthenticationSaslFinal(b) => {
                let s = self.scram.as_mut().ok_or("unexpected SASL message")?;
                s.finish(b.data()).map_err(|e| format!("SCRAM: server signature rejected: {e}"))?;
            }
            Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGssContinue(_) => {
                return Err("the server asks for an authentication method this client does not support".into());
            }
            Message::ParameterStatus(b) => {
                if b.name().ok() == Some("server_version")
                    && let Ok(v) = b.value()
                {
                    self.env.bus.set_text(&self.lock(), &self.env.bus.server_version, v.as_bytes());
                }
            }
            Message::ErrorResponse(b) => {
                let text = err_text(&b);
                if self.phase != Phase::Ready {
                    return Err(text);
                }
                if text.starts_with("FATAL") || text.starts_with("PANIC") {
                    return Err(text);
                }
                self.op_err.get_or_insert(text);
            }
            Message::NotificationResponse(b) => {
                let ch = b.channel().map_err(|e| e.to_string())?.as_bytes().to_vec();
                let msg = b.message().map_err(|e| e.to_string())?.as_bytes().to_vec();
                let inc = wire::decode(&msg);
                let replaying = matches!(self.ops.front(), Some(Op::Replay | Op::Baseline));
                match inc.durable_id {
                    Some(id) if replaying => {
                        self.held.push((id, ch, inc.origin.to_vec(), inc.payload.to_vec()));
                    }
                    _ => {
                        self.route(&ch, inc.durable_id, inc.origin, inc.payload);
                    }
                }
            }
            Message::DataRow(b) => {
                let buf = b.buffer();
                let mut row = Vec::new();
                let mut r = b.ranges();
                while let Some(x) = r.next().map_err(|e| e.to_string())? {
                    row.push(x.map(|rg| buf[rg].to_vec()));
                }
                self.rows.push(row);
            }
            Message::ReadyForQuery(_) => {
                if self.phase == Phase::Auth {
                    self.on_ready();
                } else if let Some(op) = self.ops.pop_front() {
                    let err = self.op_err.take();
                    let rows = core::mem::take(&mut self.rows);
                    self.finish(op, err, rows)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_ready(&mut self) {
        use core::sync::atomic::Ordering::Relaxed;
        self.phase = Phase::Ready;
        self.attempt = 0;
        let now = now_ms();
        self.env.bus.set_state(ST_READY, now);
        // Relaxed: figures.
        self.env.bus.counters.connects.fetch_add(1, Relaxed);
        if self.ever_ready {
            self.env.bus.counters.reconnects.fetch_add(1, Relaxed);
        }
        self.ever_ready = true;
        self.failed_since_ready = false;
        // SAFETY: the timer event is ours.
        unsafe {
            if (*self.env.timer_ev).timer_set() != 0 {
                nginx_sys::ngx_del_timer(self.env.timer_ev);
            }
        }
        // A new session listens to nothing: every channel again.
        self.env.bus.all_wanted(&self.lock());
        let version =
            String::from_utf8_lossy(&self.env.bus.text(&self.lock(), &self.env.bus.server_version)).into_owned();
        ngx::ngx_log_error!(
            NGX_LOG_NOTICE,
            self.env.log,
            "workerbus: postgres {}: connected (server {version}, tls {}), holder pid {}",
            self.env.conf.describe(),
            if self.conn.as_ref().is_some_and(|c| c.tls) { "on" } else { "off" },
            // SAFETY: set by nginx at process start.
            unsafe { nginx_sys::ngx_pid }
        );
    }

    /// Chooses the next request. False when there is nothing to do.
    fn schedule(&mut self) -> bool {
        let now = now_ms();
        let c = self.env.conf;
        let op = if c.durable && !self.setup_done {
            let q = format!(
                "BEGIN; SELECT pg_advisory_xact_lock(7233152641); \
                 CREATE TABLE IF NOT EXISTS {OUTBOX} (id bigserial PRIMARY KEY, channel text NOT NULL, \
                 payload text NOT NULL, origin text NOT NULL DEFAULT '', created timestamptz NOT NULL DEFAULT now()); \
                 CREATE INDEX IF NOT EXISTS {OUTBOX}_created ON {OUTBOX} (created); \
                 CREATE OR REPLACE FUNCTION workerbus_post(p_channel text, p_payload text, p_origin text DEFAULT '') \
                 RETURNS bigint LANGUAGE plpgsql AS $wb$ DECLARE new_id bigint; BEGIN \
                 INSERT INTO {OUTBOX} (channel, payload, origin) VALUES (p_channel, p_payload, p_origin) RETURNING id INTO new_id; \
                 PERFORM pg_notify(p_channel, 'wbd ' || new_id || ' ' || p_origin || chr(10) || p_payload); \
                 RETURN new_id; END $wb$; COMMIT;"
            );
            let _ = frontend::query(&q, &mut self.out);
            Op::Setup
        } else if let Some(op) = self.listen_changes(now) {
            op
        } else if c.durable && self.need_sync && self.env.bus.synced.load(core::sync::atomic::Ordering::Relaxed) == 0 {
            let _ = frontend::query(&format!("SELECT coalesce(max(id), 0) FROM {OUTBOX}"), &mut self.out);
            Op::Baseline
        } else if c.durable && self.need_sync {
            let q = format!(
                "SELECT id, channel, payload, origin FROM {OUTBOX} WHERE id > {} ORDER BY id LIMIT {REPLAY_LIMIT}",
                self.env.bus.replay_from()
            );
            let _ = frontend::query(&q, &mut self.out);
            Op::Replay
        } else if self.env.bus.queue_len() > 0 {
            self.flush()
        } else if c.durable && now >= self.next_retention {
            let q = format!("DELETE FROM {OUTBOX} WHERE created < now() - interval '{} milliseconds'", c.retention_ms);
            let _ = frontend::query(&q, &mut self.out);
            self.next_retention = now + (c.retention_ms / 4).clamp(1000, 60_000);
            Op::Retention
        } else {
            return false;
        };
        self.ops.push_back(op);
        true
    }

    fn listen_changes(&mut self, now: u64) -> Option<Op> {
        let chans = self.env.bus.channels(&self.lock());
        let wanted: Vec<Vec<u8>> = chans.iter().filter(|c| c.1 == CH_WANTED).map(|c| c.0.clone()).collect();
        let sql = |verb: &str, list: &[Vec<u8>], prefix: &str| {
            list.iter()
                .map(|n| format!("{verb} {}", escape_identifier(&format!("{prefix}{}", String::from_utf8_lossy(n)))))
                .collect::<Vec<_>>()
                .join("; ")
        };
        if !wanted.is_empty() {
            let _ = frontend::query(&sql("LISTEN", &wanted, &self.env.conf.prefix), &mut self.out);
            return Some(Op::Listen(wanted));
        }
        let cutoff = now.saturating_sub(self.env.conf.unlisten_after_ms);
        let stale: Vec<Vec<u8>> = chans
            .iter()
            .filter(|c| c.1 == CH_LISTENING && c.2 < cutoff && c.0 != wire::EVENTS_CHANNEL.as_bytes())
            .map(|c| c.0.clone())
            .collect();
        if !stale.is_empty() {
            let _ = frontend::query(&sql("UNLISTEN", &stale, &self.env.conf.prefix), &mut self.out);
            return Some(Op::Unlisten(stale));
        }
        None
    }

    /// One transaction for everything queued (up to a bound): Parse once,
    /// Bind+Execute per post, one Sync (an implicit transaction).
    fn flush(&mut self) -> Op {
        let (posts, bytes) = self.env.bus.peek(&self.lock(), FLUSH_MAX, FLUSH_BYTES);
        let c = self.env.conf;
        let sql = if c.durable { "SELECT workerbus_post($1, $2, $3)" } else { "SELECT pg_notify($1, $2)" };
        let _ =
            frontend::parse("", sql, [25u32, 25, 25].into_iter().take(if c.durable { 3 } else { 2 }), &mut self.out);
        for p in &posts {
            let mut chan = c.prefix.as_bytes().to_vec();
            chan.extend_from_slice(&p.channel);
            let values: Vec<Vec<u8>> = if c.durable {
                vec![chan, p.payload.clone(), self.env.origin.as_bytes().to_vec()]
            } else {
                vec![chan, wire::encode(p.seq, &self.env.origin, &p.payload)]
            };
            let _ = frontend::bind(
                "",
                "",
                [0i16],
                values.iter(),
                |v, buf| {
                    buf.extend_from_slice(v);
                    Ok(postgres_protocol::IsNull::No)
                },
                [0i16],
                &mut self.out,
            );
            let _ = frontend::execute("", 0, &mut self.out);
        }
        frontend::sync(&mut self.out);
        Op::Flush { n: posts.len() as u64, bytes }
    }

    fn finish(&mut self, op: Op, err: Option<String>, rows: Vec<Vec<Option<Vec<u8>>>>) -> Result<(), String> {
        use core::sync::atomic::Ordering::Relaxed;
        let num = |row: &Vec<Option<Vec<u8>>>, i: usize| -> u64 {
            row.get(i)
                .and_then(|v| v.as_ref())
                .and_then(|v| core::str::from_utf8(v).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        };
        match op {
            Op::Setup => {
                if let Some(e) = err {
                    return Err(format!("cannot create the outbox table: {e}"));
                }
                self.setup_done = true;
            }
            Op::Baseline => {
                if let Some(e) = err {
                    return Err(format!("cannot read the outbox table: {e}"));
                }
                let max = rows.first().map_or(0, |r| num(r, 0));
                self.env.bus.set_baseline(&self.lock(), max);
                self.env.bus.table_max_id.fetch_max(max, Relaxed);
                self.need_sync = false;
                self.release_held();
            }
            Op::Replay => {
                if let Some(e) = err {
                    return Err(format!("cannot replay the outbox table: {e}"));
                }
                let full = rows.len() >= REPLAY_LIMIT;
                for r in &rows {
                    let id = num(r, 0);
                    let field = |i: usize| r.get(i).and_then(|v| v.clone()).unwrap_or_default();
                    let (ch, payload, origin) = (field(1), field(2), field(3));
                    self.env.bus.table_max_id.fetch_max(id, Relaxed);
                    if self.route(&ch, Some(id), &origin, &payload) {
                        self.env.bus.counters.replayed.fetch_add(1, Relaxed);
                    }
                }
                self.need_sync = full;
                if !full {
                    self.release_held();
                }
            }
            Op::Listen(list) => {
                if let Some(e) = err {
                    return Err(format!("LISTEN failed: {e}"));
                }
                for n in list {
                    self.env.bus.set_channel(&self.lock(), &n, CH_LISTENING);
                }
            }
            Op::Unlisten(list) => {
                if let Some(e) = err {
                    return Err(format!("UNLISTEN failed: {e}"));
                }
                let cutoff = now_ms().saturating_sub(self.env.conf.unlisten_after_ms);
                for n in list {
                    self.env.bus.finish_unlisten(&self.lock(), &n, cutoff);
                }
            }
            Op::Flush { n, bytes } => match err {
                None => {
                    self.env.bus.consume(&self.lock(), n, bytes);
                    self.env.bus.counters.flushes.fetch_add(1, Relaxed);
                    for r in &rows {
                        self.env.bus.table_max_id.fetch_max(num(r, 0), Relaxed);
                    }
                }
                Some(e) if self.env.conf.durable => return Err(format!("posting failed: {e}")),
                Some(e) => {
                    // Every post was checked at the call; a failure here is
                    // the server's (or a dropped table's). Not retried forever.
                    self.env.bus.consume(&self.lock(), n, bytes);
                    self.env.bus.counters.undeliverable.fetch_add(n, Relaxed);
                    ngx::ngx_log_error!(NGX_LOG_ERR, self.env.log, "workerbus: postgres: {n} posts dropped: {e}");
                }
            },
            Op::Retention => {
                if let Some(e) = err {
                    ngx::ngx_log_error!(
                        NGX_LOG_WARN,
                        self.env.log,
                        "workerbus: postgres: outbox retention failed: {e}"
                    );
                }
            }
        }
        Ok(())
    }

    fn release_held(&mut self) {
        let mut held = core::mem::take(&mut self.held);
        held.sort_by_key(|h| h.0);
        for (id, ch, origin, payload) in held {
            self.route(&ch, Some(id), &origin, &payload);
        }
    }

    /// A notification (or a replayed row) to the node's ring. Returns
    /// whether it was delivered (false: a duplicate, a foreign channel, or
    /// too large for the ring, the last two counted).
    fn route(&mut self, channel: &[u8], durable_id: Option<u64>, origin: &[u8], payload: &[u8]) -> bool {
        use core::sync::atomic::Ordering::Relaxed;
        let prefix = self.env.conf.prefix.as_bytes();
        let Some(ch) = channel.strip_prefix(prefix) else { return false };
        if let Some(id) = durable_id
            && !self.env.bus.mark_seen(&self.lock(), id)
        {
            return false;
        }
        self.env.bus.counters.notifications_in.fetch_add(1, Relaxed);
        let res = if ch == wire::EVENTS_CHANNEL.as_bytes() {
            let Some(e) = wire::decode_event(payload) else {
                self.env.bus.counters.undeliverable.fetch_add(1, Relaxed);
                return false;
            };
            let rec = RecordIn { source: e.source, event: e.event, unique: b"", data: e.data, pid: 0, flags: e.flags };
            ring_glue::post(0, &self.env.zone, &rec)
        } else {
            let mut data = Vec::with_capacity(origin.len() + 1 + payload.len());
            data.extend_from_slice(origin);
            data.push(0);
            data.extend_from_slice(payload);
            let rec = RecordIn { source: wire::RING_SOURCE, event: ch, unique: b"", data: &data, pid: 0, flags: 0 };
            ring_glue::post(0, &self.env.zone, &rec)
        };
        if let Err(e) = res {
            self.env.bus.counters.undeliverable.fetch_add(1, Relaxed);
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                self.env.log,
                "workerbus: postgres: notification on \"{}\" not delivered: {e}",
                String::from_utf8_lossy(ch)
            );
            return false;
        }
        true
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
