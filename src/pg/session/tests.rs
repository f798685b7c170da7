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
    let mut page: Vec<Vec<u8>> = (0..REPLAY_PAGE as u64).map(|i| outbox_row(100 + i, 12 + i, "c", "missed")).collect();
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
        t.reply(&[msg(b'1', b""), msg(b'2', b""), row(&[b""]), complete(), msg(b'2', b""), error("22P05"), ready()]);
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
