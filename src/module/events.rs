//! The event ring's nginx side: per-worker cursors and wake-ups.

use nginx_sys::ngx_cycle_t;

use super::zone::Zone;

/// Next sequence number the ring will assign: where a new generation starts reading.
pub fn head_seq(_zone: &Zone) -> u64 {
    0
}

/// Worker start: position the cursor, register the wake-up descriptor.
pub fn init_worker(_cycle: *mut ngx_cycle_t, _zone: &Zone) {}

/// Called on every heartbeat: repairs a record abandoned by a dead writer.
pub fn on_heartbeat(_zone: &Zone) {}

/// The ring's figures for the status document.
pub fn status(_zone: &Zone) -> Option<serde_json::Value> {
    None
}
