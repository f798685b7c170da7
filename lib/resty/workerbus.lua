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

local ABI_VERSION = 2
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

-- The text a C function writes with the (buf, cap) -> full length
-- convention: asked once for its length, then into a buffer with room.
local function text_of(fn, what)
    local n = tonumber(fn(nil, 0))
    if n == 0 then
        return nil, "resty.workerbus: " .. what .. " " .. last_error()
    end
    local b = get_buf(n + 1024)
    n = tonumber(fn(b, buf_size))
    if n > buf_size then
        return nil, what .. " grew while being read"
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
