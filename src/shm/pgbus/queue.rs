//! The bounded queue of outgoing posts: a byte ring after the struct.

use super::*;

impl PgBus {
    // ---- outgoing queue ------------------------------------------------

    pub(super) fn data(&self) -> *mut u8 {
        (self as *const PgBus as *mut u8).wrapping_add(size_of::<PgBus>())
    }

    pub(super) fn copy_in(&self, pos: u64, src: &[u8]) {
        let cap = self.q_cap.load(Ordering::Relaxed) as usize;
        let start = (pos as usize) % cap;
        let first = src.len().min(cap - start);
        // SAFETY: the queue region holds cap bytes after the struct; under the lock.
        unsafe {
            core::ptr::copy_nonoverlapping(src.as_ptr(), self.data().add(start), first);
            core::ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data(), src.len() - first);
        }
    }

    pub(super) fn copy_out(&self, pos: u64, dst: &mut [u8]) {
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
}
