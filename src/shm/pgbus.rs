//! The PostgreSQL bridge's shared state, one per node (in the primary
//! zone): the lease that makes one worker the connection holder (the
//! lease of lease.rs, under the bridge's rules: `Lease::hold_locked`), the
//! registry of channels the node's workers listen to, the bounded queue of
//! outgoing posts, the durable mode's delivery record (a horizon and the
//! rows delivered above it, docs/postgres.md "Durable mode"), and the
//! figures the status shows.
//!
//! Every mutation happens under the zone's lock (the slab pool mutex, which
//! nginx's master releases when a holder dies), so a worker that dies at any
//! instruction leaves at worst a stale lease (taken over once its pid is
//! gone) or an unconsumed post (sent again by the next holder). Readers of
//! the figures take no lock: they are counters read Relaxed.

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use super::lease::{self, Me, Role};
use super::lock::ShmLock;

/// Channels the node can listen to at once.
pub const CHANNELS: usize = 128;
/// PostgreSQL's identifier limit (NAMEDATALEN - 1).
pub const NAME_MAX: usize = 63;
/// Durable rows remembered above the horizon. The holder moves the horizon
/// (and forgets the rows below it) when half of them are in use.
pub const TRACKED: usize = 1024;
/// Transactions in progress a horizon remembers; with more, it keeps only
/// its lower bound (rows above it are then read again and skipped).
pub const XIP: usize = 64;

/// What a node delivered, in transaction ids: every row whose xid is below
/// `lo`, and every row below `hi` except those of the transactions `xip`
/// (in progress when the snapshot was taken). Rows outside are remembered
/// one by one (`track`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Horizon {
    pub lo: u64,
    pub hi: u64,
    pub xip: Vec<u64>,
}

impl Horizon {
    pub fn covers(&self, xid: u64) -> bool {
        xid < self.lo || (xid < self.hi && !self.xip.contains(&xid))
    }
}
const TEXT_MAX: usize = 200;

/// Channel states in the registry.
pub const CH_FREE: u32 = 0;
pub const CH_WANTED: u32 = 1;
pub const CH_LISTENING: u32 = 2;

/// Connection states, as the holder reports them.
pub const ST_OFF: u32 = 0;
pub const ST_CONNECTING: u32 = 1;
pub const ST_READY: u32 = 2;
pub const ST_BACKOFF: u32 = 3;

pub fn state_name(s: u32) -> &'static str {
    match s {
        ST_CONNECTING => "connecting",
        ST_READY => "connected",
        ST_BACKOFF => "disconnected",
        _ => "not connected",
    }
}

#[repr(C)]
pub struct Channel {
    name: [AtomicU8; 64],
    len: AtomicU32,
    state: AtomicU32,
    last_used_ms: AtomicU64,
}

/// Short text (server version, last error) written under the lock.
#[repr(C)]
pub struct Text {
    len: AtomicU32,
    bytes: [AtomicU8; TEXT_MAX],
}

impl Text {
    fn set(&self, s: &[u8]) {
        let n = s.len().min(TEXT_MAX);
        for (d, &b) in self.bytes.iter().zip(&s[..n]) {
            // Relaxed: written and read under the zone lock.
            d.store(b, Ordering::Relaxed);
        }
        self.len.store(n as u32, Ordering::Relaxed);
    }
    fn get(&self) -> Vec<u8> {
        let n = (self.len.load(Ordering::Relaxed) as usize).min(TEXT_MAX);
        self.bytes[..n].iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }
}

/// Counters shown in the status (Relaxed: statistics, one writer at a time
/// or monotonic adds).
#[repr(C)]
#[derive(Default)]
pub struct Counters {
    pub notifications_in: AtomicU64,
    pub notifications_out: AtomicU64,
    pub posts_queued: AtomicU64,
    pub queue_overflow: AtomicU64,
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub takeovers: AtomicU64,
    pub replayed: AtomicU64,
    pub duplicates_skipped: AtomicU64,
    pub undeliverable: AtomicU64,
    pub flushes: AtomicU64,
    /// Keepalive probes sent, probes unanswered in time, the last one's round trip (us).
    pub probes: AtomicU64,
    pub probe_failures: AtomicU64,
    pub probe_us: AtomicU64,
    /// Posts the server refused, each dropped alone.
    pub posts_refused: AtomicU64,
    /// Notifications on the reserved channel refused: malformed, unknown
    /// flags, unsigned or wrongly signed.
    pub rejected: AtomicU64,
    /// Durable: times the server's transaction ids went backwards (re-based).
    pub rebases: AtomicU64,
    /// Durable: rows the record had no room for (left to the next replay).
    pub track_overflow: AtomicU64,
    /// Requests in flight that missed their deadline.
    pub request_timeouts: AtomicU64,
}

/// One durable row delivered above the horizon: its outbox id, its
/// transaction id, a fingerprint of its content (so a forged notification
/// that reuses an id cannot hide the real row) and the horizon epoch in
/// which it was delivered. id 0: free.
#[repr(C)]
struct Tracked {
    id: AtomicU64,
    xid: AtomicU64,
    fp: AtomicU32,
    epoch: AtomicU32,
}

/// What `track` decided about a durable row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// Not delivered before: deliver it (now remembered).
    New,
    /// Delivered before (the same id and content, or below the horizon).
    Duplicate,
    /// Not delivered before, but the record is full (counted): the
    /// caller leaves it to a replay that ends beyond it.
    Untracked,
}

#[repr(C)]
pub struct PgBus {
    /// Who holds the connection: pid, generation, expiry (monotonic ms).
    lease: lease::Lease,
    /// The holder's worker slot, stored with each takeover.
    holder_slot: AtomicU32,
    /// 1 while the holder has nothing to do and wants a wake-up for new work.
    holder_waiting: AtomicU32,
    pub state: AtomicU32,
    pub state_since_ms: AtomicU64,
    pub server_version: Text,
    pub last_error: Text,
    pub last_error_ms: AtomicU64,
    pub counters: Counters,
    channels: [Channel; CHANNELS],
    /// Bumped when a channel is added: the holder re-reads the registry.
    reg_version: AtomicU64,
    /// Per-node post sequence (keeps identical payloads of one flush apart).
    post_seq: AtomicU64,
    // Outgoing queue: a byte ring after this struct; head/tail only grow.
    q_cap: AtomicU64,
    q_head: AtomicU64,
    q_tail: AtomicU64,
    q_count: AtomicU64,
    // Durable mode, under the lock: the Horizon (horizon = lo, horizon_hi,
    // xip) and the rows delivered outside it (`tracked`).
    pub synced: AtomicU32,
    horizon: AtomicU64,
    horizon_hi: AtomicU64,
    xip_n: AtomicU32,
    xip: [AtomicU64; XIP],
    epoch: AtomicU32,
    tracked_n: AtomicU32,
    tracked: [Tracked; TRACKED],
    /// Highest outbox id delivered (a figure).
    pub max_id: AtomicU64,
    /// The holder's wake-up address token (module::wake: pid + nonce).
    holder_nonce: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Lease {
    /// This process holds it (and renewed it).
    Held,
    /// This process just took it; `from` is the previous holder (0: none).
    Acquired { from: i32 },
    /// Another live process holds it.
    Other(i32),
}

/// One queued post, copied out for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub channel: Vec<u8>,
    pub payload: Vec<u8>,
}

const REC_HEAD: usize = 16; // u32 channel len, u32 payload len, u64 seq

fn pad8(n: usize) -> usize {
    (n + 7) & !7
}

impl PgBus {
    pub fn region_size(queue_bytes: usize) -> usize {
        size_of::<PgBus>() + pad8(queue_bytes)
    }

    /// # Safety
    /// `p` must point to `len` zeroed bytes of shared memory, 8-aligned,
    /// that stay mapped as long as the returned reference is used.
    pub unsafe fn init<'a>(p: *mut u8, len: usize) -> Result<&'a PgBus, String> {
        if len < size_of::<PgBus>() + 4096 {
            return Err(format!("{len} bytes cannot hold the postgres bridge's state"));
        }
        // SAFETY: guaranteed by the caller; an all-zero PgBus is valid (atomics and arrays).
        let b = unsafe { &*(p as *const PgBus) };
        b.q_cap.store((len - size_of::<PgBus>()) as u64 & !7, Ordering::Relaxed);
        Ok(b)
    }

    /// # Safety
    /// As for `init`, on a region `init` prepared.
    pub unsafe fn attach<'a>(p: *mut u8, len: usize) -> Option<&'a PgBus> {
        if len < size_of::<PgBus>() {
            return None;
        }
        // SAFETY: guaranteed by the caller.
        Some(unsafe { &*(p as *const PgBus) })
    }

    // ---- lease -------------------------------------------------------

    /// Holder's pid and worker slot (pid 0: nobody).
    pub fn holder(&self) -> (i32, u32) {
        // Relaxed: a snapshot; the lease itself is decided under the lock.
        (self.lease.owner(), self.holder_slot.load(Ordering::Relaxed))
    }

    /// Takes or renews the lease. A holder loses it when its pid is gone,
    /// its lease ran out, or its generation is older than `newest_gen`
    /// (the rules: `lease::Lease::hold_locked`). Takeovers of a held lease
    /// are counted in `counters.takeovers`.
    #[allow(clippy::too_many_arguments)]
    pub fn try_lease(
        &self,
        lock: &impl ShmLock,
        pid: i32,
        slot: u32,
        generation: u64,
        newest_gen: u64,
        now_ms: u64,
        lease_ms: u64,
        alive: impl Fn(i32) -> bool,
    ) -> Lease {
        let me = Me { pid, generation, current_generation: newest_gen, exiting: false };
        let guard = lock.guard();
        let res = match self.lease.hold_locked(me, now_ms, lease_ms, alive) {
            // hold_locked never retires a holder: the bridge's holder renews.
            Role::Owner | Role::Retiring => Lease::Held,
            Role::TookOver { from, .. } => {
                // Relaxed: under the lock; holder() is a snapshot.
                self.holder_slot.store(slot, Ordering::Relaxed);
                if from != 0 {
                    self.counters.takeovers.fetch_add(1, Ordering::Relaxed);
                }
                Lease::Acquired { from }
            }
            Role::Other { pid } => Lease::Other(pid),
        };
        drop(guard);
        res
    }

    /// The holder publishes how to wake it (its wake-up socket's nonce).
    pub fn set_holder_nonce(&self, nonce: u64) {
        // Relaxed: a hint read by posters; a stale one costs one lost
        // wake-up, which the holder's next tick makes up for.
        self.holder_nonce.store(nonce, Ordering::Relaxed);
    }

    pub fn holder_nonce(&self) -> u64 {
        // Relaxed: see set_holder_nonce.
        self.holder_nonce.load(Ordering::Relaxed)
    }

    /// Gives the lease up if `pid` holds it.
    pub fn release(&self, lock: &impl ShmLock, pid: i32) {
        let guard = lock.guard();
        if self.lease.release(pid) {
            // Relaxed: under the lock.
            self.state.store(ST_OFF, Ordering::Relaxed);
        }
        drop(guard);
    }

    /// The holder is about to sleep: returns false if work arrived meanwhile.
    pub fn holder_sleep(&self) -> bool {
        // SeqCst: pairs with the poster's push-then-swap, so either the
        // poster sees the flag or the holder sees the new work.
        self.holder_waiting.store(1, Ordering::SeqCst);
        // Relaxed: the SeqCst store above orders this scan after the flag.
        let idle = self.queue_len() == 0 && !self.channels.iter().any(|c| c.state.load(Ordering::Relaxed) == CH_WANTED);
        if !idle {
            self.holder_waiting.store(0, Ordering::SeqCst);
        }
        idle
    }

    /// After queuing work: true if the holder sleeps and must be woken.
    pub fn take_holder_waiting(&self) -> bool {
        // SeqCst: see holder_sleep.
        self.holder_waiting.swap(0, Ordering::SeqCst) == 1
    }

    pub fn set_state(&self, s: u32, now_ms: u64) {
        // Relaxed: a figure for the status.
        if self.state.swap(s, Ordering::Relaxed) != s {
            self.state_since_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    pub fn set_text(&self, lock: &impl ShmLock, which: &Text, s: &[u8]) {
        let guard = lock.guard();
        which.set(s);
        drop(guard);
    }

    pub fn text(&self, lock: &impl ShmLock, which: &Text) -> Vec<u8> {
        let guard = lock.guard();
        let v = which.get();
        drop(guard);
        v
    }

    // ---- channel registry ----------------------------------------------

    fn find(&self, name: &[u8]) -> Option<&Channel> {
        // Relaxed: called under the lock.
        self.channels.iter().find(|c| {
            c.state.load(Ordering::Relaxed) != CH_FREE
                && c.len.load(Ordering::Relaxed) as usize == name.len()
                && c.name.iter().zip(name).all(|(a, &b)| a.load(Ordering::Relaxed) == b)
        })
    }

    /// Marks `name` as used now, adding it if new. Returns true when added.
    pub fn want_channel(&self, lock: &impl ShmLock, name: &[u8], now_ms: u64) -> Result<bool, String> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(format!("channel name of {} bytes", name.len()));
        }
        let guard = lock.guard();
        let res = if let Some(c) = self.find(name) {
            // Relaxed: under the lock.
            c.last_used_ms.store(now_ms, Ordering::Relaxed);
            Ok(false)
        } else if let Some(c) = self.channels.iter().find(|c| c.state.load(Ordering::Relaxed) == CH_FREE) {
            for (d, &b) in c.name.iter().zip(name) {
                d.store(b, Ordering::Relaxed);
            }
            c.len.store(name.len() as u32, Ordering::Relaxed);
            c.last_used_ms.store(now_ms, Ordering::Relaxed);
            c.state.store(CH_WANTED, Ordering::Relaxed);
            self.reg_version.fetch_add(1, Ordering::Relaxed);
            Ok(true)
        } else {
            Err(format!("too many channels: the node listens to at most {CHANNELS}"))
        };
        drop(guard);
        res
    }

    pub fn reg_version(&self) -> u64 {
        // Relaxed: a hint; the registry itself is read under the lock.
        self.reg_version.load(Ordering::Relaxed)
    }

    /// (name, state, last_used_ms) of every channel in use.
    pub fn channels(&self, lock: &impl ShmLock) -> Vec<(Vec<u8>, u32, u64)> {
        let guard = lock.guard();
        let v = self
            .channels
            .iter()
            .filter(|c| c.state.load(Ordering::Relaxed) != CH_FREE)
            .map(|c| {
                let n = (c.len.load(Ordering::Relaxed) as usize).min(64);
                (
                    c.name[..n].iter().map(|b| b.load(Ordering::Relaxed)).collect(),
                    c.state.load(Ordering::Relaxed),
                    c.last_used_ms.load(Ordering::Relaxed),
                )
            })
            .collect();
        drop(guard);
        v
    }

    pub fn is_listening(&self, lock: &impl ShmLock, name: &[u8]) -> bool {
        let guard = lock.guard();
        // Relaxed: under the lock.
        let r = self.find(name).is_some_and(|c| c.state.load(Ordering::Relaxed) == CH_LISTENING);
        drop(guard);
        r
    }

    /// Sets a channel's state (CH_FREE removes it).
    pub fn set_channel(&self, lock: &impl ShmLock, name: &[u8], state: u32) {
        let guard = lock.guard();
        if let Some(c) = self.find(name) {
            // Relaxed: under the lock.
            c.state.store(state, Ordering::Relaxed);
        }
        drop(guard);
    }

    /// After UNLISTEN: frees the channel unless a worker used it since `cutoff`
    /// (then it is wanted again and listened to anew).
    pub fn finish_unlisten(&self, lock: &impl ShmLock, name: &[u8], cutoff: u64) {
        let guard = lock.guard();
        if let Some(c) = self.find(name) {
            // Relaxed: under the lock.
            if c.last_used_ms.load(Ordering::Relaxed) < cutoff {
                c.state.store(CH_FREE, Ordering::Relaxed);
            } else {
                c.state.store(CH_WANTED, Ordering::Relaxed);
                self.reg_version.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(guard);
    }

    /// After a reconnect every channel must be listened to again.
    pub fn all_wanted(&self, lock: &impl ShmLock) {
        let guard = lock.guard();
        for c in &self.channels {
            // Relaxed: under the lock.
            if c.state.load(Ordering::Relaxed) == CH_LISTENING {
                c.state.store(CH_WANTED, Ordering::Relaxed);
            }
        }
        drop(guard);
    }

    // ---- outgoing queue ------------------------------------------------

    fn data(&self) -> *mut u8 {
        (self as *const PgBus as *mut u8).wrapping_add(size_of::<PgBus>())
    }

    fn copy_in(&self, pos: u64, src: &[u8]) {
        let cap = self.q_cap.load(Ordering::Relaxed) as usize;
        let start = (pos as usize) % cap;
        let first = src.len().min(cap - start);
        // SAFETY: the queue region holds cap bytes after the struct; under the lock.
        unsafe {
            core::ptr::copy_nonoverlapping(src.as_ptr(), self.data().add(start), first);
            core::ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data(), src.len() - first);
        }
    }

    fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        let cap = self.q_cap.load(Ordering::Relaxed) as usize;
        let start = (pos as usize) % cap;
        let first = dst.len().min(cap - start);
        // SAFETY: as in copy_in.
        unsafe {
            core::ptr::copy_nonoverlapping(self.data().add(start), dst.as_mut_ptr(), first);
            core::ptr::copy_nonoverlapping(self.data(), dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }

    pub fn queue_len(&self) -> u64 {
        // Relaxed: a snapshot.
        self.q_count.load(Ordering::Relaxed)
    }

    pub fn queue_bytes(&self) -> (u64, u64) {
        // Relaxed: a snapshot.
        let used = self.q_tail.load(Ordering::Relaxed).wrapping_sub(self.q_head.load(Ordering::Relaxed));
        (used, self.q_cap.load(Ordering::Relaxed))
    }

    /// Queue bytes a post of these lengths takes.
    pub fn record_bytes(channel: usize, payload: usize) -> u64 {
        pad8(REC_HEAD + channel + payload) as u64
    }

    /// Appends a post; Err when the queue is full (counted).
    pub fn push(&self, lock: &impl ShmLock, channel: &[u8], payload: &[u8]) -> Result<u64, String> {
        let need = pad8(REC_HEAD + channel.len() + payload.len()) as u64;
        let guard = lock.guard();
        // Relaxed: under the lock.
        let cap = self.q_cap.load(Ordering::Relaxed);
        let (head, tail) = (self.q_head.load(Ordering::Relaxed), self.q_tail.load(Ordering::Relaxed));
        if tail - head + need > cap {
            drop(guard);
            self.counters.queue_overflow.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "post queue full ({} posts, {} of {cap} bytes): the database is not keeping up or is unreachable",
                self.queue_len(),
                tail - head
            ));
        }
        let seq = self.post_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut h = [0u8; REC_HEAD];
        h[0..4].copy_from_slice(&(channel.len() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        self.copy_in(tail, &h);
        self.copy_in(tail + REC_HEAD as u64, channel);
        self.copy_in(tail + (REC_HEAD + channel.len()) as u64, payload);
        self.q_tail.store(tail + need, Ordering::Relaxed);
        self.q_count.fetch_add(1, Ordering::Relaxed);
        drop(guard);
        self.counters.posts_queued.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// Copies up to `max` posts from the front without removing them; returns
    /// them and the byte count to pass to `consume` once they were sent.
    pub fn peek(&self, lock: &impl ShmLock, max: usize, max_bytes: usize) -> (Vec<Queued>, u64) {
        let mut out = Vec::new();
        let guard = lock.guard();
        // Relaxed: under the lock.
        let (head, tail) = (self.q_head.load(Ordering::Relaxed), self.q_tail.load(Ordering::Relaxed));
        let mut pos = head;
        let mut bytes = 0usize;
        while pos < tail && out.len() < max && bytes < max_bytes {
            let mut h = [0u8; REC_HEAD];
            self.copy_out(pos, &mut h);
            let clen = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let plen = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let seq = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
            let mut channel = vec![0u8; clen];
            let mut payload = vec![0u8; plen];
            self.copy_out(pos + REC_HEAD as u64, &mut channel);
            self.copy_out(pos + (REC_HEAD + clen) as u64, &mut payload);
            pos += pad8(REC_HEAD + clen + plen) as u64;
            bytes += clen + plen;
            out.push(Queued { seq, channel, payload });
        }
        drop(guard);
        (out, pos - head)
    }

    /// Removes `n` posts (`bytes` bytes) that `peek` returned and were sent.
    pub fn consume(&self, lock: &impl ShmLock, n: u64, bytes: u64) {
        let guard = lock.guard();
        // Relaxed: under the lock.
        let head = self.q_head.load(Ordering::Relaxed);
        let tail = self.q_tail.load(Ordering::Relaxed);
        self.q_head.store((head + bytes).min(tail), Ordering::Relaxed);
        let c = self.q_count.load(Ordering::Relaxed);
        self.q_count.store(c.saturating_sub(n), Ordering::Relaxed);
        drop(guard);
        self.counters.notifications_out.fetch_add(n, Ordering::Relaxed);
    }

    // ---- durable mode: each outbox row delivered once per node -----------

    /// The horizon's bounds and the number of rows remembered outside it.
    pub fn durable_figures(&self) -> (u64, u64, u32) {
        // Relaxed: figures; written under the lock.
        (
            self.horizon.load(Ordering::Relaxed),
            self.horizon_hi.load(Ordering::Relaxed),
            self.tracked_n.load(Ordering::Relaxed),
        )
    }

    /// Whether the node ever took its first snapshot (before it, a replay
    /// records the rows it finds without delivering them: no history for
    /// a node that was never there).
    pub fn synced(&self) -> bool {
        // Relaxed: written once under the lock by the holder.
        self.synced.load(Ordering::Relaxed) != 0
    }

    fn horizon_locked(&self) -> Horizon {
        // Relaxed: under the lock.
        let n = (self.xip_n.load(Ordering::Relaxed) as usize).min(XIP);
        Horizon {
            lo: self.horizon.load(Ordering::Relaxed),
            hi: self.horizon_hi.load(Ordering::Relaxed),
            xip: self.xip[..n].iter().map(|x| x.load(Ordering::Relaxed)).collect(),
        }
    }

    fn set_horizon(&self, h: &Horizon) {
        // Relaxed: under the lock.
        let keep = h.xip.len() <= XIP;
        self.horizon.store(h.lo, Ordering::Relaxed);
        self.horizon_hi.store(if keep { h.hi.max(h.lo) } else { h.lo }, Ordering::Relaxed);
        let xip = if keep { &h.xip[..] } else { &[][..] };
        for (d, &x) in self.xip.iter().zip(xip) {
            d.store(x, Ordering::Relaxed);
        }
        self.xip_n.store(xip.len() as u32, Ordering::Relaxed);
    }

    fn slot_of(id: u64) -> usize {
        (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % TRACKED
    }

    /// Decides whether a durable row is new, and remembers it if so.
    pub fn track(&self, lock: &impl ShmLock, id: u64, xid: u64, fp: u32) -> Track {
        if id == 0 {
            return Track::Duplicate;
        }
        let guard = lock.guard();
        // Relaxed: under the lock.
        let res = if self.horizon_locked().covers(xid) {
            Track::Duplicate
        } else {
            let mut i = Self::slot_of(id);
            let mut found = None;
            for _ in 0..TRACKED {
                let t = &self.tracked[i];
                let tid = t.id.load(Ordering::Relaxed);
                if tid == 0 {
                    found = Some(i);
                    break;
                }
                if tid == id && t.fp.load(Ordering::Relaxed) == fp && t.xid.load(Ordering::Relaxed) == xid {
                    found = None;
                    break;
                }
                i = (i + 1) % TRACKED;
            }
            let full = self.tracked_n.load(Ordering::Relaxed) as usize >= TRACKED - 1;
            match found {
                Some(_) if full => Track::Untracked,
                Some(i) => {
                    let t = &self.tracked[i];
                    t.xid.store(xid, Ordering::Relaxed);
                    t.fp.store(fp, Ordering::Relaxed);
                    t.epoch.store(self.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
                    t.id.store(id, Ordering::Relaxed);
                    self.tracked_n.fetch_add(1, Ordering::Relaxed);
                    Track::New
                }
                None if self.tracked_n.load(Ordering::Relaxed) as usize >= TRACKED => Track::Untracked,
                None => Track::Duplicate,
            }
        };
        drop(guard);
        match res {
            Track::Duplicate => self.counters.duplicates_skipped.fetch_add(1, Ordering::Relaxed),
            Track::Untracked => self.counters.track_overflow.fetch_add(1, Ordering::Relaxed),
            Track::New => self.max_id.fetch_max(id, Ordering::Relaxed),
        };
        res
    }

    /// The ids remembered above the horizon (a replay skips them).
    pub fn tracked_ids(&self, lock: &impl ShmLock) -> Vec<u64> {
        let guard = lock.guard();
        // Relaxed: under the lock.
        let v = self.tracked.iter().map(|t| t.id.load(Ordering::Relaxed)).filter(|&id| id != 0).collect();
        drop(guard);
        v
    }

    /// A snapshot is about to be taken: returns its epoch. Rows delivered
    /// from now on carry it.
    pub fn begin_snapshot(&self, lock: &impl ShmLock) -> u32 {
        let guard = lock.guard();
        // Relaxed: under the lock.
        let e = self.epoch.load(Ordering::Relaxed).wrapping_add(1);
        self.epoch.store(e, Ordering::Relaxed);
        drop(guard);
        e
    }

    /// The horizon a replay starts from (it reads the rows outside it), or
    /// `None` when the server's transaction ids went backwards (`xmax`, the
    /// next id it will assign, is below what this node delivered: another
    /// server, or one restored from a backup): then the record is reset to
    /// `xmin` and the caller re-bases.
    pub fn replay_from(&self, lock: &impl ShmLock, xmin: u64, xmax: u64) -> Option<Horizon> {
        let guard = lock.guard();
        let h = self.horizon_locked();
        let r = if xmax < h.hi.max(h.lo) {
            self.set_horizon(&Horizon { lo: xmin, hi: xmin, xip: Vec::new() });
            for t in &self.tracked {
                // Relaxed: under the lock.
                t.id.store(0, Ordering::Relaxed);
            }
            self.tracked_n.store(0, Ordering::Relaxed);
            None
        } else {
            Some(h)
        };
        drop(guard);
        if r.is_none() {
            self.counters.rebases.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// A replay read every row outside the horizon, after the snapshot
    /// `new` was taken (LISTEN already in force): every row of a
    /// transaction that had ended by then (below `new.hi`, not in
    /// `new.xip`) was read or delivered, and every later one is notified.
    /// The horizon becomes `new`; remembered rows it covers are forgotten,
    /// and so are rows remembered before the snapshot (`epoch` older than
    /// `snap_epoch`) that claim a transaction id the server had not
    /// assigned yet (at or above `new.hi`): forged. Returns how many were forged.
    pub fn advance(&self, lock: &impl ShmLock, new: &Horizon, snap_epoch: u32) -> u32 {
        let guard = lock.guard();
        let old = self.horizon_locked();
        let new = if new.lo < old.lo { Horizon { lo: old.lo, ..new.clone() } } else { new.clone() };
        self.set_horizon(&new);
        let h = self.horizon_locked();
        let xmax = new.hi;
        let mut keep = Vec::new();
        let mut forged = 0;
        for t in &self.tracked {
            let id = t.id.load(Ordering::Relaxed);
            if id == 0 {
                continue;
            }
            let (xid, fp, ep) =
                (t.xid.load(Ordering::Relaxed), t.fp.load(Ordering::Relaxed), t.epoch.load(Ordering::Relaxed));
            t.id.store(0, Ordering::Relaxed);
            if h.covers(xid) {
                continue;
            }
            if xid >= xmax && ep.wrapping_sub(snap_epoch) as i32 <= -1 {
                forged += 1;
                continue;
            }
            keep.push((id, xid, fp, ep));
        }
        for (id, xid, fp, ep) in &keep {
            let mut i = Self::slot_of(*id);
            while self.tracked[i].id.load(Ordering::Relaxed) != 0 {
                i = (i + 1) % TRACKED;
            }
            let t = &self.tracked[i];
            t.xid.store(*xid, Ordering::Relaxed);
            t.fp.store(*fp, Ordering::Relaxed);
            t.epoch.store(*ep, Ordering::Relaxed);
            t.id.store(*id, Ordering::Relaxed);
        }
        self.tracked_n.store(keep.len() as u32, Ordering::Relaxed);
        self.synced.store(1, Ordering::Relaxed);
        drop(guard);
        forged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::lock::NoLock;

    fn region(q: usize) -> (Vec<u64>, usize) {
        let len = PgBus::region_size(q);
        (vec![0u64; len / 8 + 1], len)
    }

    #[test]
    fn queue_keeps_order_and_wraps() {
        let (mut mem, len) = region(4096);
        // SAFETY: a zeroed, aligned region of len bytes.
        let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
        let l = NoLock;
        let mut next = 0u32;
        for round in 0..200 {
            let n = 1 + round % 7;
            for _ in 0..n {
                b.push(&l, format!("ch{next}").as_bytes(), &vec![b'x'; (next % 300) as usize]).unwrap();
                next += 1;
            }
            let (got, bytes) = b.peek(&l, 100, 1 << 20);
            assert_eq!(got.len(), n as usize);
            let first = next - n;
            for (i, q) in got.iter().enumerate() {
                assert_eq!(q.channel, format!("ch{}", first + i as u32).into_bytes());
                assert_eq!(q.payload.len(), ((first + i as u32) % 300) as usize);
            }
            b.consume(&l, got.len() as u64, bytes);
            assert_eq!(b.queue_len(), 0);
        }
    }

    #[test]
    fn full_queue_is_an_error_and_counted() {
        let (mut mem, len) = region(4096);
        // SAFETY: as above.
        let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
        let l = NoLock;
        let mut ok = 0;
        while b.push(&l, b"c", &[b'p'; 100]).is_ok() {
            ok += 1;
        }
        assert!(ok > 30);
        let e = b.push(&l, b"c", b"p").unwrap_err();
        assert!(e.starts_with("post queue full ("), "{e}");
        assert_eq!(b.counters.queue_overflow.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn lease_wraps_the_shared_lease_with_slot_takeovers_and_state() {
        let (mut mem, len) = region(4096);
        // SAFETY: as above.
        let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
        let l = NoLock;
        let alive = |p: i32| p != 99;
        assert_eq!(b.try_lease(&l, 10, 0, 1, 1, 1000, 3000, alive), Lease::Acquired { from: 0 });
        assert_eq!(b.try_lease(&l, 11, 1, 1, 1, 1500, 3000, alive), Lease::Other(10));
        assert_eq!(b.try_lease(&l, 10, 0, 1, 1, 2000, 3000, alive), Lease::Held);
        // Expired.
        assert_eq!(b.try_lease(&l, 11, 1, 1, 1, 5001, 3000, alive), Lease::Acquired { from: 10 });
        assert_eq!(b.holder(), (11, 1));
        // Old generation cannot take it; new generation takes it at once.
        assert_eq!(b.try_lease(&l, 12, 0, 1, 2, 5002, 3000, alive), Lease::Other(11));
        assert_eq!(b.try_lease(&l, 13, 0, 2, 2, 5003, 3000, alive), Lease::Acquired { from: 11 });
        // Dead holder.
        b.set_state(ST_READY, 5003);
        b.release(&l, 12);
        assert_eq!((b.holder().0, b.state.load(Ordering::Relaxed)), (13, ST_READY), "not the holder: nothing");
        b.release(&l, 13);
        assert_eq!((b.holder().0, b.state.load(Ordering::Relaxed)), (0, ST_OFF));
        assert_eq!(b.try_lease(&l, 99, 0, 2, 2, 5004, 3000, alive), Lease::Acquired { from: 0 });
        assert_eq!(b.try_lease(&l, 14, 0, 2, 2, 5005, 3000, alive), Lease::Acquired { from: 99 });
        assert_eq!(b.counters.takeovers.load(Ordering::Relaxed), 3, "expired, old generation, dead: not free");
    }

    #[test]
    fn durable_record_delivers_each_row_once_whatever_the_order() {
        let (mut mem, len) = region(4096);
        // SAFETY: as above.
        let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
        let l = NoLock;
        assert_eq!(b.replay_from(&l, 100, 105), Some(Horizon::default()));
        assert_eq!(b.track(&l, 7, 101, 1), Track::New);
        assert_eq!(b.track(&l, 7, 101, 1), Track::Duplicate);
        // A forged notification reusing id 8 does not hide the real row 8.
        assert_eq!(b.track(&l, 8, 1 << 40, 9), Track::New);
        assert_eq!(b.track(&l, 8, 102, 2), Track::New);
        // A row committed late (lower id, lower xid) is still new.
        assert_eq!(b.track(&l, 3, 99, 3), Track::New);
        assert_eq!(b.tracked_ids(&l).len(), 4);
        // The snapshot (xmin 101, xmax 110, 101 and 105 in progress) was
        // taken after those arrived: 3 and 8 are covered, 7 (xid 101) is
        // still remembered, the forged xid is dropped as forged.
        let e = b.begin_snapshot(&l);
        assert_eq!(b.advance(&l, &Horizon { lo: 101, hi: 110, xip: vec![101, 105] }, e), 1);
        assert_eq!(b.durable_figures(), (101, 110, 1));
        assert_eq!(b.track(&l, 3, 99, 3), Track::Duplicate);
        assert_eq!(b.track(&l, 8, 102, 2), Track::Duplicate);
        assert_eq!(b.track(&l, 7, 101, 1), Track::Duplicate);
        // A late commit of transaction 105 is new.
        assert_eq!(b.track(&l, 5, 105, 1), Track::New);
        // The server's ids went backwards: the record is reset.
        assert_eq!(b.replay_from(&l, 5, 50), None);
        assert_eq!(b.durable_figures(), (5, 5, 0));
        assert_eq!(b.counters.rebases.load(Ordering::Relaxed), 1);
        assert_eq!(b.track(&l, 8, 102, 2), Track::New);
    }

    #[test]
    fn durable_record_full_delivers_and_counts() {
        let (mut mem, len) = region(4096);
        // SAFETY: as above.
        let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
        let l = NoLock;
        let mut untracked = 0;
        for id in 1..=(TRACKED as u64 + 10) {
            match b.track(&l, id, 10 + id, 0) {
                Track::New => {}
                Track::Untracked => untracked += 1,
                Track::Duplicate => panic!("{id} is new"),
            }
        }
        assert_eq!(untracked, 11);
        assert_eq!(b.counters.track_overflow.load(Ordering::Relaxed), 11);
    }

    #[test]
    fn registry_adds_touches_and_frees() {
        let (mut mem, len) = region(4096);
        // SAFETY: as above.
        let b = unsafe { PgBus::init(mem.as_mut_ptr().cast(), len) }.unwrap();
        let l = NoLock;
        assert_eq!(b.want_channel(&l, b"a", 1), Ok(true));
        assert_eq!(b.want_channel(&l, b"a", 2), Ok(false));
        assert!(b.want_channel(&l, b"", 2).is_err());
        b.set_channel(&l, b"a", CH_LISTENING);
        assert!(b.is_listening(&l, b"a"));
        assert_eq!(b.channels(&l), vec![(b"a".to_vec(), CH_LISTENING, 2)]);
        b.all_wanted(&l);
        assert!(!b.is_listening(&l, b"a"));
        b.set_channel(&l, b"a", CH_FREE);
        assert!(b.channels(&l).is_empty());
    }
}
