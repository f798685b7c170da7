//! The event ring's nginx side: where each worker starts reading, posting
//! with wake-ups, which readers may block a post on a full ring (attached,
//! alive, heartbeat not overdue), repair of records abandoned by dead
//! writers, and the ring's figures for the status document.

use core::sync::atomic::Ordering;

use nginx_sys::{NGX_LOG_WARN, ngx_log_t};
use serde_json::{Value, json};

use crate::shm::claims::Claims;
use crate::shm::lifecycle::{MAX_GENERATIONS, READERS_PER_RECORD, pid_alive};
use crate::shm::ring::{Reader, RecordIn, Ring};

use super::conf::{self, CoreConf};

use super::hop::{self, Hop};
use super::pid;
use super::process_state::this_process;
use super::sema::{self, Vm};
use super::time::{mono_ms, mono_ms_now};
use super::wake;
use super::zone::Zone;

/// The zone's ring, if it has one.
pub fn ring(zone: &Zone) -> Option<Ring> {
    zone.ring
}

/// The zone's unique-event claim table, if it has one.
pub fn claims(zone: &Zone) -> Option<Claims> {
    zone.claims
}

/// Next sequence number the ring will assign: where a new generation starts reading.
pub fn head_seq(zone: &Zone) -> u64 {
    ring(zone).map_or(0, |r| r.head_seq())
}

/// Master, per configuration load: remember where this generation starts in every zone.
pub fn begin_generation(zones: &[Zone], generation: u64) {
    for z in zones {
        let slot = &z.header().first_seq[(generation as usize) % MAX_GENERATIONS];
        // Relaxed: written before fork; workers read it after, through fork's own ordering.
        slot.store(head_seq(z), Ordering::Relaxed);
    }
}

/// Where `generation`'s workers start reading the zone's ring (as long as
/// the lifecycle table keeps that generation: both recycle the same way).
pub fn first_seq(zone: &Zone, generation: u64) -> u64 {
    // Relaxed: written by the master before it forked this generation's workers.
    zone.header().first_seq[(generation as usize) % MAX_GENERATIONS].load(Ordering::Relaxed)
}

/// Record `record`'s reader for VM `vm` in a ring: the ring has
/// READERS_PER_RECORD readers per worker record (layout.rs), the http ones
/// first, at the record's own index.
pub fn reader_of(r: &Ring, record: usize, vm: Vm) -> Option<Reader> {
    let records = r.max_readers() / READERS_PER_RECORD;
    if record >= records {
        return None;
    }
    r.reader(vm.index() * records + record)
}

/// This process's reader for VM `vm` in a zone's ring.
pub fn my_reader(zone: &Zone, vm: Vm) -> Option<Reader> {
    let record = this_process().record.get()?;
    reader_of(&ring(zone)?, record, vm)
}

/// Worker start: position this worker's cursors in every zone's ring, one
/// per Lua VM (its readers belong to its lifecycle record). A worker
/// replacing a crashed one starts at the head (replaying its predecessor's
/// generation would repeat side effects); any other starts at its
/// generation's first event, so it also sees what was posted before its
/// Lua code configured.
pub fn init_worker(respawned: bool) {
    let l = this_process();
    let Some(record) = l.record.get() else { return };
    for z in &l.zones() {
        let Some(r) = ring(z) else { continue };
        let start = if respawned { r.head_seq() } else { first_seq(z, l.generation.get()).max(1) };
        for vm in Vm::ALL {
            if let Some(rd) = reader_of(&r, record, vm) {
                rd.set_cursor(start);
            }
        }
    }
}

/// VM `vm`'s Lua poller started (its semaphore is registered): that VM's
/// readers are read from now on, so their unread records are guarded and
/// posters wake them at this process's address. A reader's beat is always
/// a copy of this worker's lifecycle heartbeat (here, and in on_heartbeat),
/// never fresher: a worker the lifecycle check reports hung is then one no
/// post waits for, even if it stopped before its first heartbeat.
pub fn attach_readers(vm: Vm) {
    let l = this_process();
    let me = pid();
    let nonce = wake::nonce().unwrap_or(0);
    let beat =
        l.primary().zip(l.record.get()).and_then(|(p, i)| p.header().lifecycle.heartbeat_of(i)).unwrap_or_else(mono_ms);
    for z in &l.zones() {
        if let Some(rd) = my_reader(z, vm) {
            rd.attach(me, nonce, beat);
        }
    }
}

/// VM `vm` stopped reading (its poller stopped, or the worker exits): its
/// readers no longer guard anything.
pub fn release_readers(vm: Vm) {
    for z in &this_process().zones() {
        if let Some(rd) = my_reader(z, vm) {
            rd.release();
        }
    }
}

/// Worker exit: no reader of this process guards anything any more.
pub fn release_all_readers() {
    for vm in Vm::ALL {
        release_readers(vm);
    }
}

/// Heartbeat overrun after which a reader no longer blocks posts: the
/// lifecycle's hang timeout (as set from Lua, else the directive's in `conf`).
fn hang_ms(zone: &Zone, conf: Option<&CoreConf>) -> u64 {
    // Relaxed: a setting.
    match zone.header().lifecycle.hang_timeout_ms.load(Ordering::Relaxed) {
        0 => conf::hang_timeout_ms(conf),
        ms => ms,
    }
}

/// Appends an event to zone `index` and wakes the workers whose pollers
/// sleep (wake::wake_after_post, wake::wake_after_own).
pub fn post(index: usize, zone: &Zone, rec: &RecordIn) -> Result<u64, String> {
    post_with(index, zone, rec, conf::running())
}

/// `post` for a record that came from elsewhere (the PostgreSQL bridge's
/// deliveries): the other workers' wake-ups go out at once, never held for
/// this worker's own handler. The hold trades their latency for the
/// poster's own, which only matters to a poster that reads its own events
/// first; a notification is nobody's own post.
pub fn post_relayed(index: usize, zone: &Zone, rec: &RecordIn) -> Result<u64, String> {
    post_as(index, zone, rec, conf::running(), Hold::Never)
}

/// Whether the other workers' wake-ups may wait for this worker's own
/// handler when the post woke its own poller (src/module/wake.rs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    ForOwnHandler,
    Never,
}

/// `post` under configuration `conf` (the master's init_module posts under
/// the configuration it loads, not the running one it replaces).
pub fn post_with(index: usize, zone: &Zone, rec: &RecordIn, conf: Option<&CoreConf>) -> Result<u64, String> {
    post_as(index, zone, rec, conf, Hold::ForOwnHandler)
}

fn post_as(index: usize, zone: &Zone, rec: &RecordIn, conf: Option<&CoreConf>, hold: Hold) -> Result<u64, String> {
    hop::stamp_for(Hop::Post, None);
    let r = ring(zone).ok_or("the zone has no event ring")?;
    let hang = hang_ms(zone, conf);
    // Called only when the post would overwrite what an attached reader has
    // not read: a reader blocks it while it lives and its heartbeat is not
    // overdue (a hung or dead worker is lapped, and told when it reads).
    let responsive = |pid: i32, beat: u64| mono_ms_now().saturating_sub(beat) <= hang && pid_alive(pid);
    let seq = r.post_checked(&zone.lock(), rec, &responsive).map_err(|e| {
        let mut m = e.to_string();
        if matches!(e, crate::shm::ring::PostError::Full { .. }) {
            m.push_str(&format!(
                " (workerbus zone \"{}\", ring of {} bytes: make the zone larger, or let the ring \
                 overwrite with overflow=overwrite)",
                String::from_utf8_lossy(zone.name()),
                r.capacity()
            ));
        }
        m
    })?;
    if this_process().is_worker.get() {
        // This worker's own poller, if it sleeps, is woken here and now by
        // its semaphore (a posted event: it resumes at the end of this
        // event-loop iteration), never by a datagram to itself: no syscall
        // and no trip through epoll. The other workers' datagrams then wait
        // for its first handler (wake_after_own), so that they do not take
        // its core first; without it they go out now (wake_after_post).
        let mut woke = false;
        if let Some(i) = this_process().record.get() {
            for vm in Vm::ALL {
                woke |= reader_of(&r, i, vm).is_some_and(|rd| rd.take_idle());
            }
        }
        if woke {
            hop::stamp(Hop::Sema);
            wake::count_local();
            sema::post();
            if hold == Hold::ForOwnHandler {
                wake::wake_after_own(index, zone);
            } else {
                wake::wake_after_post(index, zone);
            }
        } else {
            wake::wake_after_post(index, zone);
        }
    } else {
        wake::wake_zone(zone);
    }
    Ok(seq)
}

/// Called on every heartbeat: a sign of life for this worker's reader (a
/// worker whose event loop stalls stops blocking posts after the hang
/// timeout), and accounting for writers that died mid-post, each logged
/// once by whichever worker sees it first. Wake-ups do not depend on it.
/// `now_ms` is the stamp the heartbeat gave this worker's lifecycle record
/// (see attach_readers: a fresher clock read here would keep a worker
/// reported hung responsive to posters for as long as nginx's cached time
/// lagged behind).
pub fn on_heartbeat(zone: &Zone, log: *mut ngx_log_t, now_ms: u64) {
    let Some(r) = ring(zone) else { return };
    let me = pid();
    for vm in Vm::ALL {
        if let Some(rd) = my_reader(zone, vm)
            && rd.stats().owner == me
        {
            rd.beat(now_ms);
        }
    }
    r.repair(&zone.lock());
    report_abandoned(zone, log);
}

/// Logs, once, the posts cut off by writers that died mid-post.
pub fn report_abandoned(zone: &Zone, log: *mut ngx_log_t) {
    let Some(r) = ring(zone) else { return };
    if log.is_null() {
        return;
    }
    if let Some((n, pid)) = r.unreported_abandoned() {
        let also = if n > 1 { format!(" ({n} such posts since the last report)") } else { String::new() };
        ngx::ngx_log_error!(
            NGX_LOG_WARN,
            log,
            "workerbus: zone \"{}\": a writer (pid {pid}) died mid-post; its event was not published{also}",
            String::from_utf8_lossy(zone.name())
        );
    }
}

/// The ring's figures for the status document.
pub fn status(zone: &Zone) -> Option<Value> {
    let r = ring(zone)?;
    let st = r.stats();
    let lc = &zone.header().lifecycle;
    let head = st.head_seq;
    let mut readers = vec![];
    for w in lc.workers().filter(|w| w.state.is_live()) {
        for vm in Vm::ALL {
            let Some(rd) = reader_of(&r, w.index, vm) else { continue };
            let rs = rd.stats();
            // A stream reader is shown once its VM reads (or has read).
            if vm != Vm::Http && rs.owner == 0 && rs.delivered == 0 && rs.missed == 0 {
                continue;
            }
            let mut x = json!({
                "pid": w.pid,
                "slot": if w.is_agent() { Value::Null } else { json!(w.slot) },
                "generation": w.generation,
                "cursor": rs.cursor,
                "lag": head.saturating_sub(rs.cursor),
                "delivered": rs.delivered,
                "missed": rs.missed,
                "wakeups": rs.wakeups,
                "idle": rs.idle,
                // Read by a running poller: its unread events are guarded.
                "poller": rs.owner != 0,
            });
            if w.is_agent() {
                x["role"] = json!("privileged agent");
            }
            if vm != Vm::Http {
                x["subsystem"] = json!(vm.name());
            }
            readers.push(x);
        }
    }
    let claims = claims(zone).map(|c| c.stats(mono_ms()));
    Some(json!({
        "capacity": st.capacity,
        "used": st.used,
        "max_payload": st.max_record_payload,
        "head_seq": head,
        "oldest_seq": st.oldest_seq,
        "posted": st.posted,
        "overwritten": st.overwritten,
        "rejected": st.rejected,
        "refused": st.refused,
        "overflow": if st.overwrite { "overwrite" } else { "refuse" },
        "dropped": st.abandoned,
        "unique_claims": claims.map(|c| json!({
            "entries": c.entries,
            "live": c.live,
            "won": c.won,
            "refused": c.refused,
            "evicted": c.evicted,
        })),
        "delivered": readers.iter().map(|x| x["delivered"].as_u64().unwrap_or(0)).sum::<u64>(),
        "lagged_missed": readers.iter().map(|x| x["missed"].as_u64().unwrap_or(0)).sum::<u64>(),
        "wakeups_sent": st.wakeups,
        "idle_slots": readers
            .iter()
            .filter(|x| x["idle"] == true && x["slot"].is_number() && x.get("subsystem").is_none())
            .map(|x| x["slot"].clone())
            .collect::<Vec<_>>(),
        "workers": readers,
    }))
}
