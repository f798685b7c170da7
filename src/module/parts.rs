//! Lays out a fresh zone's parts after its header.

use nginx_sys::ngx_slab_pool_t;

use crate::shm::header::ZoneHeader;

pub fn lay_out(_pool: *mut ngx_slab_pool_t, _h: &mut ZoneHeader) -> Result<(), String> {
    Ok(())
}
