//! The registry of channels the node's workers listen to.

use super::*;

impl PgBus {
    // ---- channel registry ----------------------------------------------

    pub(super) fn find(&self, name: &[u8]) -> Option<&Channel> {
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
}
