//! Durable mode's delivery record: the horizon and the rows delivered
//! outside it (docs/postgres.md, "Durable mode").

use super::*;

impl PgBus {
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

    pub(super) fn horizon_locked(&self) -> Horizon {
        // Relaxed: under the lock.
        let n = (self.xip_n.load(Ordering::Relaxed) as usize).min(XIP);
        Horizon {
            lo: self.horizon.load(Ordering::Relaxed),
            hi: self.horizon_hi.load(Ordering::Relaxed),
            xip: self.xip[..n].iter().map(|x| x.load(Ordering::Relaxed)).collect(),
        }
    }

    pub(super) fn set_horizon(&self, h: &Horizon) {
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

    pub(super) fn slot_of(id: u64) -> usize {
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
