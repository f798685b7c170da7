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
/// Most worker records a table can have (one ring reader each, and the
/// ring's limit is this).
pub const MAX_WORKER_RECORDS: usize = 1024;
/// Fewest worker records a table has, whatever the worker count: history.
pub const MIN_WORKER_RECORDS: usize = 64;

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

/// Low bits of a record's state word: the WorkerState. A Claiming word also
/// carries the claimer's pid above them (Linux pids are below 2^22), so that
/// one compare-and-swap both claims the record and names who claimed it.
const STATE_BITS: u32 = 3;
const STATE_MASK: u32 = (1 << STATE_BITS) - 1;

fn claim_word(pid: i32) -> u32 {
    ((pid as u32) << STATE_BITS) | WorkerState::Claiming as u32
}

fn claimer(word: u32) -> i32 {
    (word >> STATE_BITS) as i32
}

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
        // The bits above STATE_BITS hold a claimer's pid (Claiming only).
        match v & STATE_MASK {
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
    /// GEN_* bits: resty.worker.manager's once-per-generation claims.
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
    /// Newest generation whose "master start" callback was claimed.
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

/// The worker's start was seen by resty.worker.manager (it counts in n_mine).
pub const FLAG_MANAGED: u32 = 1;
/// The worker ran its manager exit: it no longer counts anywhere, although
/// the process lives on (draining requests) until exit_process.
pub const FLAG_LEFT: u32 = 2;

/// GenRecord::manager: the generation's "master start" callback was claimed.
pub const GEN_MASTER_STARTED: u32 = 1;
/// GenRecord::manager: the generation's "master exit" callback was claimed.
pub const GEN_MASTER_EXITED: u32 = 2;

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

    /// The tests' shorthand for `register`: the claimed record's index.
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
    /// the claimed record and whether the worker replaces an earlier one of
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
            if matches!(st, WorkerState::Free | WorkerState::Claiming)
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
        let index = self.claim_record(pid, &alive)?;
        let rec = &self.records()[index];
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

    /// A free record (or one whose claimer died before publishing it),
    /// else the ended record that ended first. The claim word carries the
    /// claimer's pid, so a claim left by a dead process is seen as such.
    fn claim_record(&self, pid: i32, alive: impl Fn(i32) -> bool) -> Option<usize> {
        let mine = claim_word(pid);
        for _ in 0..8 {
            let mut oldest: Option<(usize, u32, u64)> = None;
            for (i, rec) in self.records().iter().enumerate() {
                let raw = rec.state.load(Ordering::Acquire);
                let st = WorkerState::from_u32(raw);
                if st == WorkerState::Free || (st == WorkerState::Claiming && !alive(claimer(raw))) {
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
    /// A record claimed by a process that died before publishing it is freed.
    pub fn check(&self, now_ms: u64, hang_ms: u64, alive: impl Fn(i32) -> bool, mut found: impl FnMut(Finding)) {
        for rec in self.records() {
            let raw = rec.state.load(Ordering::Acquire);
            let st = WorkerState::from_u32(raw);
            if st == WorkerState::Claiming && !alive(claimer(raw)) {
                // Relaxed: the record holds nothing anyone reads; a racing claim wins or we do.
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

    /// Sets FLAG_* bits on this worker's own record.
    pub fn set_flags(&self, index: usize, pid: i32, bits: u32) {
        let Some(rec) = self.records().get(index) else { return };
        if rec.pid.load(Ordering::Relaxed) == pid {
            // Relaxed: read by the counts under the manager lock, whose
            // Release/Acquire pair orders it for the next holder.
            rec.flags.fetch_or(bits, Ordering::Relaxed);
        }
    }

    /// Takes the manager lock for `pid`; a lock whose owner is gone is taken
    /// over. Not reentrant: a process that holds it gets false, so two light
    /// threads of one worker exclude each other too.
    pub fn try_lock(&self, pid: i32, alive: impl Fn(i32) -> bool) -> bool {
        // Acquire on success: what the previous holder wrote is visible.
        match self.manager_lock.compare_exchange(0, pid, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => true,
            Err(owner) if owner != pid && !alive(owner) => {
                // Acquire: as above; one waiter wins the takeover.
                self.manager_lock.compare_exchange(owner, pid, Ordering::Acquire, Ordering::Relaxed).is_ok()
            }
            Err(_) => false,
        }
    }

    pub fn unlock(&self, pid: i32) {
        // Release: the holder's writes are visible to the next holder. The
        // CAS leaves alone a lock that was taken over meanwhile.
        let _ = self.manager_lock.compare_exchange(pid, 0, Ordering::Release, Ordering::Relaxed);
    }

    /// The pid holding the manager lock, 0 if none.
    pub fn lock_owner(&self) -> i32 {
        // Relaxed: a snapshot for diagnostics.
        self.manager_lock.load(Ordering::Relaxed)
    }

    /// GEN_* bits of `generation`, None when it is not (or no longer) in the table.
    pub fn gen_flags(&self, generation: u64) -> Option<u32> {
        let rec = &self.gens[(generation as usize) % MAX_GENERATIONS];
        // Acquire: pairs with the Release in begin_generation (the bits were reset before).
        if generation == 0 || rec.generation.load(Ordering::Acquire) != generation {
            return None;
        }
        // Acquire: pairs with the AcqRel of the claim.
        Some(rec.manager.load(Ordering::Acquire))
    }

    /// True for exactly one caller per generation and bit.
    pub fn claim_gen(&self, generation: u64, bit: u32) -> bool {
        let rec = &self.gens[(generation as usize) % MAX_GENERATIONS];
        // Acquire: pairs with the Release in begin_generation.
        if generation == 0 || rec.generation.load(Ordering::Acquire) != generation {
            return false;
        }
        // AcqRel: the one caller that sets the bit wins, and sees earlier claims.
        rec.manager.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// True for exactly one caller per generation: it runs "master start".
    pub fn claim_master_start(&self, generation: u64) -> bool {
        if !self.claim_gen(generation, GEN_MASTER_STARTED) {
            return false;
        }
        // AcqRel: a newest-claimed watermark, for diagnostics.
        self.master_started.fetch_max(generation, Ordering::AcqRel);
        true
    }

    /// True for exactly one caller per generation: it runs "master exit".
    pub fn claim_master_exit(&self, generation: u64) -> bool {
        self.claim_gen(generation, GEN_MASTER_EXITED)
    }

    /// Workers of `generation` the manager saw start and that have neither
    /// left nor died, plus, when `failed_ms` > 0, those that died less than
    /// `failed_ms` ago (as in the original, which only noticed a crash once
    /// its heartbeat expired: a respawned worker sees n_mine above the
    /// worker count). A live record whose pid is gone counts as a crash of now.
    pub fn managed_count(&self, generation: u64, now_ms: u64, failed_ms: u64, alive: impl Fn(i32) -> bool) -> u32 {
        let mut n = 0;
        for rec in self.records() {
            // Acquire: pairs with the Release that published the record.
            let st = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            // Relaxed: fields of a published record; counts are taken under the manager lock.
            let flags = rec.flags.load(Ordering::Relaxed);
            if rec.generation.load(Ordering::Relaxed) != generation
                || flags & FLAG_MANAGED == 0
                || flags & FLAG_LEFT != 0
            {
                continue;
            }
            let counts = if st.is_live() {
                alive(rec.pid.load(Ordering::Relaxed)) || failed_ms > 0
            } else {
                st == WorkerState::Crashed
                    && failed_ms > 0
                    && now_ms.saturating_sub(rec.ended_ms.load(Ordering::Relaxed)) < failed_ms
            };
            n += u32::from(counts);
        }
        n
    }

    /// Workers running in generations that `include` selects: live in the
    /// table, pid alive, and not gone through their manager exit.
    fn running_where(&self, include: impl Fn(u64) -> bool, alive: impl Fn(i32) -> bool) -> u32 {
        let mut n = 0;
        for rec in self.records() {
            // Acquire: pairs with the Release that published the record.
            let st = WorkerState::from_u32(rec.state.load(Ordering::Acquire));
            // Relaxed: fields of a published record.
            if st.is_live()
                && include(rec.generation.load(Ordering::Relaxed))
                && rec.flags.load(Ordering::Relaxed) & FLAG_LEFT == 0
                && alive(rec.pid.load(Ordering::Relaxed))
            {
                n += 1;
            }
        }
        n
    }

    /// (n_prev, n_mine, n_next) as resty.worker.manager's callbacks get
    /// them. n_prev: workers still running from older generations, None in
    /// the node's first generation (a fresh start). n_next: workers running
    /// in newer generations, None while `generation` is the newest.
    pub fn manager_counts(
        &self,
        generation: u64,
        now_ms: u64,
        failed_ms: u64,
        alive: impl Fn(i32) -> bool + Copy,
    ) -> (Option<u32>, u32, Option<u32>) {
        let prev = (generation > 1).then(|| self.running_where(|g| g < generation, alive));
        let next = (self.current_generation() > generation).then(|| self.running_where(|g| g > generation, alive));
        (prev, self.managed_count(generation, now_ms, failed_ms, alive), next)
    }

    /// Live workers of `generation` (running or hung).
    pub fn live_count(&self, generation: u64) -> u32 {
        self.workers().filter(|w| w.generation == generation && w.state.is_live()).count() as u32
    }

    /// Every record in use, in table order.
    pub fn workers(&self) -> impl Iterator<Item = WorkerView> + '_ {
        self.records().iter().enumerate().filter_map(|(index, rec)| {
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
mod tests {
    use super::*;
    use crate::shm::testing::{Shm, fork, wait};

    /// Records in the tables of these tests.
    const RECORDS: usize = 128;

    /// A table and its records in one zeroed, leaked allocation.
    fn table() -> &'static Lifecycle {
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

    fn alive(_: i32) -> bool {
        true
    }

    #[test]
    fn manager_counts_see_starts_crashes_and_neighbours() {
        let t = table();
        let g1 = t.begin_generation(1, 2, 0);
        let a = t.register_worker(g1, 0, 10, 0, alive, |_| {}).unwrap();
        t.register_worker(g1, 1, 11, 0, alive, |_| {}).unwrap();
        assert_eq!(t.manager_counts(g1, 0, 5000, alive), (None, 0, None), "first generation: no n_prev");
        t.set_flags(a, 10, FLAG_MANAGED);
        t.set_flags(a, 99, FLAG_MANAGED); // not its record: ignored
        assert_eq!(t.manager_counts(g1, 0, 5000, alive), (None, 1, None));
        let b = t.register_worker(g1, 1, 12, 0, |p| p != 11, |_| {}).unwrap();
        t.set_flags(b, 12, FLAG_MANAGED);
        // 11 was never managed: the respawn counts 2, not 3.
        assert_eq!(t.manager_counts(g1, 100, 5000, alive).1, 2);
        let g2 = t.begin_generation(1, 2, 200);
        assert_eq!(t.manager_counts(g1, 200, 5000, alive), (None, 2, Some(0)));
        assert_eq!(t.manager_counts(g2, 200, 5000, alive), (Some(2), 0, None));
        let c = t.register_worker(g2, 0, 20, 300, alive, |_| {}).unwrap();
        t.set_flags(c, 20, FLAG_MANAGED);
        assert_eq!(t.manager_counts(g1, 300, 5000, alive), (None, 2, Some(1)));
        // An old worker runs its manager exit: it counts nowhere from then on.
        t.set_flags(a, 10, FLAG_LEFT);
        assert_eq!(t.manager_counts(g1, 300, 5000, alive), (None, 1, Some(1)));
        assert_eq!(t.manager_counts(g2, 300, 5000, alive), (Some(1), 1, None));
        assert_eq!(t.live_count(g1), 2, "the module's own view: the process still runs");
    }

    #[test]
    fn crashed_managed_worker_counts_until_failed_expires() {
        let t = table();
        let g = t.begin_generation(1, 1, 0);
        let a = t.register_worker(g, 0, 10, 0, alive, |_| {}).unwrap();
        t.set_flags(a, 10, FLAG_MANAGED);
        let b = t.register_worker(g, 0, 11, 1000, |p| p != 10, |_| {}).unwrap();
        t.set_flags(b, 11, FLAG_MANAGED);
        assert_eq!(t.managed_count(g, 1000, 5000, alive), 2, "a respawn sees n_mine above the worker count");
        assert_eq!(t.managed_count(g, 7000, 5000, alive), 1);
        assert_eq!(t.managed_count(g, 1000, 0, alive), 1, "without `failed`, only the living count");
    }

    #[test]
    fn dead_pid_not_yet_judged_counts_as_crashed_now() {
        let t = table();
        let g = t.begin_generation(1, 2, 0);
        for (slot, pid) in [(0, 10), (1, 11)] {
            let i = t.register_worker(g, slot, pid, 0, alive, |_| {}).unwrap();
            t.set_flags(i, pid, FLAG_MANAGED);
        }
        let g2 = t.begin_generation(1, 2, 0);
        // 11 was killed; no heartbeat or respawn has marked it yet.
        let dead = |p: i32| p != 11;
        assert_eq!(t.managed_count(g, 0, 5000, dead), 2, "a start still sees it (within `failed`)");
        assert_eq!(t.managed_count(g, 0, 0, dead), 1, "an exit does not: the last worker is the last");
        assert_eq!(t.manager_counts(g2, 0, 5000, dead).0, Some(1));
    }

    #[test]
    fn manager_lock_excludes_everyone_else_and_is_taken_from_the_dead() {
        let t = table();
        assert!(t.try_lock(10, alive));
        assert!(!t.try_lock(10, alive), "not reentrant: a second light thread of 10 waits");
        assert!(!t.try_lock(11, alive));
        assert!(t.try_lock(11, |p| p != 10), "a dead owner's lock is taken over");
        assert_eq!(t.lock_owner(), 11);
        t.unlock(10);
        assert!(!t.try_lock(12, alive), "only the owner unlocks");
        t.unlock(11);
        assert!(t.try_lock(12, alive));
    }

    #[test]
    fn master_start_and_exit_are_claimed_once_per_generation() {
        let t = table();
        assert!(!t.claim_master_start(1), "a generation not in the table cannot be claimed");
        for _ in 0..3 {
            t.begin_generation(1, 1, 0);
        }
        assert!(t.claim_master_start(3));
        assert!(!t.claim_master_start(3));
        // A quick double reload: generation 2's claim still works after 3's.
        assert!(t.claim_master_start(2));
        assert_eq!(t.master_started.load(Ordering::Relaxed), 3);
        assert_eq!(t.gen_flags(2), Some(GEN_MASTER_STARTED));
        assert!(t.claim_master_exit(2));
        assert!(!t.claim_master_exit(2));
        assert_eq!(t.gen_flags(2), Some(GEN_MASTER_STARTED | GEN_MASTER_EXITED));
        assert_eq!(t.gen_flags(1), Some(0));
        assert_eq!(t.gen_flags(4), None);
        // The record is reused MAX_GENERATIONS loads later, with its bits cleared.
        for _ in 0..MAX_GENERATIONS {
            t.begin_generation(1, 1, 0);
        }
        assert_eq!(t.gen_flags(2 + MAX_GENERATIONS as u64), Some(0));
        assert_eq!(t.gen_flags(2), None);
    }

    #[test]
    fn a_configuration_load_resets_the_hang_timeout_override() {
        let t = table();
        t.begin_generation(1, 1, 0);
        t.hang_timeout_ms.store(1000, Ordering::Relaxed);
        t.begin_generation(1, 1, 0);
        assert_eq!(t.hang_timeout_ms.load(Ordering::Relaxed), 0);
    }

    /// A Lifecycle and, after it, a plain counter in one MAP_SHARED mapping, for forked children.
    fn shared_table() -> (Shm, usize) {
        let counter_off = core::mem::size_of::<Lifecycle>().next_multiple_of(8);
        (Shm::new(counter_off + 8), counter_off)
    }

    #[test]
    fn manager_lock_serializes_processes_and_survives_a_holder_dying() {
        const CHILDREN: usize = 4;
        const ROUNDS: u64 = 300;
        let (shm, counter_off) = shared_table();
        // The mapping is zero-filled (a valid, empty table) and page-aligned.
        let table = || shm.at::<Lifecycle>(0);
        // A word guarded by the manager lock only: plain loads and stores.
        let counter = shm.ptr.wrapping_add(counter_off) as usize;
        let pids: Vec<i32> = (0..CHILDREN)
            .map(|_| {
                let t = table();
                fork(move || {
                    // SAFETY: getpid has no preconditions.
                    let me = unsafe { libc::getpid() };
                    for _ in 0..ROUNDS {
                        while !t.try_lock(me, pid_alive) {
                            // SAFETY: sched_yield has no preconditions.
                            unsafe { libc::sched_yield() };
                        }
                        let c = counter as *mut u64;
                        // SAFETY: the word is in the mapping; the lock makes us its only user.
                        unsafe {
                            let v = c.read_volatile();
                            libc::sched_yield(); // widen the window a second holder would race in
                            c.write_volatile(v + 1);
                        }
                        t.unlock(me);
                    }
                    0
                })
            })
            .collect();
        for pid in pids {
            assert_eq!(wait(pid), 0);
        }
        // SAFETY: every child has exited; the parent is the word's only user.
        assert_eq!(
            unsafe { *(counter as *const u64) },
            CHILDREN as u64 * ROUNDS,
            "an increment was lost: two holders at once"
        );

        // A holder killed while holding the lock: once reaped (as nginx's
        // master reaps its workers), the next caller takes the lock over.
        let t = table();
        let holder = fork(|| {
            // SAFETY: getpid has no preconditions.
            let me = unsafe { libc::getpid() };
            if t.try_lock(me, pid_alive) { 0 } else { 1 }
        });
        assert_eq!(wait(holder), 0);
        assert_eq!(t.lock_owner(), holder, "the dead holder never unlocked");
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        assert!(t.try_lock(me, pid_alive), "taken over from the dead holder");
        assert_eq!(t.lock_owner(), me);
        t.unlock(me);
        assert_eq!(t.lock_owner(), 0);
    }

    #[test]
    fn a_record_whose_claimer_died_before_publishing_is_reused() {
        let t = table();
        let g = t.begin_generation(1, 1, 0);
        // pid 77 claims a record and dies before publishing it.
        let stuck = t.claim_record(77, alive).unwrap();
        assert_eq!(WorkerState::from_u32(t.records()[stuck].state.load(Ordering::Relaxed)), WorkerState::Claiming);
        for n in 1..RECORDS as u32 {
            assert!(t.register_worker(g, n, 100 + n as i32, 0, alive, |_| {}).is_some());
        }
        let dead77 = |p: i32| p != 77;
        assert_eq!(t.register_worker(g, 0, 5000, 0, dead77, |_| {}), Some(stuck), "the dead claim is taken over");
        // The heartbeat check frees such a record too.
        let t = table();
        let stuck = t.claim_record(78, alive).unwrap();
        t.check(0, 5000, |p| p != 78, |_| {});
        assert_eq!(WorkerState::from_u32(t.records()[stuck].state.load(Ordering::Relaxed)), WorkerState::Free);
        let live = t.claim_record(79, alive).unwrap();
        t.check(0, 5000, alive, |_| {});
        assert_eq!(WorkerState::from_u32(t.records()[live].state.load(Ordering::Relaxed)), WorkerState::Claiming);
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
