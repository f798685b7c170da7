-- resty.workerbus: the Lua side of the workerbus nginx module.
--
-- Holds every FFI declaration of the module's C ABI, checks that the module
-- is loaded and speaks the ABI this file was written for, reads the
-- constants the module defines (K), keeps the one set of scratch buffers
-- every workerbus library passes to C (as resty.core.base does for
-- lua-resty-core), and offers the node's live state (generations, workers)
-- and a small value store. resty.worker.events, resty.events,
-- resty.worker.manager and resty.sync build on it.

local ffi = require "ffi"

local C = ffi.C
local ffi_new = ffi.new
local ffi_string = ffi.string
local type = type
local error = error

local ABI_VERSION = 6
local MODULE_PATH = "/usr/lib/nginx/modules/ngx_workerbus_module.so"

ffi.cdef [[
    int workerbus_abi_version(void);
    const unsigned char *workerbus_constants(size_t *len);
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

    /* the event ring: resty.worker.events, resty.events (events_core.lua,
       record.lua) */
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
    /* vm: this Lua VM's readers, 0 http (lua-nginx-module), 1 stream
       (stream-lua-nginx-module): each VM reads with its own cursor */
    int workerbus_ev_next(int zone, int vm, workerbus_record_t *out,
                          unsigned char *buf, size_t cap, size_t *need);
    int workerbus_ev_idle(int zone, int vm);
    int workerbus_ev_set_sema(int vm, void *sem);
    int workerbus_ev_claim(int zone, const unsigned char *key, size_t klen,
                           double ttl_sec);
    size_t workerbus_ev_max_payload(int zone);
    uint64_t workerbus_ev_head(int zone);
    uint64_t workerbus_ev_cursor(int zone, int vm);
    int workerbus_is_privileged_agent(void);
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
    int workerbus_sync_trigger(int zone, int task);
    int workerbus_sync_triggered(int zone, int task, int take);

    /* resty.worker.manager */
    int workerbus_lc_lock(void);
    void workerbus_lc_unlock(void);
    int workerbus_lc_lock_owner(void);
    int workerbus_lc_counts(uint64_t generation, double failed_sec, int64_t *out);
    int workerbus_lc_mark_started(void);
    int workerbus_lc_leave(void);
    int workerbus_lc_take_master_start(uint64_t generation);
    int workerbus_lc_take_master_exit(uint64_t generation);
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

-- The scratch set: one byte buffer (grown as needed, never shrunk) and the
-- out-cells of the calls. What a C call writes in them is valid until the
-- next call that uses them: callers copy out (ffi.string, decode) before
-- they run any other code.
local sizes = ffi_new("size_t[2]")
local buf_size = 16384
local buf = ffi_new("unsigned char[?]", buf_size)

-- The scratch buffer, of at least n bytes, and its size.
local function get_buf(n)
    if n > buf_size then
        local size = buf_size * 2
        buf_size = size > n and size or n
        buf = ffi_new("unsigned char[?]", buf_size)
    end
    return buf, buf_size
end

local function constants()
    local p = C.workerbus_constants(sizes)
    local k = p ~= nil and require("cjson.safe").decode(ffi_string(p, sizes[0]))
    if type(k) ~= "table" then
        error("resty.workerbus: the workerbus module gave no constants", 3)
    end
    return k
end

local _M = {
    _VERSION = "0.1.0",
    ABI_VERSION = ABI_VERSION,
    C = C,
    -- Constants of the module's side (src/abi.rs record, src/module/sync.rs,
    -- src/pg/wire.rs): record flags and kinds, sync value types, ring sources.
    K = constants(),
    -- This Lua VM, as the event ring's calls name it: 0 http, 1 stream.
    VM = ngx.config.subsystem == "stream" and 1 or 0,
    get_buf = get_buf,
    sizes = sizes,                                  -- size_t[2]: lengths written back
    record = ffi_new("workerbus_record_t"),         -- workerbus_ev_next's record
    sync_head = ffi_new("workerbus_sync_head_t"),   -- workerbus_sync_read's head
    counts = ffi_new("int64_t[3]"),                 -- resty.worker.manager's counts
    ids = ffi_new("uint64_t[1]"),                   -- and the master's id
}

-- The reason the last failed C call gave.
local function last_error()
    local p = C.workerbus_last_error(sizes)
    return ffi_string(p, sizes[0])
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
    local p = C.workerbus_zone_name(z, sizes)
    if p == nil then
        return nil, last_error()
    end
    return ffi_string(p, sizes[0])
end

-- The text a C function writes with the (buf, cap) -> full length
-- convention. The C side builds the text on every call, so the first call
-- goes into the scratch buffer (which keeps the largest size seen): one
-- build, and a second only when the text outgrew the buffer.
local function text_of(fn, what)
    local b, cap = get_buf(0)
    local n = tonumber(fn(b, cap))
    if n == 0 then
        return nil, "resty.workerbus: " .. what .. " " .. last_error()
    end
    if n > cap then
        b, cap = get_buf(n + 1024)
        n = tonumber(fn(b, cap))
        if n > cap then
            return nil, what .. " grew while being read"
        end
    end
    return ffi_string(b, n)
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
    local b, cap = get_buf(1024)
    local rc = C.workerbus_kv_get(z, key, #key, b, cap, sizes)
    if rc == 1 then
        return ffi_string(b, sizes[0])
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
