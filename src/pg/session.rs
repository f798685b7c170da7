//! The node's PostgreSQL session as a state machine without I/O: bytes,
//! the clock and transport events go in; bytes to send, actions for the
//! transport (connect, start TLS, close), deliveries to the node's ring and
//! log lines come out, and `wakeup_at` says when it wants to run again.
//! The nginx side (src/pg/driver.rs) only moves bytes and arms timers, so
//! `cargo test` drives every case here with scripted server replies.
//!
//! A session: connect, TLS when asked, authenticate, (durable) check the
//! outbox objects, LISTEN every channel, (durable) replay, then serve:
//! LISTEN/UNLISTEN as channels come and go, flush queued posts one
//! transaction at a time, expire old outbox rows, move the durable
//! horizon, and probe an idle connection. One request is in flight at a
//! time; each ends with ReadyForQuery and has a deadline.

use std::collections::VecDeque;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::escape::escape_identifier;
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;

use crate::shm::lock::ShmLock;
use crate::shm::pgbus::{CH_LISTENING, CH_WANTED, Horizon, PgBus, ST_BACKOFF, ST_CONNECTING, ST_READY, Track};

use super::config::PgConfig;
use super::error::Error;
use super::wire;

/// Posts per flush transaction, and their bytes.
pub const FLUSH_MAX: usize = 500;
const FLUSH_BYTES: usize = 1 << 20;
/// Rows per replay page.
pub const REPLAY_PAGE: usize = 1000;
/// The durable horizon moves at least this often while rows are remembered.
const ADVANCE_MS: u64 = 10_000;
pub const OUTBOX: &str = "workerbus_outbox";

/// How the session wants the transport to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection; then call `connected` (or `failed`).
    Connect,
    /// Run the TLS handshake; then call `tls_ready` (or `failed`).
    StartTls,
    /// Close the connection (the session already counted why).
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Notice,
    Info,
}

/// What the session hands to the node's ring.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// A post on a user channel (prefix removed), for wait() and subscribe().
    Bus { channel: &'a [u8], origin: &'a [u8], payload: &'a [u8] },
    /// A cluster-wide worker event.
    Event { flags: u32, source: &'a [u8], event: &'a [u8], data: &'a [u8] },
}

/// The node as the session sees it: its shared state under its lock, its
/// ring, its log and its wall clock (for the figures shown; every judgement
/// of time uses the monotonic `now` passed to each call).
pub trait Node {
    type Lock: ShmLock;
    fn bus(&self) -> &PgBus;
    fn lock(&self) -> Self::Lock;
    fn deliver(&mut self, d: Delivery<'_>) -> Result<(), String>;
    fn log(&mut self, level: Level, msg: &str);
    fn wall_ms(&self) -> u64;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Down,
    Connecting,
    SslReply,
    Tls,
    Auth,
    Ready,
}

#[derive(Debug)]
enum Op {
    /// Durable: which outbox objects exist.
    Check,
    /// Durable: create what is missing.
    Create,
    Listen(Vec<Vec<u8>>),
    Unlisten(Vec<Vec<u8>>),
    Flush {
        seqs: Vec<u64>,
        bytes: u64,
    },
    /// Durable: the snapshot a replay starts from.
    Snapshot {
        epoch: u32,
    },
    /// Durable: one page of rows.
    Page {
        last: (u64, u64),
        rows: usize,
    },
    Retention,
    Probe {
        sent: u64,
    },
}

/// A replay under way: the snapshot it ends at, the horizon it reads
/// outside of, and whether rows are delivered (false for a node's very
/// first replay: recorded only).
#[derive(Debug, Clone)]
struct Replay {
    snap: Horizon,
    epoch: u32,
    from: Horizon,
    deliver: bool,
}

pub struct Session {
    conf: &'static PgConfig,
    origin: String,
    phase: Phase,
    out: BytesMut,
    inb: BytesMut,
    actions: VecDeque<Action>,
    scram: Option<sasl::ScramSha256>,
    ops: VecDeque<Op>,
    op_err: Option<Error>,
    /// CommandCompletes of the request in flight (a flush: posts committed
    /// before an error, which names the post that failed).
    done_in_op: usize,
    /// Rows of the request in flight.
    rows: Vec<Vec<Option<Vec<u8>>>>,
    attempt: u32,
    retry_at: u64,
    deadline: u64,
    last_rx: u64,
    /// Durable: objects checked this session; what is missing.
    checked: bool,
    missing: Vec<&'static str>,
    need_replay: bool,
    replay: Option<Replay>,
    /// The replay under way left rows for the next one.
    again: bool,
    /// The session has listened (and replayed): the backoff starts over.
    worked: bool,
    ever_worked: bool,
    next_retention: u64,
    next_advance: u64,
    /// Sequence of a queued post the server refused: dropped when it reaches the front.
    poison: Option<u64>,
    rng: u64,
    /// The attempt under way uses TLS.
    tls_now: bool,
    /// libpq's second attempt (sslmode allow/prefer): made at once, with
    /// TLS or without, after the first was refused.
    second: Option<bool>,
    rejected_logged_at: u64,
}

/// A fingerprint of a durable row's content (FNV-1a): a forged
/// notification that reuses a real row's id does not match it.
pub fn fingerprint(channel: &[u8], origin: &[u8], payload: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in [channel, b"\0", origin, b"\0", payload] {
        for &b in part {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

fn server_error(fields: &ErrorResponseBody) -> Error {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let mut it = fields.fields();
    while let Ok(Some(f)) = it.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => severity = v,
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    Error::Server { during: "", severity, code, message }
}

fn proto(e: impl std::fmt::Display) -> Error {
    Error::Protocol(e.to_string())
}

impl Session {
    pub fn new(conf: &'static PgConfig, origin: String, seed: u64) -> Session {
        Session {
            conf,
            origin,
            phase: Phase::Down,
            out: BytesMut::new(),
            inb: BytesMut::new(),
            actions: VecDeque::new(),
            scram: None,
            ops: VecDeque::new(),
            op_err: None,
            done_in_op: 0,
            rows: Vec::new(),
            attempt: 0,
            retry_at: 0,
            deadline: 0,
            last_rx: 0,
            checked: false,
            missing: Vec::new(),
            need_replay: true,
            replay: None,
            again: false,
            worked: false,
            ever_worked: false,
            next_retention: 0,
            next_advance: 0,
            poison: None,
            rng: seed | 1,
            tls_now: false,
            second: None,
            rejected_logged_at: 0,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Ready with no request in flight: it sleeps until woken or its timer.
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Ready && self.ops.is_empty()
    }

    /// Bytes to send (the driver drains what it could write).
    pub fn transmit(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    pub fn take_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether the attempt under way uses TLS.
    fn wants_tls(&self) -> bool {
        self.tls_now
    }

    /// When the session wants `poll` to run again (monotonic ms).
    pub fn wakeup_at(&self) -> Option<u64> {
        match self.phase {
            Phase::Down => Some(self.retry_at),
            Phase::Ready => {
                if !self.ops.is_empty() {
                    return Some(self.deadline);
                }
                let mut t = self.last_rx + self.conf.keepalive_ms;
                if self.conf.durable {
                    t = t.min(self.next_retention);
                    if self.next_advance != 0 {
                        t = t.min(self.next_advance);
                    }
                }
                Some(t)
            }
            _ => Some(self.deadline),
        }
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

    /// Ends the session and schedules the next attempt: the delay doubles
    /// from backoff_min to backoff_max for each attempt since a session
    /// last worked, with jitter (half to all of it). One log line each.
    pub fn failed<N: Node>(&mut self, e: Error, now: u64, node: &mut N) {
        use core::sync::atomic::Ordering::Relaxed;
        if self.phase == Phase::Down {
            return;
        }
        let was_working = self.worked;
        let c = self.conf;
        // The server refused the start-up (an error before it was ready, a
        // close, a TLS failure): libpq's allow and prefer try once more at
        // once, the other way.
        let refused = matches!(self.phase, Phase::SslReply | Phase::Tls | Phase::Auth)
            && matches!(e, Error::Server { .. } | Error::Closed | Error::Tls(_));
        let again = if refused && self.second.is_none() { c.sslmode.on_refusal(self.tls_now) } else { None };
        self.second = again;
        self.phase = Phase::Down;
        self.actions.push_back(Action::Close);
        self.ops.clear();
        self.op_err = None;
        self.done_in_op = 0;
        self.rows.clear();
        self.out.clear();
        self.inb.clear();
        self.scram = None;
        self.checked = false;
        self.need_replay = true;
        self.replay = None;
        self.again = false;
        self.worked = false;
        if was_working {
            self.attempt = 0;
        }
        if let Some(tls) = again {
            let msg = format!(
                "postgres {}: {e}; trying again at once {} TLS (sslmode {})",
                c.describe(),
                if tls { "with" } else { "without" },
                c.sslmode.name()
            );
            node.log(Level::Info, &msg);
            self.retry_at = now;
            return;
        }
        let base = c.backoff_min_ms.saturating_mul(1u64 << self.attempt.min(20)).min(c.backoff_max_ms);
        let delay = base / 2 + self.random() % (base / 2 + 1);
        self.attempt += 1;
        self.retry_at = now + delay;
        let bus = node.bus();
        bus.set_state(ST_BACKOFF, node.wall_ms());
        let why = e.to_string();
        bus.set_text(&node.lock(), &bus.last_error, why.as_bytes());
        // Relaxed: figures.
        bus.last_error_ms.store(node.wall_ms(), Relaxed);
        if !was_working {
            bus.counters.connect_failures.fetch_add(1, Relaxed);
        }
        if matches!(e, Error::Timeout { .. }) && self.ever_worked {
            bus.counters.request_timeouts.fetch_add(1, Relaxed);
        }
        let (level, lost) = if was_working { (Level::Warn, "connection lost: ") } else { (Level::Error, "") };
        let msg = format!("postgres {}: {lost}{why}; retrying in {delay}ms (attempt {})", c.describe(), self.attempt);
        node.log(level, &msg);
    }

    /// Leaves the server for good (the lease went elsewhere, or exit).
    pub fn terminate(&mut self) {
        if matches!(self.phase, Phase::Auth | Phase::Ready) {
            self.out.clear();
            frontend::terminate(&mut self.out);
        }
        self.phase = Phase::Down;
    }

    /// Runs timers and chooses the next request.
    pub fn poll<N: Node>(&mut self, now: u64, node: &mut N) {
        match self.phase {
            Phase::Down => {
                if now >= self.retry_at {
                    self.tls_now = match self.second {
                        Some(tls) => tls,
                        None => self.conf.sslmode.first_try_tls(),
                    };
                    self.phase = Phase::Connecting;
                    self.deadline = now + self.conf.connect_timeout_ms;
                    node.bus().set_state(ST_CONNECTING, node.wall_ms());
                    self.actions.push_back(Action::Connect);
                }
            }
            Phase::Ready => {
                if !self.ops.is_empty() {
                    if now >= self.deadline {
                        let what = if matches!(self.ops.front(), Some(Op::Probe { .. })) {
                            use core::sync::atomic::Ordering::Relaxed;
                            node.bus().counters.probe_failures.fetch_add(1, Relaxed);
                            "the keepalive probe's request_timeout"
                        } else {
                            "request_timeout"
                        };
                        self.failed(Error::Timeout { what, ms: self.conf.request_timeout_ms }, now, node);
                    }
                    return;
                }
                self.schedule(now, node);
            }
            _ => {
                if now >= self.deadline {
                    let ms = self.conf.connect_timeout_ms;
                    self.failed(Error::Timeout { what: "connect_timeout", ms }, now, node);
                }
            }
        }
    }

    /// The TCP connection is up.
    pub fn connected(&mut self, _now: u64) {
        if self.phase != Phase::Connecting {
            return;
        }
        if self.wants_tls() {
            frontend::ssl_request(&mut self.out);
            self.phase = Phase::SslReply;
        } else {
            self.startup();
        }
    }

    /// The TLS handshake finished (and the peer passed the mode's checks).
    pub fn tls_ready(&mut self, _now: u64) {
        if self.phase == Phase::Tls {
            self.startup();
        }
    }

    fn startup(&mut self) {
        let c = self.conf;
        let params = [
            ("user", c.user.as_str()),
            ("database", c.dbname.as_str()),
            ("application_name", c.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        let _ = frontend::startup_message(params.iter().copied(), &mut self.out);
        self.phase = Phase::Auth;
    }

    /// Bytes from the server.
    pub fn received<N: Node>(&mut self, mut data: &[u8], now: u64, node: &mut N) {
        self.last_rx = now;
        if self.phase == Phase::SslReply && !data.is_empty() {
            match data[0] {
                b'S' => {
                    self.phase = Phase::Tls;
                    self.actions.push_back(Action::StartTls);
                }
                b'N' if self.conf.sslmode.accepts_plain() => {
                    self.tls_now = false;
                    self.startup();
                }
                b'N' => {
                    let why = format!("the server does not accept TLS but sslmode is {}", self.conf.sslmode.name());
                    return self.failed(Error::Tls(why), now, node);
                }
                _ => return self.failed(Error::Protocol("unexpected answer to the TLS request".into()), now, node),
            }
            data = &data[1..];
        }
        self.inb.extend_from_slice(data);
        loop {
            let m = match Message::parse(&mut self.inb) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return self.failed(proto(e), now, node),
            };
            if let Err(e) = self.handle(m, now, node) {
                return self.failed(e, now, node);
            }
            if self.phase == Phase::Down {
                return;
            }
        }
        if self.phase == Phase::Ready && self.ops.is_empty() {
            self.schedule(now, node);
        }
    }

    fn password(&self) -> Result<&[u8], Error> {
        self.conf
            .password
            .as_deref()
            .map(str::as_bytes)
            .ok_or_else(|| Error::Auth("the server asks for a password and none is configured".into()))
    }

    fn handle<N: Node>(&mut self, m: Message, now: u64, node: &mut N) -> Result<(), Error> {
        match m {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                let pw = self.password()?.to_vec();
                frontend::password_message(&pw, &mut self.out).map_err(proto)?;
            }
            Message::AuthenticationMd5Password(b) => {
                let pw = self.password()?.to_vec();
                let h = md5_hash(self.conf.user.as_bytes(), &pw, b.salt());
                frontend::password_message(h.as_bytes(), &mut self.out).map_err(proto)?;
            }
            Message::AuthenticationSasl(b) => {
                let mut mechs = b.mechanisms();
                let mut scram = false;
                while let Some(m) = mechs.next().map_err(proto)? {
                    scram |= m == sasl::SCRAM_SHA_256;
                }
                if !scram {
                    return Err(Error::Auth("the server offers no SASL mechanism this client supports".into()));
                }
                let pw = self.password()?.to_vec();
                let s = sasl::ScramSha256::new(&pw, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut self.out).map_err(proto)?;
                self.scram = Some(s);
            }
            Message::AuthenticationSaslContinue(b) => {
                let s = self.scram.as_mut().ok_or_else(|| Error::Auth("unexpected SASL message".into()))?;
                s.update(b.data()).map_err(|e| Error::Auth(format!("SCRAM: {e}")))?;
                frontend::sasl_response(s.message(), &mut self.out).map_err(proto)?;
            }
            Message::AuthenticationSaslFinal(b) => {
                let s = self.scram.as_mut().ok_or_else(|| Error::Auth("unexpected SASL message".into()))?;
                s.finish(b.data()).map_err(|e| Error::Auth(format!("SCRAM: server signature rejected: {e}")))?;
            }
            Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGssContinue(_) => {
                return Err(Error::Auth(
                    "the server asks for an authentication method this client does not support".into(),
                ));
            }
            Message::ParameterStatus(b) => {
                if b.name().ok() == Some("server_version")
                    && let Ok(v) = b.value()
                {
                    let bus = node.bus();
                    bus.set_text(&node.lock(), &bus.server_version, v.as_bytes());
                }
            }
            Message::ErrorResponse(b) => {
                let e = server_error(&b);
                let fatal = matches!(&e, Error::Server { severity, .. } if severity == "FATAL" || severity == "PANIC");
                if self.phase != Phase::Ready || fatal {
                    return Err(e);
                }
                self.op_err.get_or_insert(e);
            }
            Message::NotificationResponse(b) => {
                let ch = b.channel().map_err(proto)?.as_bytes().to_vec();
                let msg = b.message().map_err(proto)?.as_bytes().to_vec();
                self.notification(&ch, &msg, now, node);
            }
            Message::CommandComplete(_) | Message::EmptyQueryResponse => self.done_in_op += 1,
            Message::DataRow(b) => {
                let buf = b.buffer();
                let mut row = Vec::new();
                let mut r = b.ranges();
                while let Some(x) = r.next().map_err(proto)? {
                    row.push(x.map(|rg| buf[rg].to_vec()));
                }
                if matches!(self.ops.front(), Some(Op::Page { .. })) {
                    // Replay rows go to the ring as they come: no page is held.
                    self.replay_row(&row, node);
                    if let Some(Op::Page { last, rows }) = self.ops.front_mut() {
                        *last = (num(&row, 1), num(&row, 0));
                        *rows += 1;
                    }
                } else {
                    self.rows.push(row);
                }
            }
            Message::ReadyForQuery(_) => {
                if self.phase == Phase::Auth {
                    self.on_ready(now, node);
                } else if let Some(op) = self.ops.pop_front() {
                    let err = self.op_err.take();
                    let rows = core::mem::take(&mut self.rows);
                    let done = core::mem::take(&mut self.done_in_op);
                    self.finish(op, err, rows, done, now, node)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_ready<N: Node>(&mut self, now: u64, node: &mut N) {
        self.phase = Phase::Ready;
        // A new session listens to nothing: every channel again.
        let bus = node.bus();
        bus.all_wanted(&node.lock());
        self.last_rx = now;
        self.next_advance = 0;
    }

    /// The session has worked (logged in, listened, and when durable set
    /// up and replayed): only now is it "connected", counted, and the
    /// backoff starts over.
    fn mark_worked<N: Node>(&mut self, now: u64, node: &mut N) {
        use core::sync::atomic::Ordering::Relaxed;
        if self.worked || (self.conf.durable && self.need_replay) {
            return;
        }
        self.worked = true;
        self.attempt = 0;
        self.second = None;
        self.next_advance = now + ADVANCE_MS;
        let bus = node.bus();
        bus.set_state(ST_READY, node.wall_ms());
        // Relaxed: figures.
        bus.counters.connects.fetch_add(1, Relaxed);
        if self.ever_worked {
            bus.counters.reconnects.fetch_add(1, Relaxed);
        }
        self.ever_worked = true;
        let version = String::from_utf8_lossy(&bus.text(&node.lock(), &bus.server_version)).into_owned();
        let msg = format!(
            "postgres {}: connected (server {version}, tls {})",
            self.conf.describe(),
            if self.wants_tls() { "on" } else { "off" }
        );
        node.log(Level::Notice, &msg);
    }

    fn push_op(&mut self, op: Op, now: u64) {
        self.deadline = now + self.conf.request_timeout_ms;
        self.ops.push_back(op);
    }

    /// Chooses the next request, if any.
    fn schedule<N: Node>(&mut self, now: u64, node: &mut N) {
        let c = self.conf;
        if c.durable && !self.checked {
            let q = format!(
                "SELECT to_regclass('{OUTBOX}') IS NOT NULL, \
                 to_regprocedure('workerbus_post(text,text,text)') IS NOT NULL, \
                 EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{OUTBOX}') AND attname = 'xid' AND NOT attisdropped), \
                 coalesce(has_table_privilege(to_regclass('{OUTBOX}'), 'SELECT'), true), \
                 coalesce(has_table_privilege(to_regclass('{OUTBOX}'), 'INSERT'), true), \
                 coalesce(has_table_privilege(to_regclass('{OUTBOX}'), 'DELETE'), true), \
                 coalesce(has_function_privilege(to_regprocedure('workerbus_post(text,text,text)'), 'EXECUTE'), true), \
                 coalesce(has_sequence_privilege(to_regclass('{OUTBOX}_id_seq'), 'USAGE'), true), \
                 current_user"
            );
            let _ = frontend::query(&q, &mut self.out);
            return self.push_op(Op::Check, now);
        }
        if c.durable && !self.missing.is_empty() {
            let q = create_sql(&self.missing);
            let _ = frontend::query(&q, &mut self.out);
            return self.push_op(Op::Create, now);
        }
        if let Some(op) = self.listen_changes(now, node) {
            return self.push_op(op, now);
        }
        if c.durable && self.need_replay {
            if let Some(r) = self.replay.clone() {
                let start = (r.from.lo, 0);
                return self.page(&r, start, node, now);
            }
            let bus = node.bus();
            let epoch = bus.begin_snapshot(&node.lock());
            let _ = frontend::query(
                "SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text, \
                 array_to_string(array(SELECT pg_snapshot_xip(s)), ',') FROM pg_current_snapshot() s",
                &mut self.out,
            );
            return self.push_op(Op::Snapshot { epoch }, now);
        }
        self.mark_worked(now, node);
        let bus = node.bus();
        if bus.queue_len() > 0 {
            return self.flush(now, node);
        }
        if c.durable && now >= self.next_retention {
            let q = format!("DELETE FROM {OUTBOX} WHERE created < now() - interval '{} milliseconds'", c.retention_ms);
            let _ = frontend::query(&q, &mut self.out);
            self.next_retention = now + (c.retention_ms / 4).clamp(1000, 60_000);
            return self.push_op(Op::Retention, now);
        }
        if c.durable {
            let (_, _, tracked) = bus.durable_figures();
            let due = self.next_advance != 0 && now >= self.next_advance && tracked > 0;
            if due || tracked as usize >= crate::shm::pgbus::TRACKED / 2 {
                // Move the horizon: a replay that reads only rows not yet delivered.
                self.need_replay = true;
                self.next_advance = now + ADVANCE_MS;
                return self.schedule(now, node);
            }
        }
        if now >= self.last_rx + c.keepalive_ms {
            use core::sync::atomic::Ordering::Relaxed;
            bus.counters.probes.fetch_add(1, Relaxed);
            let _ = frontend::query("", &mut self.out);
            self.push_op(Op::Probe { sent: now }, now);
        }
    }

    fn listen_changes<N: Node>(&mut self, now: u64, node: &mut N) -> Option<Op> {
        let bus = node.bus();
        let chans = bus.channels(&node.lock());
        let prefix = &self.conf.prefix;
        let sql = |verb: &str, list: &[Vec<u8>]| {
            list.iter()
                .map(|n| format!("{verb} {}", escape_identifier(&format!("{prefix}{}", String::from_utf8_lossy(n)))))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let wanted: Vec<Vec<u8>> = chans.iter().filter(|c| c.1 == CH_WANTED).map(|c| c.0.clone()).collect();
        if !wanted.is_empty() {
            let _ = frontend::query(&sql("LISTEN", &wanted), &mut self.out);
            return Some(Op::Listen(wanted));
        }
        let cutoff = now.saturating_sub(self.conf.unlisten_after_ms);
        let stale: Vec<Vec<u8>> = chans
            .iter()
            .filter(|c| c.1 == CH_LISTENING && c.2 < cutoff && c.0 != wire::EVENTS_CHANNEL.as_bytes())
            .map(|c| c.0.clone())
            .collect();
        if !stale.is_empty() {
            let _ = frontend::query(&sql("UNLISTEN", &stale), &mut self.out);
            return Some(Op::Unlisten(stale));
        }
        None
    }

    /// One replay page: rows outside the horizon, after `last` in
    /// (xid, id) order, of the node's channels, not already delivered.
    fn page<N: Node>(&mut self, r: &Replay, last: (u64, u64), node: &mut N, now: u64) {
        let bus = node.bus();
        let chans: Vec<String> = bus
            .channels(&node.lock())
            .into_iter()
            .map(|c| format!("{}{}", self.conf.prefix, String::from_utf8_lossy(&c.0)))
            .collect();
        let skip = bus.tracked_ids(&node.lock());
        let arr = |items: &mut dyn Iterator<Item = String>| {
            let v: Vec<String> = items.collect();
            format!("{{{}}}", v.join(","))
        };
        let chan_arr = arr(&mut chans.iter().map(|c| format!("\"{}\"", c.replace('\\', "\\\\").replace('"', "\\\""))));
        let skip_arr = arr(&mut skip.iter().map(|i| i.to_string()));
        let sql = format!(
            "SELECT id, xid::text, channel, payload, origin FROM {OUTBOX} \
             WHERE (xid >= $1::text::xid8 OR xid = ANY($6::text::xid8[])) \
             AND (xid, id) > ($2::text::xid8, $3::bigint) \
             AND channel = ANY($4::text[]) AND NOT (id = ANY($5::bigint[])) \
             ORDER BY xid, id LIMIT {REPLAY_PAGE}"
        );
        let xip_arr = arr(&mut r.from.xip.iter().map(|x| x.to_string()));
        let from = r.from.hi.max(r.from.lo);
        let params = [from.to_string(), last.0.to_string(), last.1.to_string(), chan_arr, skip_arr, xip_arr];
        extended(&mut self.out, &sql, &params);
        self.push_op(Op::Page { last, rows: 0 }, now);
    }

    fn replay_row<N: Node>(&mut self, row: &[Option<Vec<u8>>], node: &mut N) {
        use core::sync::atomic::Ordering::Relaxed;
        let Some((deliver, covered)) = self.replay.as_ref().map(|r| (r.deliver, r.snap.covers(num(row, 1)))) else {
            return;
        };
        let (id, xid) = (num(row, 0), num(row, 1));
        let field = |i: usize| row.get(i).and_then(|v| v.clone()).unwrap_or_default();
        let (ch, payload, origin) = (field(2), field(3), field(4));
        let fp = fingerprint(&ch, &origin, &payload);
        match node.bus().track(&node.lock(), id, xid, fp) {
            Track::Duplicate => return,
            // No room to remember it: delivered now only if the horizon this
            // replay ends at covers it (then no replay reads it again);
            // else left for the next replay.
            Track::Untracked if !covered => {
                self.again = true;
                return;
            }
            _ => {}
        }
        if !deliver {
            return;
        }
        if self.route(&ch, &origin, &payload, false, node) {
            node.bus().counters.replayed.fetch_add(1, Relaxed);
        }
    }

    /// Everything queued (up to a bound) as one transaction: Parse once,
    /// Bind+Execute per post, one Sync (an implicit transaction). A post
    /// the server refused before is dropped first.
    fn flush<N: Node>(&mut self, now: u64, node: &mut N) {
        use core::sync::atomic::Ordering::Relaxed;
        let bus = node.bus();
        let (mut posts, mut bytes) = bus.peek(&node.lock(), FLUSH_MAX, FLUSH_BYTES);
        if let (Some(bad), Some(first)) = (self.poison, posts.first())
            && first.seq == bad
        {
            // Dropped alone (it was counted and logged when refused).
            bus.consume(&node.lock(), 1, bytes_of(first));
            bus.counters.notifications_out.fetch_sub(1, Relaxed);
            self.poison = None;
            (posts, bytes) = bus.peek(&node.lock(), FLUSH_MAX, FLUSH_BYTES);
            if posts.is_empty() {
                return self.schedule(now, node);
            }
        }
        if let Some(bad) = self.poison
            && let Some(k) = posts.iter().position(|p| p.seq == bad)
        {
            // Only the posts before the refused one: they commit, then it goes.
            bytes = posts[..k].iter().map(bytes_of).sum();
            posts.truncate(k);
        }
        let c = self.conf;
        let sql = if c.durable { "SELECT workerbus_post($1, $2, $3)" } else { "SELECT pg_notify($1, $2)" };
        let _ =
            frontend::parse("", sql, [25u32, 25, 25].into_iter().take(if c.durable { 3 } else { 2 }), &mut self.out);
        for p in &posts {
            let mut chan = c.prefix.as_bytes().to_vec();
            chan.extend_from_slice(&p.channel);
            let events = p.channel == wire::EVENTS_CHANNEL.as_bytes();
            let body = if events && let Some(key) = c.secret.as_deref() {
                wire::sign_event(key, &chan, &self.origin, p.seq, &p.payload)
            } else {
                p.payload.clone()
            };
            let values: Vec<Vec<u8>> = if c.durable {
                vec![chan, body, self.origin.as_bytes().to_vec()]
            } else {
                vec![chan, wire::encode(p.seq, &self.origin, &body)]
            };
            bind_execute(&mut self.out, &values);
        }
        frontend::sync(&mut self.out);
        let seqs = posts.iter().map(|p| p.seq).collect();
        self.push_op(Op::Flush { seqs, bytes }, now);
    }

    fn finish<N: Node>(
        &mut self,
        op: Op,
        err: Option<Error>,
        rows: Vec<Vec<Option<Vec<u8>>>>,
        done: usize,
        now: u64,
        node: &mut N,
    ) -> Result<(), Error> {
        use core::sync::atomic::Ordering::Relaxed;
        let bus = node.bus();
        match op {
            Op::Check => {
                if let Some(e) = err {
                    return Err(e.during("cannot check the outbox objects"));
                }
                let row = rows.first().cloned().unwrap_or_default();
                let yes = |i: usize| row.get(i).and_then(|v| v.as_deref()) == Some(b"t");
                let user = row.get(8).and_then(|v| v.clone()).map(|v| String::from_utf8_lossy(&v).into_owned());
                self.missing.clear();
                if !yes(0) {
                    self.missing.push("table");
                } else if !yes(2) {
                    self.missing.push("xid");
                }
                if !yes(1) || !yes(2) {
                    self.missing.push("function");
                }
                self.checked = true;
                if self.missing.is_empty() {
                    let grants = [
                        (3, "SELECT on table", OUTBOX.to_string()),
                        (4, "INSERT on table", OUTBOX.to_string()),
                        (5, "DELETE on table", OUTBOX.to_string()),
                        (6, "EXECUTE on function", "workerbus_post(text, text, text)".to_string()),
                        (7, "USAGE on sequence", format!("{OUTBOX}_id_seq")),
                    ];
                    if let Some((_, what, obj)) = grants.iter().find(|g| !yes(g.0)) {
                        let who = user.unwrap_or_default();
                        return Err(Error::Auth(format!(
                            "role \"{who}\" lacks {what} {obj} (see docs/postgres.md, \"Deploying\")"
                        )));
                    }
                }
            }
            Op::Create => {
                if let Some(e) = err {
                    return Err(e.during("cannot create the outbox objects (an administrator can run the SQL of docs/postgres.md, \"Deploying\")"));
                }
                self.missing.clear();
            }
            Op::Listen(list) => {
                if let Some(e) = err {
                    return Err(e.during("LISTEN failed"));
                }
                for n in list {
                    bus.set_channel(&node.lock(), &n, CH_LISTENING);
                }
                self.mark_worked(now, node);
            }
            Op::Unlisten(list) => {
                if let Some(e) = err {
                    return Err(e.during("UNLISTEN failed"));
                }
                let cutoff = now.saturating_sub(self.conf.unlisten_after_ms);
                for n in list {
                    bus.finish_unlisten(&node.lock(), &n, cutoff);
                }
            }
            Op::Snapshot { epoch } => {
                if let Some(e) = err {
                    return Err(e.during("cannot read the server's snapshot"));
                }
                let row = rows.first().cloned().unwrap_or_default();
                let (xmin, xmax) = (num(&row, 0), num(&row, 1));
                let xip_text = row.get(2).and_then(|v| v.clone()).unwrap_or_default();
                let xip = String::from_utf8_lossy(&xip_text).split(',').filter_map(|x| x.parse().ok()).collect();
                let deliver = bus.synced();
                let from = match bus.replay_from(&node.lock(), xmin, xmax) {
                    Some(h) => h,
                    None => {
                        let h = Horizon { lo: xmin, hi: xmin, xip: Vec::new() };
                        let msg = format!(
                            "postgres {}: the server's transaction ids went backwards (next {xmax}, \
                             this node had delivered everything below a higher one): \
                             another server or a restored one; delivering from here on",
                            self.conf.describe()
                        );
                        node.log(Level::Warn, &msg);
                        h
                    }
                };
                let snap = Horizon { lo: xmin, hi: xmax, xip };
                self.replay = Some(Replay { snap, epoch, from, deliver });
            }
            Op::Page { last, rows: n } => {
                if let Some(e) = err {
                    return Err(e.during("cannot replay the outbox table"));
                }
                let Some(r) = self.replay.clone() else { return Ok(()) };
                if n >= REPLAY_PAGE {
                    self.page(&r, last, node, now);
                } else {
                    let forged = bus.advance(&node.lock(), &r.snap, r.epoch);
                    if forged > 0 {
                        bus.counters.rejected.fetch_add(forged as u64, Relaxed);
                        self.log_rejected(
                            now,
                            node,
                            &format!("{forged} durable notifications claimed transaction ids the server had not assigned (forged)"),
                        );
                    }
                    self.replay = None;
                    self.need_replay = core::mem::take(&mut self.again);
                    self.mark_worked(now, node);
                }
            }
            Op::Flush { seqs, bytes } => match err {
                None => {
                    bus.consume(&node.lock(), seqs.len() as u64, bytes);
                    bus.counters.flushes.fetch_add(1, Relaxed);
                }
                Some(e) if e.is_bad_post() && done < seqs.len() => {
                    // Posts before it committed nothing (one transaction):
                    // they go again without it; it is dropped alone.
                    let bad = seqs[done];
                    let ch =
                        bus.peek(&node.lock(), done + 1, usize::MAX).0.pop().map(|p| p.channel).unwrap_or_default();
                    bus.counters.posts_refused.fetch_add(1, Relaxed);
                    bus.counters.undeliverable.fetch_add(1, Relaxed);
                    let msg = format!(
                        "postgres: a post on \"{}\" was refused and dropped: {e}",
                        String::from_utf8_lossy(&ch)
                    );
                    node.log(Level::Error, &msg);
                    self.poison = Some(bad);
                }
                Some(e) => return Err(e.during("posting failed")),
            },
            Op::Retention => {
                if let Some(e) = err {
                    node.log(Level::Warn, &format!("postgres: outbox retention failed: {e}"));
                }
            }
            Op::Probe { sent } => {
                bus.counters.probe_us.store(now.saturating_sub(sent).saturating_mul(1000).max(1), Relaxed);
            }
        }
        Ok(())
    }

    fn log_rejected<N: Node>(&mut self, now: u64, node: &mut N, what: &str) {
        // At most one line per 10 s; the count is in the status.
        if self.rejected_logged_at == 0 || now >= self.rejected_logged_at + 10_000 {
            self.rejected_logged_at = now;
            node.log(Level::Warn, &format!("postgres: {what} (further ones counted in \"rejected\")"));
        }
    }

    /// A live notification.
    fn notification<N: Node>(&mut self, channel: &[u8], msg: &[u8], now: u64, node: &mut N) {
        let inc = wire::decode(msg);
        if let Some((id, xid)) = inc.durable {
            let fp = fingerprint(channel, inc.origin, inc.payload);
            match node.bus().track(&node.lock(), id, xid, fp) {
                Track::Duplicate => return,
                Track::Untracked => {
                    // No room to remember it: the next replay delivers it
                    // (it is committed, so the replay reads it), once.
                    self.need_replay = true;
                    return;
                }
                Track::New => {}
            }
        }
        let (origin, payload) = (inc.origin.to_vec(), inc.payload.to_vec());
        self.route_checked(channel, &origin, &payload, now, node);
    }

    fn route_checked<N: Node>(&mut self, channel: &[u8], origin: &[u8], payload: &[u8], now: u64, node: &mut N) {
        use core::sync::atomic::Ordering::Relaxed;
        let Some(ch) = channel.strip_prefix(self.conf.prefix.as_bytes()) else { return };
        if ch == wire::EVENTS_CHANNEL.as_bytes() {
            let body = match self.conf.secret.as_deref() {
                Some(key) => wire::verify_event(key, channel, origin, payload),
                None => Ok(payload),
            };
            let why = match body.map(wire::decode_event) {
                Ok(Some(e)) if wire::EVENT_FLAGS_OK(e.flags) => None,
                Ok(_) => Some("a cluster event that no node sends (malformed, or unknown flags)"),
                Err(why) => Some(why),
            };
            if let Some(why) = why {
                node.bus().counters.rejected.fetch_add(1, Relaxed);
                self.log_rejected(now, node, &format!("notification on the reserved channel dropped: {why}"));
                return;
            }
        }
        self.route(channel, origin, payload, true, node);
    }

    /// To the node's ring. True when delivered.
    fn route<N: Node>(&mut self, channel: &[u8], origin: &[u8], payload: &[u8], checked: bool, node: &mut N) -> bool {
        use core::sync::atomic::Ordering::Relaxed;
        let Some(ch) = channel.strip_prefix(self.conf.prefix.as_bytes()) else { return false };
        let res = if ch == wire::EVENTS_CHANNEL.as_bytes() {
            let body = match (checked, self.conf.secret.as_deref()) {
                (true, Some(_)) => wire::strip_signature(payload),
                (false, Some(key)) => wire::verify_event(key, channel, origin, payload).ok(),
                (_, None) => Some(payload),
            };
            match body.and_then(wire::decode_event).filter(|e| wire::EVENT_FLAGS_OK(e.flags)) {
                Some(e) => {
                    node.deliver(Delivery::Event { flags: e.flags, source: e.source, event: e.event, data: e.data })
                }
                None => {
                    node.bus().counters.rejected.fetch_add(1, Relaxed);
                    return false;
                }
            }
        } else {
            node.deliver(Delivery::Bus { channel: ch, origin, payload })
        };
        match res {
            Ok(()) => {
                node.bus().counters.notifications_in.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                node.bus().counters.undeliverable.fetch_add(1, Relaxed);
                let msg = format!("postgres: notification on \"{}\" not delivered: {e}", String::from_utf8_lossy(ch));
                node.log(Level::Error, &msg);
                false
            }
        }
    }
}

fn bytes_of(p: &crate::shm::pgbus::Queued) -> u64 {
    crate::shm::pgbus::PgBus::record_bytes(p.channel.len(), p.payload.len())
}

fn num(row: &[Option<Vec<u8>>], i: usize) -> u64 {
    row.get(i)
        .and_then(|v| v.as_ref())
        .and_then(|v| core::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn bind_execute(out: &mut BytesMut, values: &[Vec<u8>]) {
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
        out,
    );
    let _ = frontend::execute("", 0, out);
}

/// One statement with text parameters: Parse, Bind, Execute, Sync.
fn extended(out: &mut BytesMut, sql: &str, params: &[String]) {
    let _ = frontend::parse("", sql, core::iter::repeat_n(0u32, params.len()), out);
    let values: Vec<Vec<u8>> = params.iter().map(|p| p.as_bytes().to_vec()).collect();
    bind_execute(out, &values);
    frontend::sync(out);
}

/// The DDL for what `Check` found missing, in one transaction under an
/// advisory lock (nodes that start together create it once).
fn create_sql(missing: &[&str]) -> String {
    let mut q = String::from("BEGIN; SELECT pg_advisory_xact_lock(7233152641); ");
    if missing.contains(&"table") {
        q += &format!(
            "CREATE TABLE IF NOT EXISTS {OUTBOX} (id bigserial PRIMARY KEY, \
             xid xid8 NOT NULL DEFAULT pg_current_xact_id(), channel text NOT NULL, \
             payload text NOT NULL, origin text NOT NULL DEFAULT '', created timestamptz NOT NULL DEFAULT now()); "
        );
    }
    if missing.contains(&"xid") {
        // An outbox of an earlier release: its rows predate every node's horizon.
        q += &format!("ALTER TABLE {OUTBOX} ADD COLUMN IF NOT EXISTS xid xid8 NOT NULL DEFAULT '0'::xid8; ");
        q += &format!("ALTER TABLE {OUTBOX} ALTER COLUMN xid SET DEFAULT pg_current_xact_id(); ");
    }
    q += &format!(
        "CREATE INDEX IF NOT EXISTS {OUTBOX}_xid ON {OUTBOX} (xid, id); \
         CREATE INDEX IF NOT EXISTS {OUTBOX}_created ON {OUTBOX} (created); "
    );
    if missing.contains(&"function") {
        q += &format!(
            "CREATE OR REPLACE FUNCTION workerbus_post(p_channel text, p_payload text, p_origin text DEFAULT '') \
             RETURNS bigint LANGUAGE plpgsql AS $wb$ DECLARE new_id bigint; new_xid xid8; BEGIN \
             INSERT INTO {OUTBOX} (channel, payload, origin) VALUES (p_channel, p_payload, p_origin) \
             RETURNING id, xid INTO new_id, new_xid; \
             PERFORM pg_notify(p_channel, 'wbd ' || new_id || ' ' || new_xid || ' ' || p_origin || chr(10) || p_payload); \
             RETURN new_id; END $wb$; "
        );
    }
    q + "COMMIT;"
}

#[cfg(test)]
mod tests {
    //! The session against scripted server replies: every case of
    //! docs/postgres.md's "Durable mode" and the connection's faults.
    use super::*;
    use crate::shm::lock::NoLock;
    use core::sync::atomic::Ordering::Relaxed;

    struct TestNode {
        bus: &'static PgBus,
        got: Vec<String>,
        events: Vec<(u32, String)>,
        logs: Vec<String>,
    }

    impl Node for TestNode {
        type Lock = NoLock;
        fn bus(&self) -> &PgBus {
            self.bus
        }
        fn lock(&self) -> NoLock {
            NoLock
        }
        fn deliver(&mut self, d: Delivery<'_>) -> Result<(), String> {
            match d {
                Delivery::Bus { channel, payload, .. } => {
                    self.got.push(format!("{}:{}", String::from_utf8_lossy(channel), String::from_utf8_lossy(payload)))
                }
                Delivery::Event { flags, data, .. } => self.events.push((flags, String::from_utf8_lossy(data).into())),
            }
            Ok(())
        }
        fn log(&mut self, _level: Level, msg: &str) {
            self.logs.push(msg.to_string());
        }
        fn wall_ms(&self) -> u64 {
            1
        }
    }

    fn node() -> TestNode {
        let len = PgBus::region_size(64 << 10);
        let mem: &'static mut [u64] = vec![0u64; len / 8 + 1].leak();
        // SAFETY: a zeroed, aligned region of len bytes, leaked for the test's life.
        let bus = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
        TestNode { bus, got: Vec::new(), events: Vec::new(), logs: Vec::new() }
    }

    fn conf(opts: &[&str]) -> &'static PgConfig {
        let plain = !opts.iter().any(|o| o.starts_with("sslmode="));
        let mut args =
            vec![if plain { "postgresql://u@127.0.0.1/db?sslmode=disable" } else { "postgresql://u@127.0.0.1/db" }];
        args.extend_from_slice(opts);
        Box::leak(Box::new(super::super::config::parse(&args, |_| Ok("0123456789abcdef0123".into())).unwrap()))
    }

    // ---- backend messages, framed by hand ----
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }
    fn cstr(s: &[u8]) -> Vec<u8> {
        let mut v = s.to_vec();
        v.push(0);
        v
    }
    fn ready() -> Vec<u8> {
        msg(b'Z', b"I")
    }
    fn auth_ok() -> Vec<u8> {
        let mut v = msg(b'R', &0i32.to_be_bytes());
        v.extend(ready());
        v
    }
    fn complete() -> Vec<u8> {
        msg(b'C', &cstr(b"SELECT 1"))
    }
    fn row(fields: &[&[u8]]) -> Vec<u8> {
        let mut b = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            b.extend_from_slice(&(f.len() as i32).to_be_bytes());
            b.extend_from_slice(f);
        }
        msg(b'D', &b)
    }
    fn error(code: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (t, v) in [(b'S', "ERROR"), (b'C', code), (b'M', "refused")] {
            b.push(t);
            b.extend(cstr(v.as_bytes()));
        }
        b.push(0);
        msg(b'E', &b)
    }
    fn notify(channel: &str, payload: &[u8]) -> Vec<u8> {
        let mut b = 42i32.to_be_bytes().to_vec();
        b.extend(cstr(channel.as_bytes()));
        b.extend(cstr(payload));
        msg(b'A', &b)
    }
    fn durable(id: u64, xid: u64, payload: &str) -> Vec<u8> {
        format!("wbd {id} {xid} o\n{payload}").into_bytes()
    }

    struct T {
        s: Session,
        n: TestNode,
        now: u64,
    }

    impl T {
        fn new(opts: &[&str]) -> T {
            let n = node();
            n.bus.want_channel(&NoLock, b"c", 0).unwrap();
            T { s: Session::new(conf(opts), "me".into(), 7), n, now: 1000 }
        }
        fn sent(&mut self) -> String {
            let b = self.s.transmit().split();
            String::from_utf8_lossy(&b).into_owned()
        }
        fn reply(&mut self, parts: &[Vec<u8>]) {
            let all: Vec<u8> = parts.concat();
            self.s.received(&all, self.now, &mut self.n);
        }
        fn poll(&mut self) {
            self.s.poll(self.now, &mut self.n);
        }
        /// Connects and logs in; the first request is then in `sent()`.
        fn login(&mut self) {
            while self.s.take_action() == Some(Action::Close) {}
            self.poll();
            assert_eq!(self.s.take_action(), Some(Action::Connect));
            self.s.connected(self.now);
            assert!(self.sent().contains("user\0u\0database\0db"));
            self.reply(&[auth_ok()]);
            assert!(self.s.is_ready());
        }
        /// Durable: objects exist and are granted; LISTEN; snapshot; replay page.
        fn durable_start(&mut self, xmin: u64, xmax: u64, rows: &[Vec<u8>]) {
            self.durable_start_xip(xmin, xmax, "", rows)
        }
        fn durable_start_xip(&mut self, xmin: u64, xmax: u64, xip: &str, rows: &[Vec<u8>]) {
            self.login();
            assert!(self.sent().contains("to_regclass"));
            let t: &[u8] = b"t";
            self.reply(&[row(&[t, t, t, t, t, t, t, t, b"u"]), complete(), ready()]);
            assert!(self.sent().contains("LISTEN \"c\""));
            self.reply(&[complete(), ready()]);
            assert!(self.sent().contains("pg_current_snapshot"));
            let (a, b) = (xmin.to_string(), xmax.to_string());
            self.reply(&[row(&[a.as_bytes(), b.as_bytes(), xip.as_bytes()]), complete(), ready()]);
            assert!(self.sent().contains("FROM workerbus_outbox"));
            let mut r = rows.to_vec();
            r.push(complete());
            r.push(ready());
            self.reply(&r);
            // The first expiry of old rows comes next.
            if self.sent().contains("DELETE FROM workerbus_outbox") {
                self.reply(&[complete(), ready()]);
            }
        }
    }

    fn outbox_row(id: u64, xid: u64, ch: &str, payload: &str) -> Vec<u8> {
        row(&[id.to_string().as_bytes(), xid.to_string().as_bytes(), ch.as_bytes(), payload.as_bytes(), b"o"])
    }

    #[test]
    fn first_replay_records_history_without_delivering_it() {
        let mut t = T::new(&["durable=on"]);
        t.durable_start(100, 100, &[outbox_row(1, 99, "c", "history")]);
        assert!(t.n.got.is_empty());
        assert!(t.n.bus.synced());
        t.reply(&[notify("c", &durable(1, 99, "history")), notify("c", &durable(2, 101, "new"))]);
        assert_eq!(t.n.got, ["c:new"]);
    }

    #[test]
    fn a_forged_notification_blinds_nothing() {
        let mut t = T::new(&["durable=on"]);
        t.durable_start(100, 100, &[]);
        // The header of the report: delivered as a plain payload, moves nothing.
        t.reply(&[notify("c", b"wbd 1000000000000 x\nforged")]);
        // Forged with the real header, a huge xid and the next real id.
        t.reply(&[notify("c", &durable(3, 1 << 50, "forged2"))]);
        t.reply(&[notify("c", &durable(3, 102, "real3")), notify("c", &durable(4, 103, "real4"))]);
        assert_eq!(t.n.got, ["c:wbd 1000000000000 x\nforged", "c:forged2", "c:real3", "c:real4"]);
        // The next horizon move forgets the forged xid and counts it.
        t.n.bus.begin_snapshot(&NoLock);
        let e = t.n.bus.begin_snapshot(&NoLock);
        assert_eq!(t.n.bus.advance(&NoLock, &Horizon { lo: 104, hi: 110, xip: vec![] }, e), 1);
    }

    #[test]
    fn a_late_commit_is_delivered_live_and_in_a_replay() {
        let mut t = T::new(&["durable=on"]);
        // Transaction 100 is open (xmin 100) while 5000 later ones commit;
        // the node moves its horizon as they come (100 still in progress).
        t.durable_start_xip(100, 101, "100", &[]);
        for i in 0..5000u64 {
            t.reply(&[notify("c", &durable(10 + i, 101 + i, "later"))]);
            let sql = t.sent();
            if sql.contains("pg_current_snapshot") {
                let hi = (102 + i).to_string();
                t.reply(&[row(&[b"100", hi.as_bytes(), b"100"]), complete(), ready()]);
                assert!(t.sent().contains("FROM workerbus_outbox"));
                t.reply(&[complete(), ready()]);
            }
        }
        assert!(t.n.bus.durable_figures().2 < 1100, "{:?}", t.n.bus.durable_figures());
        assert_eq!(t.n.bus.counters.track_overflow.load(Relaxed), 0);
        t.reply(&[notify("c", &durable(9, 100, "late"))]);
        assert_eq!(t.n.got.len(), 5001);
        assert_eq!(t.n.got.last().map(String::as_str), Some("c:late"));
        // After a reconnect the late row is not delivered again, while a row
        // committed during the outage is.
        t.s.failed(Error::Closed, t.now, &mut t.n);
        t.now += 10_000;
        t.durable_start(101, 6000, &[outbox_row(9, 100, "c", "late"), outbox_row(5500, 5999, "c", "missed")]);
        assert_eq!(t.n.got.len(), 5002);
        assert_eq!(t.n.got.last().map(String::as_str), Some("c:missed"));
        assert_eq!(t.n.bus.counters.replayed.load(Relaxed), 1);
    }

    #[test]
    fn a_burst_beyond_the_record_is_delivered_once_through_a_replay() {
        let mut t = T::new(&["durable=on"]);
        t.durable_start_xip(100, 101, "100", &[]);
        // One transaction (xid 101) commits 3000 rows while 100 stays open.
        let burst: Vec<Vec<u8>> = (1..=3000u64).map(|i| notify("c", &durable(i, 101, "b"))).collect();
        t.reply(&burst);
        let live = t.n.got.len();
        assert!(live < 3000, "the record is full before the burst ends");
        assert!(t.sent().contains("pg_current_snapshot"), "a replay takes the rest");
        t.reply(&[row(&[b"100", b"102", b"100"]), complete(), ready()]);
        let sql = t.sent();
        let rest: Vec<Vec<u8>> = (1..=3000u64)
            .filter(|i| !sql.contains(&format!(",{i},")) && !sql.contains(&format!("{{{i},")))
            .map(|i| outbox_row(i, 101, "c", "b"))
            .collect();
        let mut page = rest.clone();
        page.truncate(REPLAY_PAGE);
        page.push(complete());
        page.push(ready());
        t.reply(&page);
        if rest.len() > REPLAY_PAGE {
            let _ = t.sent();
            let mut page2 = rest[REPLAY_PAGE..].to_vec();
            page2.push(complete());
            page2.push(ready());
            t.reply(&page2);
        }
        assert_eq!(t.n.got.len(), 3000, "live {live}, replayed {}", t.n.bus.counters.replayed.load(Relaxed));
        // Covered now: the same rows again are duplicates.
        t.reply(&[notify("c", &durable(5, 101, "b"))]);
        assert_eq!(t.n.got.len(), 3000);
    }

    #[test]
    fn a_notification_during_listen_or_replay_does_not_skip_rows() {
        let mut t = T::new(&["durable=on"]);
        t.durable_start(10, 11, &[]);
        t.s.failed(Error::Closed, t.now, &mut t.n);
        t.now += 10_000;
        t.login();
        let tt: &[u8] = b"t";
        let _ = t.sent();
        t.reply(&[row(&[tt, tt, tt, tt, tt, tt, tt, tt, b"u"]), complete(), ready()]);
        let _ = t.sent();
        // A post arrives with the LISTEN reply (id 7000) and another in the middle of the replay.
        t.reply(&[complete(), notify("c", &durable(7000, 9000, "live")), ready()]);
        let _ = t.sent();
        t.reply(&[row(&[b"20", b"9001"]), complete(), ready()]);
        let sql = t.sent();
        assert!(sql.contains("{7000}"), "the replay skips what was delivered: {sql:?}");
        let mut page: Vec<Vec<u8>> =
            (0..REPLAY_PAGE as u64).map(|i| outbox_row(100 + i, 12 + i, "c", "missed")).collect();
        page.push(notify("c", &durable(7001, 9002, "live2")));
        page.push(complete());
        page.push(ready());
        t.reply(&page);
        // A full page: the next one starts after its last row.
        let sql = t.sent();
        assert!(sql.contains(&format!("{}", 12 + REPLAY_PAGE as u64 - 1)), "{sql:?}");
        t.reply(&[outbox_row(7000, 9000, "c", "live"), outbox_row(6000, 8999, "c", "missed"), complete(), ready()]);
        let missed = t.n.got.iter().filter(|g| *g == "c:missed").count();
        assert_eq!(missed, REPLAY_PAGE + 1);
        assert_eq!(t.n.got.iter().filter(|g| g.starts_with("c:live")).count(), 2);
        assert_eq!(t.n.bus.durable_figures().0, 20);
        assert_eq!(t.n.bus.durable_figures().1, 9001);
    }

    #[test]
    fn ids_going_backwards_rebase_the_node() {
        let mut t = T::new(&["durable=on"]);
        t.durable_start(1000, 1001, &[]);
        t.s.failed(Error::Closed, t.now, &mut t.n);
        t.now += 10_000;
        // Another server: its next xid is below our horizon.
        t.durable_start(5, 6, &[outbox_row(1, 5, "c", "after restore")]);
        assert_eq!(t.n.bus.counters.rebases.load(Relaxed), 1);
        assert_eq!(t.n.got, ["c:after restore"]);
        assert!(t.n.logs.iter().any(|l| l.contains("went backwards")));
    }

    fn queue(t: &T, payloads: &[&str]) {
        for p in payloads {
            t.n.bus.push(&NoLock, b"c", p.as_bytes()).unwrap();
        }
    }

    #[test]
    fn a_refused_post_fails_alone() {
        for opts in [&[][..], &["durable=on"][..]] {
            let mut t = T::new(opts);
            if opts.is_empty() {
                t.login();
                let _ = t.sent();
                t.reply(&[complete(), ready()]); // LISTEN
            } else {
                t.durable_start(10, 11, &[]);
            }
            queue(&t, &["ok1", "bad", "ok2"]);
            t.poll();
            let sql = t.sent();
            assert_eq!(sql.matches("ok").count(), 2, "all three in one transaction: {sql:?}");
            // ok1 ran, bad was refused: the transaction rolled back.
            t.reply(&[
                msg(b'1', b""),
                msg(b'2', b""),
                row(&[b""]),
                complete(),
                msg(b'2', b""),
                error("22P05"),
                ready(),
            ]);
            assert_eq!(t.n.bus.counters.posts_refused.load(Relaxed), 1);
            assert!(t.n.logs.iter().any(|l| l.contains("post on \"c\"") && l.contains("22P05")), "{:?}", t.n.logs);
            let sql = t.sent();
            assert!(sql.contains("ok1") && !sql.contains("bad") && !sql.contains("ok2"), "{sql:?}");
            t.reply(&[msg(b'1', b""), msg(b'2', b""), row(&[b""]), complete(), ready()]);
            let sql = t.sent();
            assert!(sql.contains("ok2") && !sql.contains("bad"), "{sql:?}");
            t.reply(&[msg(b'1', b""), msg(b'2', b""), row(&[b""]), complete(), ready()]);
            assert_eq!(t.n.bus.queue_len(), 0);
            assert!(t.s.is_ready());
            assert_eq!(t.n.bus.counters.notifications_out.load(Relaxed), 2);
        }
    }

    #[test]
    fn a_session_error_keeps_the_queue_and_backs_off() {
        let mut t = T::new(&[]);
        t.login();
        let _ = t.sent();
        t.reply(&[complete(), ready()]);
        queue(&t, &["p"]);
        t.poll();
        let _ = t.sent();
        t.reply(&[error("42501"), ready()]);
        assert!(!t.s.is_ready());
        assert_eq!(t.n.bus.queue_len(), 1);
        assert_eq!(t.s.take_action(), Some(Action::Close));
    }

    #[test]
    fn backoff_grows_until_a_session_worked() {
        let mut t = T::new(&["durable=on", "backoff_min=100ms", "backoff_max=10s"]);
        let mut delays = Vec::new();
        for _ in 0..5 {
            t.login();
            let _ = t.sent();
            // Logged in, then the setup is refused (no privilege).
            t.reply(&[error("42501"), ready()]);
            delays.push(t.s.retry_at - t.now);
            t.now = t.s.retry_at;
            while t.s.take_action().is_some() {}
        }
        assert_eq!(t.n.bus.counters.connect_failures.load(Relaxed), 5);
        assert!(delays[4] >= 800, "{delays:?}");
    }

    #[test]
    fn missing_grants_are_named() {
        let mut t = T::new(&["durable=on"]);
        t.login();
        let _ = t.sent();
        let (y, n): (&[u8], &[u8]) = (b"t", b"f");
        t.reply(&[row(&[y, y, y, y, n, y, y, y, b"wb_bridge"]), complete(), ready()]);
        assert!(
            t.n.logs.iter().any(|l| l.contains("role \"wb_bridge\" lacks INSERT on table workerbus_outbox")),
            "{:?}",
            t.n.logs
        );
    }

    #[test]
    fn objects_are_created_only_when_missing() {
        let mut t = T::new(&["durable=on"]);
        t.login();
        let _ = t.sent();
        let (y, n): (&[u8], &[u8]) = (b"t", b"f");
        t.reply(&[row(&[y, n, y, y, y, y, y, y, b"u"]), complete(), ready()]);
        let sql = t.sent();
        assert!(sql.contains("CREATE OR REPLACE FUNCTION workerbus_post") && !sql.contains("CREATE TABLE"), "{sql}");
    }

    #[test]
    fn cluster_events_accept_only_what_nodes_send() {
        let mut t = T::new(&[]);
        t.login();
        let _ = t.sent();
        t.reply(&[
            notify("workerbus_events", b"3 3 2\nsrcevdata"),
            notify("workerbus_events", b"4294967295 3 2\nsrcevdata"),
            notify("workerbus_events", b"junk"),
            notify("workerbus_events", b"1 3 2\nsrcev{}"),
        ]);
        assert_eq!(t.n.events, [(1, "{}".to_string())]);
        assert_eq!(t.n.bus.counters.rejected.load(Relaxed), 3);
        assert_eq!(t.n.logs.iter().filter(|l| l.contains("reserved channel")).count(), 1, "rate-limited");
    }

    #[test]
    fn signed_cluster_events() {
        let mut t = T::new(&["secret_file=/s"]);
        t.login();
        let _ = t.sent();
        t.reply(&[complete(), ready()]);
        let key = b"0123456789abcdef0123";
        let good = wire::sign_event(key, b"workerbus_events", "n1", 3, b"0 1 1\nse");
        let bad = wire::sign_event(b"another secret 0123", b"workerbus_events", "n1", 3, b"0 1 1\nse");
        let wrap = |b: &[u8]| {
            let mut v = b"wbn 3 n1\n".to_vec();
            v.extend_from_slice(b);
            v
        };
        t.reply(&[
            notify("workerbus_events", &wrap(&good)),
            notify("workerbus_events", &wrap(&bad)),
            notify("workerbus_events", &wrap(b"0 1 1\nse")),
        ]);
        assert_eq!(t.n.events, [(0, String::new())]);
        assert_eq!(t.n.bus.counters.rejected.load(Relaxed), 2);
        // And what this node sends is signed.
        t.n.bus.push(&NoLock, b"workerbus_events", b"0 1 1\nse").unwrap();
        t.poll();
        let sql = t.sent();
        assert!(sql.contains("\ns ") || sql.contains("\ns"), "{sql:?}");
        let sig = wire::sign_event(key, b"workerbus_events", "me", 1, b"0 1 1\nse");
        assert!(sql.contains(&String::from_utf8_lossy(&sig).into_owned()), "{sql:?}");
    }

    #[test]
    fn a_silent_peer_is_found_by_the_probe() {
        let mut t = T::new(&["keepalive=1s", "request_timeout=2s"]);
        t.login();
        let _ = t.sent();
        t.reply(&[complete(), ready()]);
        t.now += 999;
        t.poll();
        assert_eq!(t.sent(), "");
        t.now += 1;
        t.poll();
        assert_eq!(t.sent(), "Q\0\0\0\u{5}\0", "an empty query");
        assert_eq!(t.s.wakeup_at(), Some(t.now + 2000));
        // Answered: its round trip is kept.
        t.now += 3;
        t.reply(&[msg(b'I', b""), ready()]);
        assert_eq!(t.n.bus.counters.probe_us.load(Relaxed), 3000);
        // Not answered: the session ends after request_timeout.
        t.now += 1000;
        t.poll();
        assert!(!t.sent().is_empty());
        t.now += 2000;
        t.poll();
        assert!(!t.s.is_ready());
        assert_eq!(t.n.bus.counters.probes.load(Relaxed), 2);
        assert_eq!(t.n.bus.counters.probe_failures.load(Relaxed), 1);
        assert!(
            t.n.logs.last().is_some_and(|l| l.contains("keepalive probe's request_timeout (2000ms)")),
            "{:?}",
            t.n.logs
        );
        assert_eq!(t.s.take_action(), Some(Action::Close));
    }

    fn fatal() -> Vec<u8> {
        let mut b = Vec::new();
        for (t, v) in [(b'S', "FATAL"), (b'C', "28000"), (b'M', "no pg_hba.conf entry")] {
            b.push(t);
            b.extend(cstr(v.as_bytes()));
        }
        b.push(0);
        msg(b'E', &b)
    }

    #[test]
    fn sslmode_allow_and_prefer_try_the_other_way_once() {
        // allow: plain first; refused, at once with TLS; refused again: backoff.
        let mut t = T::new(&["sslmode=allow"]);
        t.poll();
        assert_eq!(t.s.take_action(), Some(Action::Connect));
        t.s.connected(t.now);
        assert!(t.sent().contains("user\0u"), "plain start-up first");
        t.reply(&[fatal()]);
        assert_eq!(t.s.take_action(), Some(Action::Close));
        assert_eq!(t.s.wakeup_at(), Some(t.now), "at once");
        t.poll();
        assert_eq!(t.s.take_action(), Some(Action::Connect));
        t.s.connected(t.now);
        assert_eq!(&t.s.transmit().split()[..], &[0, 0, 0, 8, 4, 210, 22, 47], "an SSLRequest");
        t.reply(&[b"S".to_vec()]);
        assert_eq!(t.s.take_action(), Some(Action::StartTls));
        t.s.tls_ready(t.now);
        assert!(t.sent().contains("user\0u"));
        t.reply(&[fatal()]);
        assert_eq!(t.s.take_action(), Some(Action::Close));
        assert!(t.s.wakeup_at().unwrap() > t.now, "then the backoff");
        // prefer: TLS first, then plain.
        let mut t = T::new(&["sslmode=prefer"]);
        t.poll();
        let _ = t.s.take_action();
        t.s.connected(t.now);
        assert_eq!(t.s.transmit().split().len(), 8, "an SSLRequest first");
        t.reply(&[b"S".to_vec()]);
        let _ = t.s.take_action();
        t.s.tls_ready(t.now);
        let _ = t.sent();
        t.reply(&[fatal()]);
        let _ = t.s.take_action();
        t.poll();
        let _ = t.s.take_action();
        t.s.connected(t.now);
        assert!(t.sent().contains("user\0u"), "plain the second time");
        // require: never plain.
        let mut t = T::new(&["sslmode=require"]);
        t.poll();
        let _ = t.s.take_action();
        t.s.connected(t.now);
        let _ = t.sent();
        t.reply(&[b"N".to_vec()]);
        assert!(t.n.logs.last().is_some_and(|l| l.contains("does not accept TLS but sslmode is require")));
    }

    #[test]
    fn a_mute_server_hits_connect_timeout() {
        let mut t = T::new(&["connect_timeout=300ms"]);
        t.poll();
        assert_eq!(t.s.take_action(), Some(Action::Connect));
        t.s.connected(t.now);
        t.now += 300;
        t.poll();
        assert!(t.n.logs.last().is_some_and(|l| l.contains("connect_timeout (300ms)")), "{:?}", t.n.logs);
    }
}
