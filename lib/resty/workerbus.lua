-- resty.workerbus: the Lua side of the workerbus nginx module.
--
-- Holds every FFI declaration of the module's C ABI, checks that the module
-- is loaded and speaks the ABI this file was written for, and offers the
-- node's live state (generations, workers) and a small value store.
-- resty.worker.events, resty.events and resty.worker.manager build on it.

local ffi = require "ffi"

local C = ffi.C
local ffi_new = ffi.new
local ffi_string = ffi.string
local type = type
local error = error

local ABI_VERSION = 3
local MODULE_PATH = "/usr/lib/nginx/modules/ngx_workerbus_module.so"

ffi.cdef [[
    int workerbus_abi_version(void);
    const unsigned char *workerbus_last_error(size_t *len);
    int workerbus_zone(const unsigned char *name, size_t len);
    size_t workerbus_status_json(unsigned char *buf, size_t cap);
    size_t workerbus_metrics_text(unsigned char *buf, size_t cap);
    uint64_t workerbus_generation(void);
    int workerbus_kv_set(int zone, const unsigned char *key, size_t klen,
                         const unsigned char *val, size_t vlen);
    int workerbus_kv_get(int zone, const unsigned char *key, size_t klen,
                         unsigned char *buf, size_t cap, size_t *vlen);
    const unsigned char *workerbus_zone_name(int zone, size_t *len);

    /* the event ring: resty.worker.events, resty.events (events_core.lua) */
    typedef struct {
        uint64_t seq;
        int32_t  pid;
        uint32_t flags;
        uint32_t source_len, event_len, unique_len, data_len;
        uint64_t missed;
    } workerbus_record_t;
    int64_t workerbus_ev_post(int zone, const unsigned char *src, size_t slen,
                              const unsigned char *ev, size_t elen,
                              const unsigned char *uniq, size_t ulen,
                              const unsigned char *data, size_t dlen,
                              uint32_t flags);
    int workerbus_ev_next(int zone, workerbus_record_t *out, unsigned char *buf,
                          size_t cap, size_t *need);
    int workerbus_ev_idle(int zone);
    int workerbus_ev_set_sema(void *sem);
    int workerbus_ev_claim(int zone, const unsigned char *key, size_t klen,
                           double ttl_sec);
    size_t workerbus_ev_max_payload(int zone);
    uint64_t workerbus_ev_head(int zone);
    uint64_t workerbus_ev_cursor(int zone);
    uint64_t workerbus_heartbeat_ms(void);

    /* resty.sync */
    typedef struct {
        uint64_t seq;
        uint64_t modified_ms;
        uint32_t vtype, dtype;
        uint64_t vlen, dlen;
    } workerbus_sync_head_t;
    int workerbus_sync_instance(int zone, const unsigned char *key, size_t klen, uint64_t interval_ms);
    int workerbus_sync_task(int zone, int inst, const unsigned char *tag, size_t tlen);
    const uint32_t *workerbus_sync_seq_ptr(int zone, int task);
    int workerbus_sync_tick(int zone, int inst, uint64_t lease_ms, int exiting);
    int workerbus_sync_runner(int zone, int inst);
    int workerbus_sync_begin_run(int zone, int inst);
    void workerbus_sync_end_run(int zone, int inst);
    int64_t workerbus_sync_publish(int zone, int task, uint32_t vtype, const unsigned char *v, size_t vlen,
                                   uint32_t dtype, const unsigned char *d, size_t dlen);
    int workerbus_sync_read(int zone, int task, workerbus_sync_head_t *head, unsigned char *buf, size_t cap);
    void workerbus_sync_record_run(int zone, int task, uint64_t started_ms, uint64_t duration_us,
                                   const unsigned char *err, size_t elen);
    uint64_t workerbus_sync_last_run_ms(int zone, int task);

    /* resty.worker.manager */
    int workerbus_lc_lock(void);
    void workerbus_lc_unlock(void);
    int workerbus_lc_lock_owner(void);
    int workerbus_lc_counts(uint64_t generation, double failed_sec, int64_t *out);
    int workerbus_lc_mark_started(void);
    int workerbus_lc_leave(void);
    int workerbus_lc_claim_master_start(uint64_t generation);
    int workerbus_lc_claim_master_exit(uint64_t generation);
    int workerbus_lc_gen_flags(uint64_t generation);
    int workerbus_lc_set_hang_timeout(double sec);
    uint64_t workerbus_lc_current_generation(void);
    int workerbus_lc_master_counts(uint64_t *id, int64_t *out);

    /* the PostgreSQL bridge (resty.workerbus.pg) */
    int workerbus_pg_limits(size_t *max_channel, size_t *max_payload);
    int workerbus_pg_post(const unsigned char *ch, size_t clen,
                          const unsigned char *payload, size_t plen);
    int workerbus_pg_post_event(const unsigned char *src, size_t slen,
                                const unsigned char *ev, size_t elen,
                                const unsigned char *data, size_t dlen,
                                uint32_t flags);
    int workerbus_pg_listen(const unsigned char *ch, size_t clen, int delta);
]]

local function module_loaded()
    -- Looking a symbol up raises when no loaded object exports it.
    return pcall(function() return C.workerbus_abi_version end)
end

if not module_loaded() then
    error("resty.workerbus: the workerbus nginx module is not loaded; add "
          .. "\"load_module " .. MODULE_PATH .. ";\" at the top of nginx.conf "
          .. "(main context, before the http block)", 2)
end

local abi = C.workerbus_abi_version()
if abi ~= ABI_VERSION then
    error("resty.workerbus: the loaded workerbus module speaks ABI " .. abi
          .. " but this Lua library needs ABI " .. ABI_VERSION
          .. "; install the module and lib/resty from the same release", 2)
end

local _M = {
    _VERSION = "0.1.0",
    ABI_VERSION = ABI_VERSION,
    C = C,
}

local size_ptr = ffi_new("size_t[1]")
local buf_size = 4096
local buf = ffi_new("unsigned char[?]", buf_size)

-- A scratch buffer of at least n bytes, reused between calls.
local function get_buf(n)
    if n > buf_size then
        buf_size = n
        buf = ffi_new("unsigned char[?]", buf_size)
    end
    return buf
end
_M.get_buf = get_buf

-- The reason the last failed C call gave.
local function last_error()
    local p = C.workerbus_last_error(size_ptr)
    return ffi_string(p, size_ptr[0])
end
_M.last_error = last_error

local zone_cache = {}

-- Index of a zone by name (nil or "" for the primary zone), or nil, err.
function _M.zone(name)
    name = name or ""
    if type(name) ~= "string" then
        return nil, "zone name must be a string"
    end
    local z = zone_cache[name]
    if z then
        return z
    end
    z = C.workerbus_zone(name, #name)
    if z < 0 then
        return nil, last_error()
    end
    zone_cache[name] = z
    return z
end

-- The name of zone index z (for messages), or nil, err.
function _M.zone_name(z)
    local p = C.workerbus_zone_name(z, size_ptr)
    if p == nil then
        return nil, last_error()
    end
    return ffi_string(p, size_ptr[0])
end

-- The text a C function writes with the (buf, cap) -> full length
-- convention. The C side builds the text on every call, so the first call
-- goes into the scratch buffer (which keeps the largest size seen): one
-- build, and a second only when the text outgrew the buffer.
local function text_of(fn, what)
    local n = tonumber(fn(get_buf(buf_size), buf_size))
    if n == 0 then
        return nil, "resty.workerbus: " .. what .. " " .. last_error()
    end
    if n > buf_size then
        n = tonumber(fn(get_buf(n + 1024), buf_size))
        if n > buf_size then
            return nil, what .. " grew while being read"
        end
    end
    return ffi_string(buf, n)
end

-- The status document as a Lua table (the same as workerbus_status serves).
function _M.status()
    local text, err = text_of(C.workerbus_status_json, "status()")
    if not text then
        return nil, err
    end
    local cjson = require "cjson.safe"
    return cjson.decode(text)
end

-- The same snapshot in Prometheus's text format (what workerbus_metrics serves).
function _M.metrics()
    return text_of(C.workerbus_metrics_text, "metrics()")
end

-- Streams the event bus to the client as Server-Sent Events (a content
-- handler; see lib/resty/workerbus/tail.lua for the options).
function _M.tail(opts)
    return require("resty.workerbus.tail").tail(opts)
end

-- Generation of this worker's configuration (one per load or reload).
function _M.generation()
    return tonumber(C.workerbus_generation())
end

-- The node's workers, each { slot, pid, generation, state, started, ... }.
function _M.workers()
    local st, err = _M.status()
    if not st then
        return nil, err
    end
    return st.workers or {}, st.generations or {}
end

local function check_kv(zone, key)
    if type(key) ~= "string" then
        return nil, "key must be a string"
    end
    return _M.zone(zone)
end

-- Stores a small value (string, at most 512 bytes; 32 keys per zone) under key in the zone.
function _M.set(key, value, zone)
    local z, err = check_kv(zone, key)
    if not z then
        return nil, err
    end
    if type(value) ~= "string" then
        return nil, "value must be a string"
    end
    if C.workerbus_kv_set(z, key, #key, value, #value) < 0 then
        return nil, last_error()
    end
    return true
end

-- The value stored under key, or nil when absent, or nil, err.
function _M.get(key, zone)
    local z, err = check_kv(zone, key)
    if not z then
        return nil, err
    end
    local b = get_buf(1024)
    local rc = C.workerbus_kv_get(z, key, #key, b, buf_size, size_ptr)
    if rc == 1 then
        return ffi_string(b, size_ptr[0])
    elseif rc == 0 then
        return nil
    end
    return nil, last_error()
end

-- Across nodes, through PostgreSQL (resty.workerbus.pg, docs/postgres.md):
-- post(channel, payload), wait(channel, timeout), subscribe(channel,
-- handler), unsubscribe(id). Loaded on first use.
for _, name in ipairs({ "post", "wait", "subscribe", "unsubscribe" }) do
    _M[name] = function(...)
        return require("resty.workerbus.pg")[name](...)
    end
end

return _M
