//! The event ring's nginx side: where each worker starts reading, posting
//! with wake-ups, repair of records abandoned by dead writers, and the
//! ring's figures for the status document.

use core::sync::atomic::Ordering;

use nginx_sys::{NGX_LOG_WARN, ngx_cycle_t};
use serde_json::{Value, json};

use crate::shm::claims::Claims;
use crate::shm::lifecycle::MAX_GENERATIONS;
use crate::shm::ring::{RecordIn, Ring};

use super::local::local;
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

/// Worker start: position this worker's cursor in every zone's ring, then
/// watch the wake-up descriptor. A worker replacing a crashed one starts at
/// the head (replaying its predecessor's generation would repeat side
/// effects); any other starts at its generation's first event, so it also
/// sees what was posted before its Lua code configured.
pub fn init_worker(cycle: *mut ngx_cycle_t, respawned: bool) {
    let l = local();
    let Some(reader) = l.record else { return };
    l.reader = Some(reader);
    for z in &l.zones {
        let Some(r) = ring(z) else { continue };
        let Some(rd) = r.reader(reader) else { continue };
        let start = if respawned {
            r.head_seq()
        } else {
            // Relaxed: written by the master before it forked us.
            let first = z.header().first_seq[(l.generation as usize) % MAX_GENERATIONS].load(Ordering::Relaxed);
            first.max(1)
        };
        rd.set_cursor(start);
    }
    wake::register(cycle, l.slot);
}

/// Appends an event to zone `index`; the workers whose pollers sleep are
/// woken when this event-loop iteration ends.
pub fn post(index: usize, zone: &Zone, rec: &RecordIn) -> Result<u64, String> {
    let r = ring(zone).ok_or("the zone has no event ring")?;
    let seq = r.post(&zone.lock(), rec).map_err(|e| e.to_string())?;
    if local().is_worker {
        wake::wake_later(index);
    } else {
        zone.header().idle.wake_idle(wake::signal);
    }
    Ok(seq)
}

/// Called on every heartbeat: accounts for a writer that died mid-post, and
/// wakes this worker's poller if events wait for it that no wake-up
/// delivered (during a reload two generations' workers share each slot's
/// descriptor and idle bit, and one may drain the other's wake-up). So the heartbeat, not a Lua timer, bounds the
/// worst-case delay, and an idle worker's poller needs no timer of its own.
pub fn on_heartbeat(zone: &Zone) {
    let l = local();
    if let (Some(r), Some(i)) = (zone.ring, l.reader)
        && r.reader(i).is_some_and(|rd| rd.pending())
    {
        wake::post_sema(l.sema);
    }
    if let Some(r) = ring(zone)
        && let Some(pid) = r.repair(&zone.lock())
    {
        let log = local().heartbeat.log;
        if !log.is_null() {
            ngx::ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "workerbus: zone \"{}\": a writer (pid {pid}) died mid-post; its event was not published",
                String::from_utf8_lossy(zone.name())
            );
        }
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
        let Some(rd) = r.reader(w.index) else { continue };
        let rs = rd.stats();
        readers.push(json!({
            "pid": w.pid,
            "slot": w.slot,
            "generation": w.generation,
            "cursor": rs.cursor,
            "lag": head.saturating_sub(rs.cursor),
            "delivered": rs.delivered,
            "missed": rs.missed,
            "wakeups": rs.wakeups,
        }));
    }
    let idle = &zone.header().idle;
    let claims = claims(zone).map(|c| c.stats(super::time::mono_ms()));
    Some(json!({
        "capacity": st.capacity,
        "used": st.used,
        "max_payload": st.max_record_payload,
        "head_seq": head,
        "oldest_seq": st.oldest_seq,
        "posted": st.posted,
        "overwritten": st.overwritten,
        "rejected": st.rejected,
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
        "wakeups_sent": idle.wakeups_sent.load(Ordering::Relaxed),
        "idle_slots": idle.idle_slots(),
        "workers": readers,
    }))
}
