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
//!
//! Here: the types, the session's life (connect, fail and back off, poll
//! the timers, take bytes in). Beside it: `messages` (the server's
//! messages), `schedule` (the next request and its result), `posting`
//! (flushes), `durable` (outbox objects, replay pages, fingerprints),
//! `incoming` (notifications to the ring), `tests` (scripted servers).

use std::collections::VecDeque;

mod durable;
mod incoming;
mod messages;
mod posting;
mod schedule;
#[cfg(test)]
mod tests;

pub use durable::fingerprint;

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
}

fn num(row: &[Option<Vec<u8>>], i: usize) -> u64 {
    row.get(i)
        .and_then(|v| v.as_ref())
        .and_then(|v| core::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
