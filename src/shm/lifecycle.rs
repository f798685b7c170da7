//! The lifecycle table: configuration generations and worker records.
//!
//! One table per node, in the primary zone. The master writes a generation
//! record on every configuration load (it is the only writer of those); each
//! worker reserves a worker record when it starts and keeps its heartbeat in it.
//! Every transition is a single compare-and-swap on `state`, so a process
//! that dies at any instruction leaves at worst a record in a state another
//! process can still judge (its pid is gone, its heartbeat is old).
//!
//! resty.worker.manager's policy over this table (its flags, counts, lock
//! and once-per-generation callbacks) is in manager.rs; the fields it keeps
//! here are marked as its.

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Generation records kept: the newest ones, indexed by `generation % N`.
pub const MAX_GENERATIONS: usize = 16;
/// Most worker records a table can have (one ring reader each, and the
/// ring's limit is this).
pub const MAX_WORKER_RECORDS: usize = 1024;
/// Fewest worker records a table has, whatever the worker count: history.
pub const MIN_WORKER_RECORDS: usize = 64;
/// The `slot` of OpenResty's privileged agent's record: the agent is no
/// worker slot (nginx gives it none), yet it is tracked like a worker
/// (heartbeat, crash and hang, a ring reader), and a respawned agent is
/// known as such by this slot. Never counted among a generation's workers.
pub const AGENT_SLOT: u32 = u32::MAX;
/// Event-ring readers per worker record: one per Lua VM a process can run
/// (lua-nginx-module's for http, stream-lua's for stream), so that each VM
/// reads the ring with its own cursor. Record `i`'s reader for VM `v` is
/// `v * records + i` (the http readers keep the record's own index).
pub const READERS_PER_RECORD: usize = 2;

/// Worker records for `worker_processes`: four per worker (the running
/// generation, one draining after a reload, and a second reload in flight),
/// at least MIN_WORKER_RECORDS. Ended records are recycled oldest first.
pub const fn records_for(worker_processes: usize) -> usize {
    let n = worker_processes.saturating_mul(4);
    let n = if n < MIN_WORKER_RECORDS { MIN_WORKER_RECORDS } else { n };
    if n > MAX_WORKER_RECORDS { MAX_WORKER_RECORDS } else { n }
}

/// Records a configuration needs at the least: its own workers and as many
/// of the generation it replaces, draining.
pub const fn records_needed(worker_processes: usize) -> usize {
    worker_processes.saturating_mul(2)
}

/// Low bits of a record's state word: the WorkerState. A Reserved word also
/// carries the reserver's pid above them (Linux pids are below 2^22), so that
/// one compare-and-swap both reserves the record and names who reserved it.
const STATE_BITS: u32 = 3;
const STATE_MASK: u32 = (1 << STATE_BITS) - 1;

fn reserve_word(pid: i32) -> u32 {
    ((pid as u32) << STATE_BITS) | WorkerState::Reserved as u32
}

fn reserver(word: u32) -> i32 {
    (word >> STATE_BITS) as i32
}

/// A worker record's state.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    Free = 0,
    /// Being filled by the process that reserved it; invisible to readers.
    Reserved = 1,
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
        // The bits above STATE_BITS hold a reserver's pid (Reserved only).
        match v & STATE_MASK {
            1 => WorkerState::Reserved,
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
            WorkerState::Reserved => "starting",
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
    /// GEN_* bits: resty.worker.manager's once-per-generation callbacks (taken once).
    pub manager: AtomicU32,
    _pad: u32,
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
    /// Monotonic milliseconds (CLOCK_MONOTONIC, system-wide), never the
    /// wall clock: an NTP step must not make a worker look hung or dead.
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
    /// Newest generation whose "master start" callback was taken.
    pub master_started: AtomicU64,
    /// Hang timeout set from Lua (resty.worker.manager's `failed`), 0 = the
    /// directive's. Reset by every configuration load: a configuration that
    /// no longer sets it gets the directive's back.
    pub hang_timeout_ms: AtomicU64,
    pub gens: [GenRecord; MAX_GENERATIONS],
    /// The worker records: `records_n` of them at `records_off` bytes from
    /// this struct (a part of the zone sized from worker_processes).
    records_off: u64,
    records_n: u32,
    _pad: u32,
}

/// A worker's record, and whether it replaces an earlier worker of its
/// slot and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registered {
    pub index: usize,
    pub respawn: bool,
}

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
    /// FLAG_* bits.
    pub flags: u32,
}

impl WorkerView {
    /// The record of OpenResty's privileged agent, not of a worker.
    pub fn is_agent(&self) -> bool {
        self.slot == AGENT_SLOT
    }
}

/// Copy of one generation record.
#[derive(Clone, Copy, Debug)]
pub struct GenView {
    pub generation: u64,
    pub master_pid: i32,
    pub worker_count: u32,
    pub started_ms: u64,
}

pub use super::pid::alive as pid_alive;

impl Lifecycle {
    /// Called once on a fresh (zero-filled) zone.
    pub fn init(&self, master_pid: i32, now_ms: u64) {
        // Relaxed: the zone is not shared with any other process yet.
        self.node_started_ms.store(now_ms, Ordering::Relaxed);
        self.node_master_pid.store(master_pid, Ordering::Relaxed);
    }

    /// A new configuration load; master only, so it has no concurrent writer.
    /// (Where its workers start reading each zone's ring is the zone
    /// header's `first_seq`.)
    pub fn begin_generation(&self, master_pid: i32, worker_count: u32, now_ms: u64) -> u64 {
        // Relaxed: the master is this field's only writer.
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        let rec = &self.gens[(generation as usize) % MAX_GENERATIONS];
        rec.generation.store(0, Ordering::Relaxed);
        rec.master_pid.store(master_pid, Ordering::Relaxed);
        rec.worker_count.store(worker_count, Ordering::Relaxed);
        rec.started_ms.store(now_ms, Ordering::Relaxed);
        rec.manager.store(0, Ordering::Relaxed);
        // Relaxed: a setting; the new generation's workers set it again if they want it.
        self.hang_timeout_ms.store(0, Ordering::Relaxed);
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
        })
    }

    /// The tests' shorthand for `register`: the reserved record's index.
    #[cfg(test)]
    pub fn register_worker(
        &self,
        generation: u64,
        slot: u32,
        pid: i32,
        now_ms: u64,
        alive: impl Fn(i32) -> bool,
        found: impl FnMut(Finding),
    ) -> Option<usize> {
        self.register(generation, slot, pid, now_ms, alive, found).map(|r| r.index)
    }

    /// A worker starts in `slot` of `generation`. It is a respawn whenever
    /// a record of the same generation and slot with another pid exists,
    /// whoever judged that record: live records whose pid is gone are marked
    /// crashed here (the master only respawns a slot after reaping its
    /// previous worker) and reported through `found`; records a sibling's
    /// heartbeat already marked crashed get their `replaced_by` too. Returns
    /// the reserved record and whether the worker replaces an earlier one of
    /// its slot and generation (it must not replay their events), or None
    /// when every record is live.
    pub fn register(
        &self,
        generation: u64,
        slot: u32,
        pid: i32,
        now_ms: u64,
        alive: impl Fn(i32) -> bool,
        mut found: impl FnMut(Finding),
    ) -> Option<Registered> {
        let mut respawn = false;
        for rec in self.records() {
            let st = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            if matches!(st, WorkerState::Free | WorkerState::Reserved)
                || rec.generation.load(Ordering::Relaxed) != generation
                || rec.slot.load(Ordering::Relaxed) != slot
            {
                continue;
            }
            let old = rec.pid.load(Ordering::Relaxed);
            if old == pid {
                continue;
            }
            // Any earlier worker of this slot and generation, alive or not,
            // live or ended, makes this one a respawn.
            respawn = true;
            if st.is_live() {
                if alive(old) || !self.end(rec, st, WorkerState::Crashed, now_ms) {
                    continue;
                }
                found(Finding::Crashed { pid: old, slot, generation });
            }
            if st != WorkerState::Exited {
                // Relaxed: informational, read together with the state. The
                // CAS keeps the first heir when two respawns raced.
                let _ = rec.replaced_by.compare_exchange(0, pid, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
        let index = self.reserve_record(pid, &alive)?;
        let rec = &self.records()[index];
        // Relaxed: the record is invisible (Reserved) until the Release below.
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
        Some(Registered { index, respawn })
    }

    /// The worker records (in use or not), in table order.
    pub fn records(&self) -> &[WorkerRecord] {
        let n = self.records_n as usize;
        if n == 0 {
            return &[];
        }
        let p = (self as *const Lifecycle as *const u8).wrapping_add(self.records_off as usize);
        // SAFETY: attach_records stored the offset and count of a zeroed,
        // aligned array of n records living in the same mapping as self.
        unsafe { core::slice::from_raw_parts(p.cast::<WorkerRecord>(), n) }
    }

    /// Bytes for `n` worker records.
    pub const fn records_size(n: usize) -> usize {
        n * size_of::<WorkerRecord>()
    }

    /// Links a fresh table to its worker records: `n` zeroed records at `p`,
    /// in the same shared mapping as the table.
    ///
    /// # Safety
    /// `p` must be 8-aligned, zeroed, valid for records_size(n) bytes, and
    /// stay mapped (at the same distance from self) as long as the table.
    pub unsafe fn attach_records(&mut self, p: *mut u8, n: usize) {
        self.records_off = (p as usize).wrapping_sub(self as *const Lifecycle as usize) as u64;
        self.records_n = n as u32;
    }

    /// How many worker records the table has.
    pub fn record_count(&self) -> usize {
        self.records_n as usize
    }

    /// A free record (or one whose reserver died before publishing it),
    /// else the ended record that ended first. The reserve word carries the
    /// reserver's pid, so a reservation left by a dead process is seen as such.
    fn reserve_record(&self, pid: i32, alive: impl Fn(i32) -> bool) -> Option<usize> {
        let mine = reserve_word(pid);
        for _ in 0..8 {
            let mut oldest: Option<(usize, u32, u64)> = None;
            for (i, rec) in self.records().iter().enumerate() {
                let raw = rec.state.load(Ordering::Acquire);
                let st = WorkerState::from_u32(raw);
                if st == WorkerState::Free || (st == WorkerState::Reserved && !alive(reserver(raw))) {
                    // AcqRel: the winner owns the record's fields.
                    if rec.state.compare_exchange(raw, mine, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
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
            if self.records()[i].state.compare_exchange(raw, mine, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return Some(i);
            }
        }
        None
    }

    fn end(&self, rec: &WorkerRecord, from: WorkerState, to: WorkerState, now_ms: u64) -> bool {
        // AcqRel: only one process may end a record, and it publishes ended_ms after.
        let won = rec.state.compare_exchange(from as u32, to as u32, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if won {
            rec.ended_ms.store(now_ms, Ordering::Relaxed);
        }
        won
    }

    /// The worker's own heartbeat. Returns true when it was marked hung and
    /// is now running again.
    pub fn heartbeat(&self, index: usize, pid: i32, now_ms: u64) -> bool {
        let Some(rec) = self.records().get(index) else { return false };
        if rec.pid.load(Ordering::Relaxed) != pid {
            return false;
        }
        // Relaxed: a single timestamp, judged with slack of whole seconds.
        rec.heartbeat_ms.store(now_ms, Ordering::Relaxed);
        // AcqRel: races with another worker's check marking it hung.
        rec.state
            .compare_exchange(
                WorkerState::Hung as u32,
                WorkerState::Running as u32,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// The heartbeat last stamped in record `index`.
    pub fn heartbeat_of(&self, index: usize) -> Option<u64> {
        // Relaxed: a single timestamp (see heartbeat).
        self.records().get(index).map(|rec| rec.heartbeat_ms.load(Ordering::Relaxed))
    }

    /// The worker leaves through exit_process.
    pub fn exit_worker(&self, index: usize, pid: i32, now_ms: u64) {
        let Some(rec) = self.records().get(index) else { return };
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
    /// A record reserved by a process that died before publishing it is freed.
    pub fn check(&self, now_ms: u64, hang_ms: u64, alive: impl Fn(i32) -> bool, mut found: impl FnMut(Finding)) {
        for rec in self.records() {
            let raw = rec.state.load(Ordering::Acquire);
            let st = WorkerState::from_u32(raw);
            if st == WorkerState::Reserved && !alive(reserver(raw)) {
                // Relaxed: the record holds nothing anyone reads; a racing reservation wins or we do.
                let _ = rec.state.compare_exchange(raw, WorkerState::Free as u32, Ordering::Relaxed, Ordering::Relaxed);
                continue;
            }
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

    /// Live workers of `generation` (running or hung); the privileged agent is no worker.
    pub fn live_count(&self, generation: u64) -> u32 {
        self.workers().filter(|w| w.generation == generation && w.state.is_live() && !w.is_agent()).count() as u32
    }

    /// Every record in use, in table order.
    pub fn workers(&self) -> impl Iterator<Item = WorkerView> + '_ {
        self.records().iter().enumerate().filter_map(|(index, rec)| {
            let state = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            if matches!(state, WorkerState::Free | WorkerState::Reserved) {
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
                flags: rec.flags.load(Ordering::Relaxed),
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
pub(crate) mod tests {
    use super::*;

    /// Records in the tables of these tests.
    const RECORDS: usize = 128;

    /// A table and its records in one zeroed, leaked allocation.
    pub(crate) fn table() -> &'static Lifecycle {
        let words = (size_of::<Lifecycle>() + Lifecycle::records_size(RECORDS)).div_ceil(8);
        let mem: &'static mut [u64] = Box::leak(vec![0u64; words].into_boxed_slice());
        let p = mem.as_mut_ptr().cast::<u8>();
        // SAFETY: all-zero is a valid Lifecycle; the records follow it in the same allocation.
        unsafe {
            let t = &mut *p.cast::<Lifecycle>();
            t.attach_records(p.add(size_of::<Lifecycle>()), RECORDS);
            t
        }
    }

    #[test]
    fn records_follow_the_worker_count() {
        assert_eq!(records_for(1), MIN_WORKER_RECORDS);
        assert_eq!(records_for(32), 128);
        assert_eq!(records_for(200), 800);
        assert_eq!(records_for(600), MAX_WORKER_RECORDS);
        assert_eq!(records_needed(512), MAX_WORKER_RECORDS);
        let t = table();
        assert_eq!((t.record_count(), t.records().len()), (RECORDS, RECORDS));
    }

    #[test]
    fn generations_count_up_and_wrap() {
        let t = table();
        for g in 1..=20 {
            assert_eq!(t.begin_generation(100, 4, g * 10), g);
        }
        let gens = t.generations();
        assert_eq!(gens.len(), MAX_GENERATIONS);
        assert_eq!(gens.first().map(|g| g.generation), Some(5));
        assert_eq!(gens.last().map(|g| (g.generation, g.started_ms)), Some((20, 200)));
        assert!(t.generation(4).is_none());
    }

    #[test]
    fn respawn_in_same_slot_marks_dead_pid_crashed() {
        let t = table();
        let g = t.begin_generation(1, 2, 0);
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
    fn respawn_is_known_when_a_sibling_marked_the_dead_record_first() {
        let t = table();
        let g = t.begin_generation(1, 2, 0);
        let first = t.register(g, 0, 10, 0, alive, |_| {}).unwrap();
        assert!(!first.respawn, "the slot's first worker of its generation");
        t.register(g, 1, 11, 0, alive, |_| {}).unwrap();
        // 10 dies; a sibling's heartbeat judges it before the respawn starts.
        let mut seen = vec![];
        t.check(100, 5000, |p| p != 10, |f| seen.push(f));
        assert_eq!(seen, vec![Finding::Crashed { pid: 10, slot: 0, generation: g }]);
        let mut again = vec![];
        let heir = t.register(g, 0, 12, 200, |p| p != 10, |f| again.push(f)).unwrap();
        assert!(heir.respawn, "a record of its generation and slot exists: a respawn");
        assert!(again.is_empty(), "the crash was reported once, by the sibling");
        assert_eq!(t.workers().find(|w| w.pid == 10).unwrap().replaced_by, 12);
        // A new generation's worker in slot 0 is no respawn.
        let g2 = t.begin_generation(1, 2, 300);
        assert!(!t.register(g2, 0, 20, 300, alive, |_| {}).unwrap().respawn);
    }

    #[test]
    fn hang_then_recovery() {
        let t = table();
        let g = t.begin_generation(1, 1, 0);
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
        let g = t.begin_generation(1, 1, 0);
        for n in 0..RECORDS as i32 {
            let i = t.register_worker(g, 0, 1000 + n, 0, |_| true, |_| {}).unwrap();
            t.exit_worker(i, 1000 + n, 100 + n as u64);
        }
        let i = t.register_worker(g, 0, 5000, 0, |_| true, |_| {}).unwrap();
        assert_eq!(i, 0, "the record that ended first is reused");
        assert_eq!(t.workers().count(), RECORDS);
    }

    pub(crate) fn alive(_: i32) -> bool {
        true
    }

    #[test]
    fn a_configuration_load_resets_the_hang_timeout_override() {
        let t = table();
        t.begin_generation(1, 1, 0);
        t.hang_timeout_ms.store(1000, Ordering::Relaxed);
        t.begin_generation(1, 1, 0);
        assert_eq!(t.hang_timeout_ms.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_record_whose_reserver_died_before_publishing_is_reused() {
        let t = table();
        let g = t.begin_generation(1, 1, 0);
        // pid 77 reserves a record and dies before publishing it.
        let stuck = t.reserve_record(77, alive).unwrap();
        assert_eq!(WorkerState::from_u32(t.records()[stuck].state.load(Ordering::Relaxed)), WorkerState::Reserved);
        for n in 1..RECORDS as u32 {
            assert!(t.register_worker(g, n, 100 + n as i32, 0, alive, |_| {}).is_some());
        }
        let dead77 = |p: i32| p != 77;
        assert_eq!(t.register_worker(g, 0, 5000, 0, dead77, |_| {}), Some(stuck), "the dead reservation is taken over");
        // The heartbeat check frees such a record too.
        let t = table();
        let stuck = t.reserve_record(78, alive).unwrap();
        t.check(0, 5000, |p| p != 78, |_| {});
        assert_eq!(WorkerState::from_u32(t.records()[stuck].state.load(Ordering::Relaxed)), WorkerState::Free);
        let live = t.reserve_record(79, alive).unwrap();
        t.check(0, 5000, alive, |_| {});
        assert_eq!(WorkerState::from_u32(t.records()[live].state.load(Ordering::Relaxed)), WorkerState::Reserved);
    }

    #[test]
    fn the_privileged_agent_is_tracked_but_not_counted_as_a_worker() {
        let t = table();
        let g = t.begin_generation(1, 2, 0);
        t.register(g, 0, 10, 0, alive, |_| {}).unwrap();
        t.register(g, 1, 11, 0, alive, |_| {}).unwrap();
        let agent = t.register(g, AGENT_SLOT, 12, 0, alive, |_| {}).unwrap();
        assert!(!agent.respawn);
        assert_eq!(t.live_count(g), 2, "the agent is not a worker of the generation");
        let v = t.workers().find(|w| w.pid == 12).unwrap();
        assert!(v.is_agent() && v.state == WorkerState::Running);
        // Gone without exiting: seen crashed like a worker, and its respawn
        // (the master restarts the agent) is a respawn of the agent, not of slot 0.
        let mut seen = vec![];
        let heir = t.register(g, AGENT_SLOT, 13, 5, |p| p != 12, |f| seen.push(f)).unwrap();
        assert!(heir.respawn);
        assert_eq!(seen, vec![Finding::Crashed { pid: 12, slot: AGENT_SLOT, generation: g }]);
        assert_eq!(t.live_count(g), 2);
        // Hung like a worker.
        let mut hung = vec![];
        t.check(10_000, 5000, alive, |f| hung.push(f));
        assert!(hung.iter().any(|f| matches!(f, Finding::Hung { pid: 13, slot: AGENT_SLOT, .. })));
    }

    #[test]
    fn table_full_of_live_workers_refuses() {
        let t = table();
        let g = t.begin_generation(1, 1, 0);
        for n in 0..RECORDS as u32 {
            assert!(t.register_worker(g, n, 10 + n as i32, 0, |_| true, |_| {}).is_some());
        }
        assert!(t.register_worker(g, 999, 9999, 0, |_| true, |_| {}).is_none());
    }
}
