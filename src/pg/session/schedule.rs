//! Choosing the next request, and taking in its result.

use super::durable::create_sql;
use super::*;

impl Session {
    /// Chooses the next request, if any.
    pub(super) fn schedule<N: Node>(&mut self, now: u64, node: &mut N) {
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

    pub(super) fn listen_changes<N: Node>(&mut self, now: u64, node: &mut N) -> Option<Op> {
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

    pub(super) fn finish<N: Node>(
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
}
