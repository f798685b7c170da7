//! The lifecycle table: configuration generations and worker records.
//!
//! One table per node, in the primary zone. The master writes a generation
//! record on every configuration load (it is the only writer of those); each
//! worker claims a worker record when it starts and keeps its heartbeat in it.
//! Every transition is a single compare-and-swap on `state`, so a process
//! that dies at any instruction leaves at worst a record in a state another
//! process can still judge (its pid is gone, its heartbeat is old).

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Generation records kept: the newest ones, indexed by `generation % N`.
pub const MAX_GENERATIONS: usize = 16;
/// Worker records kept; ended records are recycled oldest first.
pub const MAX_WORKER_RECORDS: usize = 128;

/// A worker record's state.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    Free = 0,
    /// Being filled by the process that claimed it; invisible to readers.
    Claiming = 1,
    Running = 2,
    /// Heartbeat overdue while the pid is alive (stopped, or stuck in a loop).
    Hung = 3,
    /// Left through nginx's exit_process (graceful stop, reload, quit).
    Exited = 4,
    /// Gone without exit_process: killed, or crashed.
    Crashed = 5,
}

impl WorkerState {
    pub fn from_u32(v: u32) -> WorkerState {
        match v {
            1 => WorkerState::Claiming,
            2 => WorkerState::Running,
            3 => WorkerState::Hung,
            4 => WorkerState::Exited,
            5 => WorkerState::Crashed,
            _ => WorkerState::Free,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Free => "free",
            WorkerState::Claiming => "starting",
            WorkerState::Running => "running",
            WorkerState::Hung => "hung",
            WorkerState::Exited => "exited",
            WorkerState::Crashed => "crashed",
        }
    }

    /// Alive as far as the table knows: counted among a generation's workers.
    pub fn is_live(self) -> bool {
        matches!(self, WorkerState::Running | WorkerState::Hung)
    }

    fn is_ended(self) -> bool {
        matches!(self, WorkerState::Exited | WorkerState::Crashed)
    }
}

#[repr(C)]
pub struct GenRecord {
    /// 0 while empty; stored last (Release) so the other fields are complete.
    pub generation: AtomicU64,
    pub master_pid: AtomicI32,
    pub worker_count: AtomicU32,
    pub started_ms: AtomicU64,
    /// Event ring head when this generation began: its workers start reading here.
    pub first_seq: AtomicU64,
}

#[repr(C)]
pub struct WorkerRecord {
    pub state: AtomicU32,
    pub slot: AtomicU32,
    pub pid: AtomicI32,
    /// pid of the worker that took this slot after this one crashed.
    pub replaced_by: AtomicI32,
    /// FLAG_* bits, set by the worker itself.
    pub flags: AtomicU32,
    _pad: u32,
    pub generation: AtomicU64,
    pub started_ms: AtomicU64,
    pub heartbeat_ms: AtomicU64,
    pub ended_ms: AtomicU64,
}

#[repr(C)]
pub struct Lifecycle {
    /// The newest generation; bumped by the master once per configuration load.
    pub generation: AtomicU64,
    /// When the zone was created, and by which master: the node's identity.
    pub node_started_ms: AtomicU64,
    pub node_master_pid: AtomicI32,
    /// resty.worker.manager's node-wide lock: owner pid, 0 when free.
    pub manager_lock: AtomicI32,
    /// Newest generation whose "master start" callback was claimed.
    pub master_started: AtomicU64,
    /// Hang timeout set from Lua (resty.worker.manager's `failed`), 0 = the directive's.
    pub hang_timeout_ms: AtomicU64,
    pub gens: [GenRecord; MAX_GENERATIONS],
    pub workers: [WorkerRecord; MAX_WORKER_RECORDS],
}

/// The worker's start was seen by resty.worker.manager (it counts in n_mine).
pub const FLAG_MANAGED: u32 = 1;

/// What a lifecycle check found, for the caller to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finding {
    /// A worker's pid is gone without exit_process.
    Crashed { pid: i32, slot: u32, generation: u64 },
    /// Heartbeat overdue by `late_ms` while the pid is alive.
    Hung { pid: i32, slot: u32, generation: u64, late_ms: u64 },
}

/// Copy of one worker record, for status and Lua.
#[derive(Clone, Copy, Debug)]
pub struct WorkerView {
    pub index: usize,
    pub state: WorkerState,
    pub slot: u32,
    pub pid: i32,
    pub replaced_by: i32,
    pub generation: u64,
    pub started_ms: u64,
    pub heartbeat_ms: u64,
    pub ended_ms: u64,
}

/// Copy of one generation record.
#[derive(Clone, Copy, Debug)]
pub struct GenView {
    pub generation: u64,
    pub master_pid: i32,
    pub worker_count: u32,
    pub started_ms: u64,
    pub first_seq: u64,
}

/// `kill(pid, 0)`: false only when the process certainly does not exist.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 performs only the existence and permission check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

impl Lifecycle {
    /// Called once on a fresh (zero-filled) zone.
    pub fn init(&self, master_pid: i32, now_ms: u64) {
        // Relaxed: the zone is not shared with any other process yet.
        self.node_started_ms.store(now_ms, Ordering::Relaxed);
        self.node_master_pid.store(master_pid, Ordering::Relaxed);
    }

    /// A new configuration load; master only, so it has no concurrent writer.
    pub fn begin_generation(&self, master_pid: i32, worker_count: u32, now_ms: u64, first_seq: u64) -> u64 {
        // Relaxed: the master is this field's only writer.
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        let rec = &self.gens[(generation as usize) % MAX_GENERATIONS];
        rec.generation.store(0, Ordering::Relaxed);
        rec.master_pid.store(master_pid, Ordering::Relaxed);
        rec.worker_count.store(worker_count, Ordering::Relaxed);
        rec.started_ms.store(now_ms, Ordering::Relaxed);
        rec.first_seq.store(first_seq, Ordering::Relaxed);
        // Release: readers that see the number see the fields written above.
        rec.generation.store(generation, Ordering::Release);
        self.generation.store(generation, Ordering::Release);
        generation
    }

    /// nginx daemonizes after the first configuration load, so the pid seen
    /// in init_module is not the master's: its workers correct it (getppid).
    pub fn set_master_pid(&self, generation: u64, seen: i32, master_pid: i32) {
        let rec = &self.gens[(generation as usize) % MAX_GENERATIONS];
        // Acquire: pairs with the Release in begin_generation.
        if rec.generation.load(Ordering::Acquire) != generation {
            return;
        }
        // Relaxed: idempotent corrections from the generation's own workers.
        let _ = rec.master_pid.compare_exchange(seen, master_pid, Ordering::Relaxed, Ordering::Relaxed);
        let _ = self.node_master_pid.compare_exchange(seen, master_pid, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn current_generation(&self) -> u64 {
        // Acquire: pairs with the Release in begin_generation.
        self.generation.load(Ordering::Acquire)
    }

    pub fn generation(&self, generation: u64) -> Option<GenView> {
        if generation == 0 {
            return None;
        }
        let rec = &self.gens[(generation as usize) % MAX_GENERATIONS];
        // Acquire: pairs with the Release in begin_generation.
        if rec.generation.load(Ordering::Acquire) != generation {
            return None;
        }
        Some(GenView {
            generation,
            master_pid: rec.master_pid.load(Ordering::Relaxed),
            worker_count: rec.worker_count.load(Ordering::Relaxed),
            started_ms: rec.started_ms.load(Ordering::Relaxed),
            first_seq: rec.first_seq.load(Ordering::Relaxed),
        })
    }

    /// A worker starts in `slot` of `generation`. Live records of the same
    /// slot and generation whose pid is gone are marked crashed first (the
    /// master only respawns a slot after reaping its previous worker), and
    /// each is reported through `found`. Returns the claimed record's index,
    /// or None when every record is live (more than MAX_WORKER_RECORDS workers).
    pub fn register_worker(
        &self,
        generation: u64,
        slot: u32,
        pid: i32,
        now_ms: u64,
        alive: impl Fn(i32) -> bool,
        mut found: impl FnMut(Finding),
    ) -> Option<usize> {
        for rec in &self.workers {
            let st = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            if !st.is_live()
                || rec.generation.load(Ordering::Relaxed) != generation
                || rec.slot.load(Ordering::Relaxed) != slot
            {
                continue;
            }
            let old = rec.pid.load(Ordering::Relaxed);
            if old == pid || alive(old) {
                continue;
            }
            if self.end(rec, st, WorkerState::Crashed, now_ms) {
                // Relaxed: informational, read together with the state.
                rec.replaced_by.store(pid, Ordering::Relaxed);
                found(Finding::Crashed { pid: old, slot, generation });
            }
        }
        let index = self.claim_record()?;
        let rec = &self.workers[index];
        // Relaxed: the record is invisible (Claiming) until the Release below.
        rec.slot.store(slot, Ordering::Relaxed);
        rec.pid.store(pid, Ordering::Relaxed);
        rec.replaced_by.store(0, Ordering::Relaxed);
        rec.flags.store(0, Ordering::Relaxed);
        rec.generation.store(generation, Ordering::Relaxed);
        rec.started_ms.store(now_ms, Ordering::Relaxed);
        rec.heartbeat_ms.store(now_ms, Ordering::Relaxed);
        rec.ended_ms.store(0, Ordering::Relaxed);
        // Release: publishes the fields above.
        rec.state.store(WorkerState::Running as u32, Ordering::Release);
        Some(index)
    }

    /// A free record, else the ended record that ended first.
    fn claim_record(&self) -> Option<usize> {
        for _ in 0..8 {
            let mut oldest: Option<(usize, u32, u64)> = None;
            for (i, rec) in self.workers.iter().enumerate() {
                let raw = rec.state.load(Ordering::Acquire);
                let st = WorkerState::from_u32(raw);
                if st == WorkerState::Free {
                    // AcqRel: the winner owns the record's fields.
                    if rec
                        .state
                        .compare_exchange(raw, WorkerState::Claiming as u32, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        return Some(i);
                    }
                    continue;
                }
                if st.is_ended() {
                    let ended = rec.ended_ms.load(Ordering::Relaxed);
                    if oldest.is_none_or(|(_, _, e)| ended < e) {
                        oldest = Some((i, raw, ended));
                    }
                }
            }
            let (i, raw, _) = oldest?;
            // AcqRel: as above; a lost race means another worker took it, retry.
            if self.workers[i]
                .state
                .compare_exchange(raw, WorkerState::Claiming as u32, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Some(i);
            }
        }
        None
    }

    fn end(&self, rec: &WorkerRecord, from: WorkerState, to: WorkerState, now_ms: u64) -> bool {
        // AcqRel: only one process may end a record, and it publishes ended_ms after.
        let won = rec
            .state
            .compare_exchange(from as u32, to as u32, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if won {
            rec.ended_ms.store(now_ms, Ordering::Relaxed);
        }
        won
    }

    /// The worker's own heartbeat. Returns true when it was marked hung and
    /// is now running again.
    pub fn heartbeat(&self, index: usize, pid: i32, now_ms: u64) -> bool {
        let Some(rec) = self.workers.get(index) else { return false };
        if rec.pid.load(Ordering::Relaxed) != pid {
            return false;
        }
        // Relaxed: a single timestamp, judged with slack of whole seconds.
        rec.heartbeat_ms.store(now_ms, Ordering::Relaxed);
        // AcqRel: races with another worker's check marking it hung.
        rec.state
            .compare_exchange(WorkerState::Hung as u32, WorkerState::Running as u32, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// The worker leaves through exit_process.
    pub fn exit_worker(&self, index: usize, pid: i32, now_ms: u64) {
        let Some(rec) = self.workers.get(index) else { return };
        if rec.pid.load(Ordering::Relaxed) != pid {
            return;
        }
        for from in [WorkerState::Running, WorkerState::Hung] {
            if self.end(rec, from, WorkerState::Exited, now_ms) {
                return;
            }
        }
    }

    /// Judges every live record by its heartbeat: pid gone → crashed, pid
    /// alive but heartbeat older than `hang_ms` → hung. Any worker may run it.
    pub fn check(&self, now_ms: u64, hang_ms: u64, alive: impl Fn(i32) -> bool, mut found: impl FnMut(Finding)) {
        for rec in &self.workers {
            let st = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            if !st.is_live() {
                continue;
            }
            let pid = rec.pid.load(Ordering::Relaxed);
            let slot = rec.slot.load(Ordering::Relaxed);
            let generation = rec.generation.load(Ordering::Relaxed);
            let late_ms = now_ms.saturating_sub(rec.heartbeat_ms.load(Ordering::Relaxed));
            if !alive(pid) {
                if self.end(rec, st, WorkerState::Crashed, now_ms) {
                    found(Finding::Crashed { pid, slot, generation });
                }
            } else if st == WorkerState::Running && late_ms > hang_ms {
                // AcqRel: the worker's own heartbeat may flip it back at once.
                if rec
                    .state
                    .compare_exchange(st as u32, WorkerState::Hung as u32, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    found(Finding::Hung { pid, slot, generation, late_ms });
                }
            }
        }
    }

    /// Sets FLAG_* bits on this worker's own record.
    pub fn set_flags(&self, index: usize, pid: i32, bits: u32) {
        let Some(rec) = self.workers.get(index) else { return };
        if rec.pid.load(Ordering::Relaxed) == pid {
            // Relaxed: read by counts() under the manager lock, which orders it.
            rec.flags.fetch_or(bits, Ordering::Relaxed);
        }
    }

    /// Takes the manager lock for `pid`; a lock whose owner is gone is taken over.
    pub fn try_lock(&self, pid: i32, alive: impl Fn(i32) -> bool) -> bool {
        // Acquire on success: what the previous holder wrote is visible.
        match self.manager_lock.compare_exchange(0, pid, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => true,
            Err(owner) if owner == pid => true,
            Err(owner) if !alive(owner) => {
                self.manager_lock.compare_exchange(owner, pid, Ordering::Acquire, Ordering::Relaxed).is_ok()
            }
            Err(_) => false,
        }
    }

    pub fn unlock(&self, pid: i32) {
        // Release: the holder's writes are visible to the next holder.
        let _ = self.manager_lock.compare_exchange(pid, 0, Ordering::Release, Ordering::Relaxed);
    }

    /// True for exactly one caller per generation: it runs "master start".
    pub fn claim_master_start(&self, generation: u64) -> bool {
        // Relaxed loads, AcqRel CAS: only the winner's claim matters.
        let mut cur = self.master_started.load(Ordering::Relaxed);
        while cur < generation {
            match self.master_started.compare_exchange(cur, generation, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
        false
    }

    /// Workers of `generation` the manager has seen start and that still
    /// run, plus those that crashed less than `failed_ms` ago (as the
    /// original, which only noticed a crash when its heartbeat expired).
    pub fn managed_count(&self, generation: u64, now_ms: u64, failed_ms: u64) -> u32 {
        self.workers
            .iter()
            .filter(|rec| {
                // Relaxed: counts are taken under the manager lock.
                let st = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
                rec.generation.load(Ordering::Relaxed) == generation
                    && rec.flags.load(Ordering::Relaxed) & FLAG_MANAGED != 0
                    && (st.is_live()
                        || (st == WorkerState::Crashed
                            && now_ms.saturating_sub(rec.ended_ms.load(Ordering::Relaxed)) < failed_ms))
            })
            .count() as u32
    }

    /// (n_prev, n_mine, n_next) as resty.worker.manager's callbacks get
    /// them: neighbours are None when that generation does not exist.
    pub fn manager_counts(&self, generation: u64, now_ms: u64, failed_ms: u64) -> (Option<u32>, u32, Option<u32>) {
        let prev = generation.checked_sub(1).and_then(|g| self.generation(g)).map(|g| self.live_count(g.generation));
        let next = self.generation(generation + 1).map(|g| self.live_count(g.generation));
        (prev, self.managed_count(generation, now_ms, failed_ms), next)
    }

    /// Live workers of `generation` (running or hung).
    pub fn live_count(&self, generation: u64) -> u32 {
        self.workers().filter(|w| w.generation == generation && w.state.is_live()).count() as u32
    }

    /// Every record in use, in table order.
    pub fn workers(&self) -> impl Iterator<Item = WorkerView> + '_ {
        self.workers.iter().enumerate().filter_map(|(index, rec)| {
            let state = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            if matches!(state, WorkerState::Free | WorkerState::Claiming) {
                return None;
            }
            Some(WorkerView {
                index,
                state,
                slot: rec.slot.load(Ordering::Relaxed),
                pid: rec.pid.load(Ordering::Relaxed),
                replaced_by: rec.replaced_by.load(Ordering::Relaxed),
                generation: rec.generation.load(Ordering::Relaxed),
                started_ms: rec.started_ms.load(Ordering::Relaxed),
                heartbeat_ms: rec.heartbeat_ms.load(Ordering::Relaxed),
                ended_ms: rec.ended_ms.load(Ordering::Relaxed),
            })
        })
    }

    /// The generations still in the table, oldest first.
    pub fn generations(&self) -> Vec<GenView> {
        let newest = self.current_generation();
        let oldest = newest.saturating_sub(MAX_GENERATIONS as u64 - 1).max(1);
        (oldest..=newest).filter_map(|g| self.generation(g)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Box<Lifecycle> {
        // SAFETY: every field is an atomic integer or an array of them; all-zero is valid.
        unsafe { Box::new(core::mem::zeroed()) }
    }

    #[test]
    fn generations_count_up_and_wrap() {
        let t = table();
        for g in 1..=20 {
            assert_eq!(t.begin_generation(100, 4, g * 10, g), g);
        }
        let gens = t.generations();
        assert_eq!(gens.len(), MAX_GENERATIONS);
        assert_eq!(gens.first().map(|g| g.generation), Some(5));
        assert_eq!(gens.last().map(|g| (g.generation, g.first_seq)), Some((20, 20)));
        assert!(t.generation(4).is_none());
    }

    #[test]
    fn respawn_in_same_slot_marks_dead_pid_crashed() {
        let t = table();
        let g = t.begin_generation(1, 2, 0, 1);
        t.register_worker(g, 0, 10, 0, |_| true, |_| {}).unwrap();
        t.register_worker(g, 1, 11, 0, |_| true, |_| {}).unwrap();
        let mut seen = vec![];
        t.register_worker(g, 0, 12, 5, |pid| pid != 10, |f| seen.push(f)).unwrap();
        assert_eq!(seen, vec![Finding::Crashed { pid: 10, slot: 0, generation: g }]);
        let dead = t.workers().find(|w| w.pid == 10).unwrap();
        assert_eq!((dead.state, dead.replaced_by, dead.ended_ms), (WorkerState::Crashed, 12, 5));
        assert_eq!(t.live_count(g), 2);
    }

    #[test]
    fn hang_then_recovery() {
        let t = table();
        let g = t.begin_generation(1, 1, 0, 1);
        let i = t.register_worker(g, 0, 10, 0, |_| true, |_| {}).unwrap();
        let mut seen = vec![];
        t.check(1000, 5000, |_| true, |f| seen.push(f));
        assert!(seen.is_empty());
        t.check(6000, 5000, |_| true, |f| seen.push(f));
        assert_eq!(seen, vec![Finding::Hung { pid: 10, slot: 0, generation: g, late_ms: 6000 }]);
        assert_eq!(t.live_count(g), 1, "a hung worker still counts as live");
        assert!(t.heartbeat(i, 10, 7000));
        assert!(!t.heartbeat(i, 10, 8000));
        assert_eq!(t.workers().next().unwrap().state, WorkerState::Running);
    }

    #[test]
    fn exited_records_are_recycled_oldest_first() {
        let t = table();
        let g = t.begin_generation(1, 1, 0, 1);
        for n in 0..MAX_WORKER_RECORDS as i32 {
            let i = t.register_worker(g, 0, 1000 + n, 0, |_| true, |_| {}).unwrap();
            t.exit_worker(i, 1000 + n, 100 + n as u64);
        }
        let i = t.register_worker(g, 0, 5000, 0, |_| true, |_| {}).unwrap();
        assert_eq!(i, 0, "the record that ended first is reused");
        assert_eq!(t.workers().count(), MAX_WORKER_RECORDS);
    }

    #[test]
    fn manager_counts_see_starts_crashes_and_neighbours() {
        let t = table();
        let g1 = t.begin_generation(1, 2, 0, 1);
        let a = t.register_worker(g1, 0, 10, 0, |_| true, |_| {}).unwrap();
        t.register_worker(g1, 1, 11, 0, |_| true, |_| {}).unwrap();
        assert_eq!(t.manager_counts(g1, 0, 5000), (None, 0, None));
        t.set_flags(a, 10, FLAG_MANAGED);
        t.set_flags(a, 99, FLAG_MANAGED); // not its record: ignored
        assert_eq!(t.manager_counts(g1, 0, 5000), (None, 1, None));
        let b = t.register_worker(g1, 1, 12, 0, |p| p != 11, |_| {}).unwrap();
        t.set_flags(b, 12, FLAG_MANAGED);
        // 11 was never managed: the respawn counts 2, not 3.
        assert_eq!(t.manager_counts(g1, 100, 5000).1, 2);
        let g2 = t.begin_generation(1, 2, 200, 1);
        assert_eq!(t.manager_counts(g1, 200, 5000), (None, 2, Some(0)));
        assert_eq!(t.manager_counts(g2, 200, 5000), (Some(2), 0, None));
    }

    #[test]
    fn crashed_managed_worker_counts_until_failed_expires() {
        let t = table();
        let g = t.begin_generation(1, 1, 0, 1);
        let a = t.register_worker(g, 0, 10, 0, |_| true, |_| {}).unwrap();
        t.set_flags(a, 10, FLAG_MANAGED);
        let b = t.register_worker(g, 0, 11, 1000, |p| p != 10, |_| {}).unwrap();
        t.set_flags(b, 11, FLAG_MANAGED);
        assert_eq!(t.managed_count(g, 1000, 5000), 2, "a respawn sees n_mine above the worker count");
        assert_eq!(t.managed_count(g, 7000, 5000), 1);
    }

    #[test]
    fn manager_lock_and_master_start_claim() {
        let t = table();
        assert!(t.try_lock(10, |_| true));
        assert!(!t.try_lock(11, |_| true));
        assert!(t.try_lock(11, |p| p != 10), "a dead owner's lock is taken over");
        t.unlock(10);
        assert!(!t.try_lock(12, |_| true), "only the owner unlocks");
        t.unlock(11);
        assert!(t.try_lock(12, |_| true));
        assert!(t.claim_master_start(1));
        assert!(!t.claim_master_start(1));
        assert!(t.claim_master_start(3));
        assert!(!t.claim_master_start(2));
    }

    #[test]
    fn table_full_of_live_workers_refuses() {
        let t = table();
        let g = t.begin_generation(1, 1, 0, 1);
        for n in 0..MAX_WORKER_RECORDS as u32 {
            assert!(t.register_worker(g, n, 10 + n as i32, 0, |_| true, |_| {}).is_some());
        }
        assert!(t.register_worker(g, 999, 9999, 0, |_| true, |_| {}).is_none());
    }
}
