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

mod channels;
mod durable;
mod queue;
#[cfg(test)]
mod tests;

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
}
