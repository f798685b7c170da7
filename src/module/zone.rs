//! Shared zones: declaring them, laying out a fresh one, accepting one kept
//! across a reload, and finding this cycle's zones again in a worker.

use core::cell::Cell;
use core::ffi::c_void;
use core::ptr;

use nginx_sys::{
    NGX_ERROR, NGX_LOG_EMERG, NGX_OK, ngx_conf_t, ngx_cycle_t, ngx_int_t, ngx_list_part_t, ngx_shm_zone_t,
    ngx_slab_pool_t, ngx_str_t,
};

use crate::shm::claims::Claims;
use crate::shm::header::{LAYOUT, MAGIC, ZoneHeader};
use crate::shm::lifecycle::{records_for, records_needed};
use crate::shm::lock::ShmLock;
use crate::shm::ring::{Overflow, Ring};
use ngx::core::SlabPool;
use ngx::core::slab::LockedSlabPool;

use super::{pid, time::now_ms, zone_tag};

/// One of this module's zones, as seen by the current process.
#[derive(Clone, Copy)]
pub struct Zone {
    pub shm: *mut ngx_shm_zone_t,
    pub pool: *mut ngx_slab_pool_t,
    pub header: *mut ZoneHeader,
    /// The event ring and claim table, attached once per process.
    pub ring: Option<Ring>,
    pub claims: Option<Claims>,
}

impl Zone {
    pub fn name(&self) -> &[u8] {
        // SAFETY: the shm zone belongs to the running cycle and outlives the process's use of it.
        unsafe { (*self.shm).shm.name.as_bytes() }
    }

    pub fn size(&self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.shm).shm.size }
    }

    /// The zone's header, for as long as the process runs: a worker never
    /// unmaps its zones, and the master replaces its zone list in
    /// init_module, before nginx unmaps the zones a reload dropped.
    pub fn header(&self) -> &'static ZoneHeader {
        // SAFETY: header was laid out (or checked) by init_zone before any
        // process used the zone, and stays mapped as said above.
        unsafe { &*self.header }
    }

    /// Bytes of the zone not handed out by the slab allocator.
    pub fn free_bytes(&self) -> usize {
        // SAFETY: pfree is a word the allocator updates under its lock; a racy read is only a figure.
        let pages = unsafe { ptr::read_volatile(&raw const (*self.pool).pfree) };
        pages * page_size()
    }

    /// The zone's slab pool (ngx's wrapper); None only for a zone nginx
    /// has not mapped, which no process's zone list holds (of_cycle lists
    /// initialised zones only).
    pub fn slab(&self) -> Option<SlabPool> {
        // SAFETY: the shm zone belongs to the running cycle and is
        // initialised (see above); the pool stays mapped as `header` says.
        unsafe { SlabPool::from_shm_zone(&*self.shm) }
    }

    /// The slab pool's mutex, which nginx's master releases for dead
    /// holders, as the core's `ShmLock` (lock / unlock).
    pub fn lock(&self) -> PoolLock {
        PoolLock { pool: self.slab(), held: Cell::new(None) }
    }
}

fn page_size() -> usize {
    // SAFETY: set once by nginx at startup, before any module code runs.
    unsafe { nginx_sys::ngx_pagesize }
}

/// The core's writers' lock (`ShmLock`: separate lock and unlock calls,
/// as src/shm is nginx-independent) on ngx's slab pool lock: `lock` keeps
/// the crate's guard (`LockedSlabPool`, which unlocks in Drop) and `unlock`
/// drops it, so the mutex calls are ngx's own. The glue's own critical
/// sections take the guard directly (`zone.slab()?.lock()`).
pub struct PoolLock {
    pool: Option<SlabPool>,
    held: Cell<Option<LockedSlabPool>>,
}

impl ShmLock for PoolLock {
    fn lock(&self) {
        if let Some(p) = &self.pool {
            self.held.set(Some(p.lock()));
        }
    }
    fn unlock(&self) {
        drop(self.held.take());
    }
}

/// What the configuration says about a zone beyond its name and size;
/// reaches init_zone through the zone's `data` (as nginx's limit_req
/// module does with its ctx).
#[repr(C)]
struct ZoneConf {
    overwrite: bool,
    /// worker_processes of the configuration (set_workers, from init_conf):
    /// sizes a fresh zone's lifecycle table, bounds a kept one's.
    workers: usize,
}

/// init_conf: the configuration's worker_processes, for the zone's init.
pub fn set_workers(z: *mut ngx_shm_zone_t, workers: usize) {
    // SAFETY: z is one of this configuration's zones, whose data add() set
    // to its ZoneConf in the configuration pool; zone init has not run yet.
    if let Some(zc) = unsafe { ((*z).data as *mut ZoneConf).as_mut() } {
        zc.workers = workers;
    }
}

/// Applies the configuration's overflow setting to the zone's ring (fresh
/// or kept across a reload).
fn configure_ring(ring: Option<Ring>, overwrite: bool) {
    if let Some(r) = ring {
        r.set_overflow(if overwrite { Overflow::Overwrite } else { Overflow::Refuse });
    }
}

/// Declares a zone to nginx. Errors are logged by nginx itself.
/// `overwrite`: a full event ring overwrites its oldest records.
pub fn add(cf: *mut ngx_conf_t, name: &[u8], size: usize, overwrite: bool) -> Option<*mut ngx_shm_zone_t> {
    // SAFETY: the name is copied into the configuration pool, which lives as long as the cycle.
    let data = unsafe { nginx_sys::ngx_pnalloc((*cf).pool, name.len()) } as *mut u8;
    if data.is_null() {
        return None;
    }
    // SAFETY: data has room for name.len() bytes.
    unsafe { ptr::copy_nonoverlapping(name.as_ptr(), data, name.len()) };
    let mut s = ngx_str_t { len: name.len(), data };
    // SAFETY: cf is a configuration context of the cycle being built.
    let z = unsafe { nginx_sys::ngx_shared_memory_add(cf, &mut s, size, zone_tag()) };
    if z.is_null() {
        return None;
    }
    // SAFETY: z is the zone nginx just returned.
    unsafe {
        if (*z).init.is_some() {
            // Already declared under this name in this configuration.
            return None;
        }
        (*z).init = Some(init_zone);
        let zc = nginx_sys::ngx_pcalloc((*cf).pool, size_of::<ZoneConf>()) as *mut ZoneConf;
        if zc.is_null() {
            return None;
        }
        (*zc).overwrite = overwrite;
        (*zc).workers = 1;
        (*z).data = zc.cast();
    }
    Some(z)
}

/// nginx's zone init: `old` is the previous cycle's `data` when the zone is kept.
unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, old: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes a mapped zone; shm.addr starts with the slab pool it initialised.
    let (pool, size, log, name) = unsafe {
        let z = &*shm_zone;
        (z.shm.addr as *mut ngx_slab_pool_t, z.shm.size, z.shm.log, String::from_utf8_lossy(z.shm.name.as_bytes()))
    };
    // SAFETY: add() set data to this cycle's ZoneConf, in the configuration pool.
    let (overwrite, workers) =
        unsafe { ((*shm_zone).data as *const ZoneConf).as_ref().map_or((false, 1), |c| (c.overwrite, c.workers)) };
    if !old.is_null() {
        // SAFETY: old is the header this module stored in the previous cycle's zone of the same mapping.
        let header = unsafe { &*(old as *const ZoneHeader) };
        if let Err(why) = header.check(size as u64) {
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "workerbus: zone \"{name}\" kept across reload {why}; restart nginx to recreate it"
            );
            return NGX_ERROR as ngx_int_t;
        }
        let needed = records_needed(workers);
        if header.lifecycle.record_count() < needed {
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "workerbus: zone \"{name}\" kept across reload has {} worker records, but \"worker_processes {workers}\" \
                 needs {needed} (its workers and the draining ones); restart nginx (or rename the zone) to resize it",
                header.lifecycle.record_count()
            );
            return NGX_ERROR as ngx_int_t;
        }
        let ring = match attach_parts(header) {
            Ok((ring, _)) => ring,
            Err(why) => {
                ngx::ngx_log_error!(
                    NGX_LOG_EMERG,
                    log,
                    "workerbus: zone \"{name}\" kept across reload: {why}; restart nginx to recreate it"
                );
                return NGX_ERROR as ngx_int_t;
            }
        };
        // SAFETY: zone is ours and valid.
        unsafe { (*shm_zone).data = old };
        configure_ring(ring, overwrite);
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: a fresh slab pool owned by this zone; no worker runs yet.
    let header = unsafe { nginx_sys::ngx_slab_calloc(pool, size_of::<ZoneHeader>()) } as *mut ZoneHeader;
    if header.is_null() {
        ngx::ngx_log_error!(NGX_LOG_EMERG, log, "workerbus: zone \"{name}\" of {size} bytes cannot hold its header");
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: header is a zeroed allocation of ZoneHeader's size inside the zone.
    let h = unsafe { &mut *header };
    h.magic = MAGIC;
    h.layout = LAYOUT;
    h.size = size as u64;
    h.lifecycle.init(pid(), now_ms());
    let records = records_for(workers);
    if let Err(why) = super::layout::lay_out(pool, h, records) {
        ngx::ngx_log_error!(NGX_LOG_EMERG, log, "workerbus: zone \"{name}\" of {size} bytes: {why}");
        return NGX_ERROR as ngx_int_t;
    }
    let ring = match attach_parts(h) {
        Ok((ring, _)) => ring,
        Err(why) => {
            ngx::ngx_log_error!(NGX_LOG_EMERG, log, "workerbus: zone \"{name}\" of {size} bytes: {why}");
            return NGX_ERROR as ngx_int_t;
        }
    };
    configure_ring(ring, overwrite);
    // SAFETY: pool and zone are ours; data links the zone to its header for reloads.
    unsafe {
        (*pool).data = header.cast();
        (*shm_zone).data = header.cast();
        set_log_ctx(pool, &name);
    }
    NGX_OK as ngx_int_t
}

/// A zone's ring and claim table, attached; an error names the part that
/// does not check out (a zone kept across a reload by another build).
fn attach_parts(h: &ZoneHeader) -> Result<(Option<Ring>, Option<Claims>), String> {
    let ring = match h.part(h.ring_off, h.ring_len) {
        // SAFETY: the part was laid out by parts::lay_out inside this zone.
        Some((p, n)) => Some(unsafe { Ring::attach(p, n) }.map_err(|e| format!("event ring: {e}"))?),
        None => None,
    };
    let claims = match h.part(h.claims_off, h.claims_len) {
        // SAFETY: as above.
        Some((p, n)) => Some(unsafe { Claims::attach(p, n) }.map_err(|e| format!("unique-event claims: {e:?}"))?),
        None => None,
    };
    Ok((ring, claims))
}

/// Makes the allocator's "no memory" messages name the zone.
unsafe fn set_log_ctx(pool: *mut ngx_slab_pool_t, name: &str) {
    let text = format!(" in workerbus zone \"{name}\"\0");
    // SAFETY: a small allocation in the zone itself, where nginx expects log_ctx to live.
    let p = unsafe { nginx_sys::ngx_slab_alloc(pool, text.len()) } as *mut u8;
    if !p.is_null() {
        // SAFETY: p has room for text.len() bytes.
        unsafe {
            ptr::copy_nonoverlapping(text.as_ptr(), p, text.len());
            (*pool).log_ctx = p;
        }
    }
}

/// This module's zones in `cycle`, in declaration order (the first is primary).
pub fn of_cycle(cycle: *const ngx_cycle_t) -> Vec<Zone> {
    let mut out = Vec::new();
    // SAFETY: the cycle's shared_memory list is complete once zones are initialised.
    let mut part: *const ngx_list_part_t = unsafe { &raw const (*cycle).shared_memory.part };
    while !part.is_null() {
        // SAFETY: each part holds nelts ngx_shm_zone_t elements.
        let zones = unsafe { core::slice::from_raw_parts((*part).elts as *const ngx_shm_zone_t, (*part).nelts) };
        for z in zones {
            if z.tag == zone_tag() && !z.data.is_null() {
                let header = z.data as *mut ZoneHeader;
                // SAFETY: init_zone laid out (or checked) this header before any process looks at it.
                let h = unsafe { &*header };
                // init_zone refused any zone whose parts do not attach.
                let (ring, claims) = attach_parts(h).unwrap_or((None, None));
                out.push(Zone {
                    shm: z as *const ngx_shm_zone_t as *mut ngx_shm_zone_t,
                    pool: z.shm.addr as *mut ngx_slab_pool_t,
                    header,
                    ring,
                    claims,
                });
            }
        }
        // SAFETY: next is null or another part of the same list.
        part = unsafe { (*part).next };
    }
    out
}
