//! Lays out a fresh zone's parts after its header: the worker records of
//! the lifecycle table (sized from worker_processes), the unique-event claim
//! table, the event ring (half of the zone, one reader per worker record and Lua VM),
//! and the PostgreSQL bridge's state and post queue (a 32nd of the zone);
//! the rest is left to the slab allocator (resty.sync's table, made on the
//! zone's first sync.new, and its updates live there). `estimate` tells
//! nginx -t whether a zone can hold them.

use nginx_sys::ngx_slab_pool_t;

use crate::shm::claims::Claims;
use crate::shm::header::ZoneHeader;
use crate::shm::lifecycle::{Lifecycle, READERS_PER_RECORD};
use crate::shm::pgbus::PgBus;
use crate::shm::ring::Ring;

/// Unique-event claim entries of a zone: one per KiB of zone (at least
/// 1024): a 16 MiB zone holds 16384 claims at once (384 KiB). Beyond that
/// a claim evicts the one nearest its expiry; none is refused.
fn claim_entries(size: usize) -> usize {
    (size / 1024).max(1024)
}

/// Allocates `len` zeroed bytes in the zone and returns their offset from the header.
fn alloc(pool: *mut ngx_slab_pool_t, h: &ZoneHeader, len: usize, what: &str) -> Result<(*mut u8, u64), String> {
    // SAFETY: a fresh pool owned by the zone being initialised; no other process uses it yet.
    let p = unsafe { nginx_sys::ngx_slab_calloc(pool, len) } as *mut u8;
    if p.is_null() {
        return Err(format!("no room for the {what} ({len} bytes)"));
    }
    let off = (p as usize).wrapping_sub(h as *const ZoneHeader as usize) as u64;
    Ok((p, off))
}

/// The ring's capacity in a zone of `size` bytes with `records` worker
/// records: half of it in whole pages; in a zone too small for that and
/// the readers beyond one per record (the stream VMs' ones), less their
/// room, so that a zone holds what it held before they were added.
fn ring_capacity(size: usize, records: usize) -> usize {
    let half = (size / 2) & !4095;
    if parts_size(size, records, half) <= size {
        return half;
    }
    let extra = Ring::region_size(0, records * (READERS_PER_RECORD - 1));
    (size / 2).saturating_sub(extra) & !4095
}

/// The PostgreSQL bridge's part: its state and a post queue of a 32nd of
/// the zone (16k to 1m).
fn pg_len(size: usize) -> usize {
    PgBus::region_size((size / 32).clamp(16 << 10, 1 << 20))
}

/// Bytes of the zone the slab allocator needs for the header and parts of a
/// zone of `size` bytes with `records` worker records, counting its own
/// bookkeeping (about 24 bytes per 4 KiB page) and whole pages per part.
pub fn estimate(size: usize, records: usize) -> usize {
    parts_size(size, records, ring_capacity(size, records))
}

/// `estimate` with a ring of `capacity` bytes.
fn parts_size(size: usize, records: usize, capacity: usize) -> usize {
    let pages = |n: usize| n.div_ceil(4096) * 4096;
    pages(size_of::<ZoneHeader>())
        + pages(Lifecycle::records_size(records))
        + pages(Claims::region_size(claim_entries(size)))
        + pages(Ring::region_size(capacity, records * READERS_PER_RECORD))
        + pages(pg_len(size))
        + pages(size / 4096 * 24 + 4096)
}

/// What the slab allocator takes from the zone for `len` bytes: whole
/// pages beyond half a page, else the chunk size (a power of two, at least 8).
fn slab_bytes(len: usize) -> usize {
    match len {
        0 => 0,
        n if n > 2048 => n.div_ceil(4096) * 4096,
        n => n.next_power_of_two().max(8),
    }
}

/// The zone's parts and the bytes each takes from it (as the slab allocator
/// rounds them), in the status document's order: the header (with the
/// small value store and the lifecycle table's head), the lifecycle table's
/// worker records, the unique-event claim table, the event ring with its
/// readers, the PostgreSQL bridge's state and post queue, resty.sync's
/// table (0 until the zone's first sync.new). The rest of what the zone
/// uses is the allocator's own bookkeeping and resty.sync's published data.
pub fn parts(h: &ZoneHeader) -> [(&'static str, usize); 6] {
    use core::sync::atomic::Ordering::Relaxed;
    // Relaxed: lengths written once when the zone (or sync's table) was laid out; figures only.
    let sync_len = if h.sync_off.load(Relaxed) == 0 { 0 } else { h.sync_len.load(Relaxed) as usize };
    [
        ("header", slab_bytes(size_of::<ZoneHeader>())),
        ("lifecycle", slab_bytes(Lifecycle::records_size(h.lifecycle.records().len()))),
        ("unique_claims", slab_bytes(h.claims_len as usize)),
        ("ring", slab_bytes(h.ring_len as usize)),
        ("postgres", slab_bytes(h.pg_len as usize)),
        ("sync", slab_bytes(sync_len)),
    ]
}

pub fn lay_out(pool: *mut ngx_slab_pool_t, h: &mut ZoneHeader, records: usize) -> Result<(), String> {
    let (p, _) = alloc(pool, h, Lifecycle::records_size(records), "lifecycle table")?;
    // SAFETY: p is a zeroed, page-aligned region for `records` records in the zone, as is the table.
    unsafe { h.lifecycle.attach_records(p, records) };

    let entries = claim_entries(h.size as usize);
    let claims_len = Claims::region_size(entries);
    let (p, off) = alloc(pool, h, claims_len, "unique-event claims")?;
    // SAFETY: p is a zeroed region of claims_len bytes inside the zone.
    unsafe { Claims::init(p, claims_len, entries) }.map_err(|e| format!("claims: {e:?}"))?;
    h.claims_off = off;
    h.claims_len = claims_len as u64;

    // Half the zone for the ring, one reader per worker record and Lua VM:
    // workers of two generations sharing a slot number never share a
    // cursor, nor do a process's http and stream VMs.
    let capacity = ring_capacity(h.size as usize, records);
    let readers = records * READERS_PER_RECORD;
    let ring_len = Ring::region_size(capacity, readers);
    let (p, off) = alloc(pool, h, ring_len, "event ring")?;
    // SAFETY: p is a zeroed region of ring_len bytes inside the zone.
    unsafe { Ring::init(p, ring_len, capacity, readers) }.map_err(|e| format!("event ring: {e}"))?;
    h.ring_off = off;
    h.ring_len = ring_len as u64;

    // The PostgreSQL bridge, in every zone so that enabling it needs no restart.
    let pg_len = pg_len(h.size as usize);
    let (p, off) = alloc(pool, h, pg_len, "postgres bridge")?;
    // SAFETY: p is a zeroed region of pg_len bytes inside the zone (slab allocations are 8-aligned).
    unsafe { PgBus::init(p, pg_len) }?;
    h.pg_off = off;
    h.pg_len = pg_len as u64;
    Ok(())
}
