//! Lays out a fresh zone's parts after its header: the event ring takes
//! half of the zone, the unique-event claim table and resty.sync's table a
//! fixed size each; the rest is left to the slab allocator (resty.sync's
//! updates live there).

use nginx_sys::ngx_slab_pool_t;

use crate::shm::claims::Claims;
use crate::shm::header::ZoneHeader;
use crate::shm::ring::Ring;
use crate::shm::sync::SyncTable;

use super::events::MAX_READERS;

/// Unique keys that can be claimed at once (expired ones are reused).
pub const CLAIM_ENTRIES: usize = 1024;

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

pub fn lay_out(pool: *mut ngx_slab_pool_t, h: &mut ZoneHeader) -> Result<(), String> {
    let claims_len = Claims::region_size(CLAIM_ENTRIES);
    let (p, off) = alloc(pool, h, claims_len, "unique-event claims")?;
    // SAFETY: p is a zeroed region of claims_len bytes inside the zone.
    unsafe { Claims::init(p, claims_len, CLAIM_ENTRIES) }.map_err(|e| format!("claims: {e:?}"))?;
    h.claims_off = off;
    h.claims_len = claims_len as u64;

    // Half the zone for the ring, in whole pages.
    let capacity = ((h.size as usize) / 2) & !4095;
    let ring_len = Ring::region_size(capacity, MAX_READERS);
    let (p, off) = alloc(pool, h, ring_len, "event ring")?;
    // SAFETY: p is a zeroed region of ring_len bytes inside the zone.
    unsafe { Ring::init(p, ring_len, capacity, MAX_READERS) }.map_err(|e| format!("event ring: {e}"))?;
    h.ring_off = off;
    h.ring_len = ring_len as u64;

    // resty.sync's fixed table; its updates take slab blocks later.
    let sync_len = SyncTable::region_size();
    let (_, off) = alloc(pool, h, sync_len, "sync table")?;
    h.sync_off = off;
    h.sync_len = sync_len as u64;
    Ok(())
}
