//! Outgoing posts: one transaction per flush, and the extended-protocol
//! messages both flushes and replay pages are made of.

use super::*;

impl Session {
    /// Everything queued (up to a bound) as one transaction: Parse once,
    /// Bind+Execute per post, one Sync (an implicit transaction). A post
    /// the server refused before is dropped first.
    pub(super) fn flush<N: Node>(&mut self, now: u64, node: &mut N) {
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
}

pub(super) fn bytes_of(p: &crate::shm::pgbus::Queued) -> u64 {
    crate::shm::pgbus::PgBus::record_bytes(p.channel.len(), p.payload.len())
}

pub(super) fn bind_execute(out: &mut BytesMut, values: &[Vec<u8>]) {
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
pub(super) fn extended(out: &mut BytesMut, sql: &str, params: &[String]) {
    let _ = frontend::parse("", sql, core::iter::repeat_n(0u32, params.len()), out);
    let values: Vec<Vec<u8>> = params.iter().map(|p| p.as_bytes().to_vec()).collect();
    bind_execute(out, &values);
    frontend::sync(out);
}
