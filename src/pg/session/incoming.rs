//! Incoming notifications: decoded, checked (durable record, cluster
//! events' flags and signatures) and routed to the node's ring.

use super::*;

impl Session {
    pub(super) fn log_rejected<N: Node>(&mut self, now: u64, node: &mut N, what: &str) {
        // At most one line per 10 s; the count is in the status.
        if self.rejected_logged_at == 0 || now >= self.rejected_logged_at + 10_000 {
            self.rejected_logged_at = now;
            node.log(Level::Warn, &format!("postgres: {what} (further ones counted in \"rejected\")"));
        }
    }

    /// A live notification.
    pub(super) fn notification<N: Node>(&mut self, channel: &[u8], msg: &[u8], now: u64, node: &mut N) {
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

    pub(super) fn route_checked<N: Node>(
        &mut self,
        channel: &[u8],
        origin: &[u8],
        payload: &[u8],
        now: u64,
        node: &mut N,
    ) {
        use core::sync::atomic::Ordering::Relaxed;
        let Some(ch) = channel.strip_prefix(self.conf.prefix.as_bytes()) else { return };
        if ch == wire::EVENTS_CHANNEL.as_bytes() {
            let body = match self.conf.secret.as_deref() {
                Some(key) => wire::verify_event(key, channel, origin, payload),
                None => Ok(payload),
            };
            let why = match body.map(wire::decode_event) {
                Ok(Some(e)) if wire::event_flags_ok(e.flags) => None,
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
    pub(super) fn route<N: Node>(
        &mut self,
        channel: &[u8],
        origin: &[u8],
        payload: &[u8],
        checked: bool,
        node: &mut N,
    ) -> bool {
        use core::sync::atomic::Ordering::Relaxed;
        let Some(ch) = channel.strip_prefix(self.conf.prefix.as_bytes()) else { return false };
        let res = if ch == wire::EVENTS_CHANNEL.as_bytes() {
            let body = match (checked, self.conf.secret.as_deref()) {
                (true, Some(_)) => wire::strip_signature(payload),
                (false, Some(key)) => wire::verify_event(key, channel, origin, payload).ok(),
                (_, None) => Some(payload),
            };
            match body.and_then(wire::decode_event).filter(|e| wire::event_flags_ok(e.flags)) {
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
