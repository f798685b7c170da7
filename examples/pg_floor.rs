//! The floor of the PostgreSQL path between nodes: a plain client that
//! LISTENs on its own connection and takes the time each notification
//! arrives, sent by a NOTIFY from another connection with the sending
//! pattern of bench/pg_run's bridge scenario: one post at a time, each its
//! own transaction sent the way the bridge flushes (Parse of `SELECT
//! pg_notify($1, $2)`, Bind, Execute, Sync), then a sleep of 1/rate s; the
//! payload is the send time (CLOCK_REALTIME us, as bench/pg_bench.lua
//! stamps it), the post's number and 48 bytes of padding. No nginx, no
//! ring, no wake-up between processes: the server's commit and its
//! delivery to a listening backend, and the kernel's wake-up of the
//! receiver blocked in read(2). bench/pg_run runs it in the same run as the
//! bridge and prints the bridge's latencies as ratios to it.
//!
//! Trust authentication only (as the bench's own baseline client).
//! Percentiles as bench/pg_bench.lua takes them: every sample, the value
//! at rank ceil(n * p).
//!
//! Usage: pg_floor HOST PORT USER DB CHANNEL COUNT RATE
//!   → `pg_floor p50_us=.. p99_us=.. n=..`

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::IsNull;
use postgres_protocol::escape::escape_identifier;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

fn realtime_us() -> u64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_micros() as u64
}

/// One connection: a socket and the bytes read but not yet parsed.
struct Conn {
    sock: TcpStream,
    inb: BytesMut,
}

impl Conn {
    fn open(host: &str, port: u16, user: &str, db: &str) -> Result<Conn, String> {
        let sock = TcpStream::connect((host, port)).map_err(|e| format!("connect {host}:{port}: {e}"))?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut c = Conn { sock, inb: BytesMut::new() };
        let mut out = BytesMut::new();
        let params = [("user", user), ("database", db), ("application_name", "pg_floor")];
        frontend::startup_message(params.iter().copied(), &mut out).map_err(|e| e.to_string())?;
        c.send(&out)?;
        loop {
            match c.next()? {
                Message::AuthenticationOk => {}
                Message::ReadyForQuery(_) => return Ok(c),
                Message::ErrorResponse(_) => return Err("the server refused the login".into()),
                Message::AuthenticationCleartextPassword
                | Message::AuthenticationMd5Password(_)
                | Message::AuthenticationSasl(_) => {
                    return Err("the server asks for a password: pg_floor supports trust logins only".into());
                }
                _ => {}
            }
        }
    }

    fn send(&mut self, b: &[u8]) -> Result<(), String> {
        self.sock.write_all(b).map_err(|e| format!("write: {e}"))
    }

    /// The next message, blocking until it is whole.
    fn next(&mut self) -> Result<Message, String> {
        loop {
            if let Some(m) = Message::parse(&mut self.inb).map_err(|e| format!("protocol: {e}"))? {
                return Ok(m);
            }
            let mut tmp = [0u8; 16384];
            let n = self.sock.read(&mut tmp).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            self.inb.extend_from_slice(&tmp[..n]);
        }
    }

    /// A simple query, up to its ReadyForQuery.
    fn query(&mut self, sql: &str) -> Result<(), String> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| e.to_string())?;
        self.send(&out)?;
        self.until_ready()
    }

    fn until_ready(&mut self) -> Result<(), String> {
        let mut failed = false;
        loop {
            match self.next()? {
                Message::ErrorResponse(_) => failed = true,
                Message::ReadyForQuery(_) if failed => return Err("the server refused the request".into()),
                Message::ReadyForQuery(_) => return Ok(()),
                _ => {}
            }
        }
    }
}

/// One post as the bridge flushes one: Parse, Bind, Execute, Sync.
fn notify(c: &mut Conn, channel: &str, payload: &str) -> Result<(), String> {
    let mut out = BytesMut::new();
    frontend::parse("", "SELECT pg_notify($1, $2)", [25u32, 25], &mut out).map_err(|e| e.to_string())?;
    let values = [channel.as_bytes(), payload.as_bytes()];
    frontend::bind(
        "",
        "",
        [0i16],
        values.iter(),
        |v, buf| {
            buf.extend_from_slice(v);
            Ok(IsNull::No)
        },
        [0i16],
        &mut out,
    )
    .map_err(|_| "bind".to_string())?;
    frontend::execute("", 0, &mut out).map_err(|e| e.to_string())?;
    frontend::sync(&mut out);
    c.send(&out)?;
    c.until_ready()
}

fn run() -> Result<(), String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 7 {
        return Err("usage: pg_floor HOST PORT USER DB CHANNEL COUNT RATE".into());
    }
    let (host, user, db, channel) = (a[0].clone(), a[2].clone(), a[3].clone(), a[4].clone());
    let port: u16 = a[1].parse().map_err(|_| "PORT must be a number")?;
    let count: usize = a[5].parse().map_err(|_| "COUNT must be a number")?;
    let rate: f64 = a[6].parse().map_err(|_| "RATE must be a number")?;

    let mut listener = Conn::open(&host, port, &user, &db)?;
    listener.query(&format!("LISTEN {}", escape_identifier(&channel)))?;
    // A lost notification ends the run with an error instead of a hang.
    listener.sock.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let receiver = std::thread::spawn(move || -> Result<Vec<u64>, String> {
        let mut lat = Vec::with_capacity(count);
        while lat.len() < count {
            if let Message::NotificationResponse(n) = listener.next()? {
                let now = realtime_us();
                let msg = n.message().map_err(|e| e.to_string())?;
                if let Some(sent) = msg.split(' ').next().and_then(|s| s.parse::<u64>().ok()) {
                    lat.push(now.saturating_sub(sent));
                }
            }
        }
        Ok(lat)
    });

    let mut sender = Conn::open(&host, port, &user, &db)?;
    let pad = "x".repeat(48);
    let gap = if rate > 0.0 { Duration::from_secs_f64(1.0 / rate) } else { Duration::ZERO };
    let started = Instant::now();
    for i in 1..=count {
        let payload = format!("{} {i} {pad}", realtime_us());
        notify(&mut sender, &channel, &payload)?;
        std::thread::sleep(gap);
        if started.elapsed() > Duration::from_secs(60 + count as u64) {
            return Err("the posts take too long".into());
        }
    }
    let mut lat = receiver.join().map_err(|_| "the receiver panicked")??;
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    println!("pg_floor p50_us={} p99_us={} n={}", pct(0.5), pct(0.99), lat.len());
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("pg_floor: {e}");
        std::process::exit(1);
    }
}
