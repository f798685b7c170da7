//! Durable mode: the outbox objects, the replay's pages and rows, and
//! the fingerprint that tells a forged notification from the real row.

use super::posting::extended;
use super::*;

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

impl Session {
    /// One replay page: rows outside the horizon, after `last` in
    /// (xid, id) order, of the node's channels, not already delivered.
    pub(super) fn page<N: Node>(&mut self, r: &Replay, last: (u64, u64), node: &mut N, now: u64) {
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

    pub(super) fn replay_row<N: Node>(&mut self, row: &[Option<Vec<u8>>], node: &mut N) {
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
}

/// The DDL for what `Check` found missing, in one transaction under an
/// advisory lock (nodes that start together create it once).
pub(super) fn create_sql(missing: &[&str]) -> String {
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
