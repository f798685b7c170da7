//! The status document in Prometheus's text exposition format (0.0.4).
//!
//! The metrics are read from the very JSON value the status location serves
//! (one snapshot), so the two never disagree. A metric is one line of the
//! `SECTIONS` table: where its rows are in the document (a path of arrays,
//! each step adding labels), which field it reads, its name, type and help.
//! A new part of the status (sync, PostgreSQL, ...) becomes metrics by
//! adding a `Section` with its rows and fields; nothing else changes.
//!
//! Names follow Prometheus's conventions: `workerbus_` prefix, base units
//! (bytes, seconds), counters end in `_total`. Labels are only `zone`,
//! `slot`, `pid` and `generation`, all bounded (zones are configured, the
//! worker and generation history tables have fixed sizes): never a sequence
//! number or an event name.

use core::fmt::Write;

use serde_json::Value;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// How a sample's value is read from its row.
#[derive(Clone, Copy)]
pub enum Get {
    /// A number (or boolean) at this JSON pointer.
    Num(&'static str),
    /// A string at this pointer, mapped to a number (first match).
    Map(&'static str, &'static [(&'static str, f64)]),
    /// The length of the array at this pointer.
    Len(&'static str),
}

pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub get: Get,
}

/// One array of the document to walk into, and the labels each of its
/// elements adds: (label name, JSON pointer inside the element).
pub struct Step {
    pub array: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
}

/// Metrics that share their rows. `path` empty: one row, the document itself.
pub struct Section {
    pub path: &'static [Step],
    pub metrics: &'static [Metric],
}

const fn counter(name: &'static str, help: &'static str, field: &'static str) -> Metric {
    Metric { name, kind: Kind::Counter, help, get: Get::Num(field) }
}

const fn gauge(name: &'static str, help: &'static str, field: &'static str) -> Metric {
    Metric { name, kind: Kind::Gauge, help, get: Get::Num(field) }
}

/// Worker states as numbers (a state label would be a fifth label name).
pub const WORKER_STATES: &[(&str, f64)] =
    &[("running", 0.0), ("hung", 1.0), ("exited", 2.0), ("crashed", 3.0), ("starting", 4.0)];

const ZONE: Step = Step { array: "/zones", labels: &[("zone", "/name")] };
const WORKER_LABELS: &[(&str, &str)] = &[("slot", "/slot"), ("pid", "/pid"), ("generation", "/generation")];

/// Every metric, grouped by where its rows are.
pub const SECTIONS: &[Section] = &[
    Section {
        path: &[],
        metrics: &[
            gauge(
                "workerbus_generation",
                "Newest configuration load (generation) of this node.",
                "/current_generation",
            ),
            gauge(
                "workerbus_node_start_time_seconds",
                "When the node's master made the zone, unix seconds.",
                "/node/started",
            ),
            gauge("workerbus_master_pid", "Process id of the node's master.", "/node/master_pid"),
            counter(
                "workerbus_worker_crashes_total",
                "Worker processes found gone without exiting through nginx.",
                "/crashes_seen",
            ),
            counter(
                "workerbus_worker_hangs_total",
                "Times a live worker's heartbeat was found overdue (hung).",
                "/hangs_seen",
            ),
        ],
    },
    Section {
        path: &[Step { array: "/generations", labels: &[("generation", "/generation")] }],
        metrics: &[
            gauge(
                "workerbus_generation_live_workers",
                "Live (running or hung) workers of a generation.",
                "/live_workers",
            ),
            gauge(
                "workerbus_generation_worker_processes",
                "Workers configured for a generation (worker_processes).",
                "/worker_processes",
            ),
            gauge("workerbus_generation_start_time_seconds", "When a generation was loaded, unix seconds.", "/started"),
        ],
    },
    Section {
        path: &[Step { array: "/workers", labels: WORKER_LABELS }],
        metrics: &[
            Metric {
                name: "workerbus_worker_state",
                kind: Kind::Gauge,
                help: "Worker state: 0 running, 1 hung, 2 exited, 3 crashed, 4 starting.",
                get: Get::Map("/state", WORKER_STATES),
            },
            gauge(
                "workerbus_worker_heartbeat_age_seconds",
                "Time since the worker's last heartbeat.",
                "/heartbeat_age",
            ),
            gauge("workerbus_worker_start_time_seconds", "When the worker started, unix seconds.", "/started"),
        ],
    },
    Section {
        path: &[ZONE],
        metrics: &[
            gauge("workerbus_zone_size_bytes", "Size of the shared zone.", "/size"),
            gauge("workerbus_zone_used_bytes", "Bytes of the zone allocated.", "/used"),
            gauge("workerbus_zone_free_bytes", "Bytes of the zone free.", "/free"),
            gauge("workerbus_ring_capacity_bytes", "Capacity of the zone's event ring.", "/events/capacity"),
            gauge("workerbus_ring_used_bytes", "Bytes of the event ring holding events.", "/events/used"),
            gauge("workerbus_ring_max_event_bytes", "Largest event the ring accepts.", "/events/max_payload"),
            gauge("workerbus_ring_head_sequence", "Sequence number the next event will get.", "/events/head_seq"),
            counter("workerbus_ring_posted_total", "Events posted to the ring.", "/events/posted"),
            counter(
                "workerbus_ring_overwritten_total",
                "Events the ring reclaimed to make room (a lagging worker may miss them).",
                "/events/overwritten",
            ),
            counter(
                "workerbus_ring_refused_total",
                "Posts refused because the ring was full and a worker had not read (overflow=refuse).",
                "/events/refused",
            ),
            counter(
                "workerbus_ring_rejected_total",
                "Posts rejected as invalid (too large, field too long).",
                "/events/rejected",
            ),
            Metric {
                name: "workerbus_ring_overflow_mode",
                kind: Kind::Gauge,
                help: "What a post does when the ring is full: 0 refuse, 1 overwrite the oldest events.",
                get: Get::Map("/events/overflow", &[("refuse", 0.0), ("overwrite", 1.0)]),
            },
            counter("workerbus_ring_dropped_total", "Posts cut off by a writer that died mid-post.", "/events/dropped"),
            counter("workerbus_ring_wakeups_total", "Wake-ups sent to idle workers.", "/events/wakeups_sent"),
            Metric {
                name: "workerbus_ring_idle_workers",
                kind: Kind::Gauge,
                help: "Workers whose event poller sleeps.",
                get: Get::Len("/events/idle_slots"),
            },
            gauge(
                "workerbus_unique_claims_entries",
                "Slots of the unique-event claim table.",
                "/events/unique_claims/entries",
            ),
            gauge("workerbus_unique_claims_live", "Unique-event keys claimed now.", "/events/unique_claims/live"),
            counter(
                "workerbus_unique_claims_won_total",
                "Unique events claimed (handled).",
                "/events/unique_claims/won",
            ),
            counter(
                "workerbus_unique_claims_refused_total",
                "Unique events skipped: already claimed.",
                "/events/unique_claims/refused",
            ),
            counter(
                "workerbus_unique_claims_table_full_total",
                "Unique claims that failed: table full.",
                "/events/unique_claims/table_full",
            ),
        ],
    },
    // The PostgreSQL bridge (absent without workerbus_postgres).
    Section {
        path: &[],
        metrics: &[
            Metric {
                name: "workerbus_pg_connected",
                kind: Kind::Gauge,
                help: "1 while the node's PostgreSQL session is up.",
                get: Get::Map(
                    "/postgres/state",
                    &[("connected", 1.0), ("connecting", 0.0), ("disconnected", 0.0), ("not connected", 0.0)],
                ),
            },
            counter(
                "workerbus_pg_notifications_in_total",
                "Notifications delivered to this node's ring.",
                "/postgres/notifications_in",
            ),
            counter(
                "workerbus_pg_notifications_out_total",
                "Posts committed to PostgreSQL.",
                "/postgres/notifications_out",
            ),
            gauge("workerbus_pg_queue_posts", "Posts waiting to be sent.", "/postgres/queue_depth"),
            gauge("workerbus_pg_queue_bytes", "Bytes of the posts waiting to be sent.", "/postgres/queue_bytes"),
            counter(
                "workerbus_pg_queue_overflow_total",
                "Posts refused at the call: the queue was full.",
                "/postgres/queue_overflow",
            ),
            counter("workerbus_pg_connects_total", "Sessions established.", "/postgres/connects"),
            counter("workerbus_pg_reconnects_total", "Sessions established after the first.", "/postgres/reconnects"),
            counter(
                "workerbus_pg_connect_failures_total",
                "Connection attempts that failed.",
                "/postgres/connect_failures",
            ),
            counter(
                "workerbus_pg_takeovers_total",
                "Times another worker took the connection over.",
                "/postgres/takeovers",
            ),
            counter(
                "workerbus_pg_undeliverable_total",
                "Notifications or posts dropped (each logged).",
                "/postgres/undeliverable",
            ),
            counter(
                "workerbus_pg_posts_refused_total",
                "Posts the server refused, dropped alone.",
                "/postgres/posts_refused",
            ),
            counter(
                "workerbus_pg_rejected_total",
                "Notifications refused on the reserved channel (malformed, unknown flags, unsigned, badly signed).",
                "/postgres/rejected",
            ),
            counter("workerbus_pg_probes_total", "Keepalive probes sent on an idle connection.", "/postgres/probes"),
            counter(
                "workerbus_pg_probe_failures_total",
                "Keepalive probes not answered within request_timeout (the connection was replaced).",
                "/postgres/probe_failures",
            ),
            gauge("workerbus_pg_probe_seconds", "Round trip of the last keepalive probe.", "/postgres/probe_seconds"),
            counter(
                "workerbus_pg_request_timeouts_total",
                "Requests in flight that missed request_timeout.",
                "/postgres/request_timeouts",
            ),
            counter("workerbus_pg_replayed_total", "Durable rows delivered by a replay.", "/postgres/durable/replayed"),
            counter(
                "workerbus_pg_duplicates_skipped_total",
                "Durable rows skipped: already delivered.",
                "/postgres/durable/duplicates_skipped",
            ),
            counter(
                "workerbus_pg_rebases_total",
                "Times the server's transaction ids went backwards.",
                "/postgres/durable/rebases",
            ),
        ],
    },
    Section {
        path: &[ZONE, Step { array: "/events/workers", labels: WORKER_LABELS }],
        metrics: &[
            gauge("workerbus_worker_lag_events", "Events posted that the worker has not read yet.", "/lag"),
            gauge("workerbus_worker_cursor_sequence", "Sequence number the worker reads next.", "/cursor"),
            counter("workerbus_worker_delivered_total", "Events the worker read from the ring.", "/delivered"),
            counter("workerbus_worker_missed_total", "Events the worker lost because the ring lapped it.", "/missed"),
            counter("workerbus_worker_wakeups_total", "Wake-ups the worker received from posters.", "/wakeups"),
            gauge("workerbus_worker_idle", "1 while the worker's event poller sleeps.", "/idle"),
        ],
    },
];

/// One row: its labels, already rendered (`zone="a",pid="1"`), and its element.
struct Row<'a> {
    labels: String,
    value: &'a Value,
}

fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn label_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn rows<'a>(doc: &'a Value, path: &[Step]) -> Vec<Row<'a>> {
    let mut rows = vec![Row { labels: String::new(), value: doc }];
    for step in path {
        let mut next = vec![];
        for row in &rows {
            let Some(items) = row.value.pointer(step.array).and_then(Value::as_array) else { continue };
            for item in items {
                let mut labels = row.labels.clone();
                for (name, ptr) in step.labels {
                    let Some(v) = item.pointer(ptr).and_then(label_text) else { continue };
                    if !labels.is_empty() {
                        labels.push(',');
                    }
                    labels.push_str(name);
                    labels.push_str("=\"");
                    escape_label(&mut labels, &v);
                    labels.push('"');
                }
                next.push(Row { labels, value: item });
            }
        }
        rows = next;
    }
    rows
}

fn value(v: &Value, get: Get) -> Option<f64> {
    match get {
        Get::Num(p) => match v.pointer(p)? {
            Value::Number(n) => n.as_f64(),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            _ => None,
        },
        Get::Map(p, table) => {
            let s = v.pointer(p)?.as_str()?;
            table.iter().find(|(k, _)| *k == s).map(|(_, n)| *n)
        }
        Get::Len(p) => v.pointer(p)?.as_array().map(|a| a.len() as f64),
    }
}

fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v == v.trunc() && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// The text exposition of `doc` (a status document) for these sections.
/// A family with no sample (its part of the status is absent) is left out.
pub fn render_sections(doc: &Value, sections: &[Section]) -> String {
    let mut out = String::with_capacity(8192);
    for section in sections {
        let rows = rows(doc, section.path);
        for m in section.metrics {
            let mut header_done = false;
            for row in &rows {
                let Some(v) = value(row.value, m.get) else { continue };
                if !header_done {
                    let kind = if m.kind == Kind::Counter { "counter" } else { "gauge" };
                    let _ = write!(out, "# HELP {} {}\n# TYPE {} {kind}\n", m.name, m.help, m.name);
                    header_done = true;
                }
                out.push_str(m.name);
                if !row.labels.is_empty() {
                    out.push('{');
                    out.push_str(&row.labels);
                    out.push('}');
                }
                out.push(' ');
                push_value(&mut out, v);
                out.push('\n');
            }
        }
    }
    out
}

/// The module's metrics for a status document.
pub fn render(doc: &Value) -> String {
    render_sections(doc, SECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "current_generation": 2,
            "crashes_seen": 1,
            "hangs_seen": 0,
            "node": { "started": 1700000000.5, "master_pid": 10 },
            "generations": [{ "generation": 2, "live_workers": 2, "worker_processes": 2, "started": 1.0 }],
            "workers": [
                { "slot": 0, "pid": 11, "generation": 2, "state": "running", "heartbeat_age": 0.25, "started": 2.0 },
                { "slot": 1, "pid": 12, "generation": 2, "state": "crashed", "heartbeat_age": 9.0, "started": 2.0 },
            ],
            "zones": [
                { "name": "a\"b", "size": 1024, "used": 24, "free": 1000, "events": {
                    "posted": 5, "overflow": "overwrite", "idle_slots": [0, 3],
                    "workers": [{ "slot": 0, "pid": 11, "generation": 2, "lag": 3, "delivered": 2, "idle": true }]
                } },
                { "name": "plain", "size": 2048, "used": 48, "free": 2000 },
            ],
        })
    }

    #[test]
    fn families_have_help_type_and_samples_in_one_group() {
        let t = render(&doc());
        assert!(t.contains(
            "# HELP workerbus_ring_posted_total Events posted to the ring.\n\
             # TYPE workerbus_ring_posted_total counter\n\
             workerbus_ring_posted_total{zone=\"a\\\"b\"} 5\n"
        ));
        assert!(t.contains(
            "workerbus_zone_size_bytes{zone=\"a\\\"b\"} 1024\nworkerbus_zone_size_bytes{zone=\"plain\"} 2048\n"
        ));
        assert!(t.contains("workerbus_worker_lag_events{zone=\"a\\\"b\",slot=\"0\",pid=\"11\",generation=\"2\"} 3\n"));
        assert!(t.contains("workerbus_worker_state{slot=\"1\",pid=\"12\",generation=\"2\"} 3\n"));
        assert!(t.contains("workerbus_worker_heartbeat_age_seconds{slot=\"0\",pid=\"11\",generation=\"2\"} 0.25\n"));
        assert!(t.contains("workerbus_node_start_time_seconds 1700000000.5\n"));
        assert!(t.contains("workerbus_worker_crashes_total 1\n"));
        assert!(t.contains("workerbus_ring_overflow_mode{zone=\"a\\\"b\"} 1\n"));
        assert!(t.contains("workerbus_ring_idle_workers{zone=\"a\\\"b\"} 2\n"));
        assert!(t.contains("workerbus_worker_idle{zone=\"a\\\"b\",slot=\"0\",pid=\"11\",generation=\"2\"} 1\n"));
        // A family whose field is absent everywhere is left out entirely.
        assert!(!t.contains("workerbus_unique_claims_live"));
        // Every family's header appears once.
        assert_eq!(t.matches("# TYPE workerbus_zone_size_bytes ").count(), 1);
    }

    #[test]
    fn naming_rules_hold_for_every_metric() {
        let mut names = std::collections::HashSet::new();
        for s in SECTIONS {
            for step in s.path {
                for (l, _) in step.labels {
                    assert!(["zone", "slot", "pid", "generation"].contains(l), "label {l}");
                }
            }
            for m in s.metrics {
                assert!(m.name.starts_with("workerbus_"), "{}", m.name);
                assert_eq!(m.kind == Kind::Counter, m.name.ends_with("_total"), "{}", m.name);
                assert!(names.insert(m.name), "{} twice", m.name);
                assert!(m.help.ends_with('.') && !m.help.contains('\n'), "{}", m.name);
            }
        }
    }

    #[test]
    fn a_new_section_is_one_table_entry() {
        const EXTRA: &[Section] = &[Section {
            path: &[Step { array: "/sync/runners", labels: &[("zone", "/zone")] }],
            metrics: &[counter("workerbus_sync_fetches_total", "Fetches.", "/fetches")],
        }];
        let d = json!({ "sync": { "runners": [{ "zone": "z", "fetches": 7 }] } });
        assert_eq!(
            render_sections(&d, EXTRA),
            "# HELP workerbus_sync_fetches_total Fetches.\n# TYPE workerbus_sync_fetches_total counter\n\
             workerbus_sync_fetches_total{zone=\"z\"} 7\n"
        );
    }
}
