-- resty.workerbus.record: the format of an event-ring record, in one place.
--
-- A record is source, event, unique key and data bytes plus a flags word
-- (the module stores and returns it as is; its layout is src/abi.rs's
-- `record`, read here through resty.workerbus's K):
--   bits 0-1   data kind: KIND_RAW (a Lua string), KIND_JSON (cjson text),
--              KIND_NIL, KIND_SBUF (LuaJIT string.buffer, resty.events)
--   bit 2      FLAG_EVENTS: posted through resty.events (its unique timeout,
--              its unique keys kept apart from resty.worker.events' ones)
--   bit 3      FLAG_STREAM: posted from the stream subsystem's Lua VM
--   bits 4-15  the resty.events bus (its `listening` path's number, 0: none)
--   bits 16-31 poster's ngx.worker.id() + 1 (0: unknown, 0xffff: the
--              privileged agent, id -1 as lua-resty-events names it)
-- This module encodes and decodes data, builds the flags and makes the
-- claim keys of unique events; resty.workerbus.events_core (the reader),
-- resty.workerbus.cluster and resty.workerbus.tail use it.

local ffi = require "ffi"
local bit = require "bit"

local need = require "resty.workerbus.need"

local wb = need "resty.workerbus"
local cjson = require("cjson.safe").new()

local C = ffi.C
local ffi_string = ffi.string
local ffi_copy = ffi.copy
local band = bit.band
local rshift = bit.rshift
local lshift = bit.lshift
local type = type
local pcall = pcall
local tostring = tostring
local pairs = pairs
local getmetatable = getmetatable
local floor = math.floor
local cjson_encode = cjson.encode
local cjson_decode = cjson.decode
local ev_claim = C.workerbus_ev_claim

local K = wb.K
local KIND_MASK = K.KIND_MASK
local KIND_RAW, KIND_JSON, KIND_NIL, KIND_SBUF = K.KIND_RAW, K.KIND_JSON, K.KIND_NIL, K.KIND_SBUF
local FLAG_EVENTS = K.FLAG_EVENTS
local FLAG_STREAM = K.FLAG_STREAM
local BUS_SHIFT, BUS_MASK = K.BUS_SHIFT, K.BUS_MASK
local WID_SHIFT = K.WID_SHIFT
local WID_AGENT = 0xffff

-- First byte of a claim key: whose key it is.
local KEY_WORKER_EVENTS = 87   -- "W": a resty.worker.events unique key (http)
local KEY_WORKER_EVENTS_STREAM = 119  -- "w": the same, posted from stream
local KEY_EVENTS = 69          -- "E": a resty.events unique key (then its bus, 2 bytes)
local KEY_RECORD = 83          -- "S": a resty.events record's own claim (its seq)
local DAY_S = 86400

-- LuaJIT's serializer (OpenResty's LuaJIT has it since 2.1-2022): what
-- lua-resty-events itself uses; cjson where it is missing.
local sbuf_enc, sbuf_dec
do
    local ok, buffer = pcall(require, "string.buffer")
    if ok and type(buffer) == "table" then
        sbuf_enc = buffer.new()
        sbuf_dec = buffer.new()
    end
end

local _M = {
    _VERSION = "0.1.0",
    KIND_RAW = KIND_RAW,
    KIND_JSON = KIND_JSON,
    KIND_NIL = KIND_NIL,
    KIND_SBUF = KIND_SBUF,
    FLAG_EVENTS = FLAG_EVENTS,
    FLAG_STREAM = FLAG_STREAM,
    BUS_MAX = rshift(BUS_MASK, BUS_SHIFT),
    has_string_buffer = sbuf_enc ~= nil,
    -- Bytes a reader leaves free before a record in its buffer: the claim
    -- keys are built there, in place (see claim).
    KEY_ROOM = 9,
}

-- The flags of a record: data kind, API (0 or FLAG_EVENTS), the poster's
-- worker id (nil: unknown; -1: the privileged agent), and `where` (nil or
-- 0 for records of no VM: cluster events), the poster's VM and bus bits
-- from where(vm, bus).
function _M.flags(kind, api, worker_id, where)
    local w = 0
    if worker_id then
        w = lshift(worker_id >= 0 and worker_id + 1 or WID_AGENT, WID_SHIFT)
    end
    return kind + api + w + (where or 0)
end

-- The bits of flags that say which VM posted (vm 1: stream) on which bus.
function _M.where(vm, bus)
    return (vm == 1 and FLAG_STREAM or 0) + lshift(bus or 0, BUS_SHIFT)
end

-- The bus of a record (0: none) and whether stream posted it.
function _M.bus(flags)
    return rshift(band(flags, BUS_MASK), BUS_SHIFT)
end

function _M.from_stream(flags)
    return band(flags, FLAG_STREAM) ~= 0
end

function _M.kind(flags)
    return band(flags, KIND_MASK)
end

function _M.api(flags)
    return band(flags, FLAG_EVENTS)
end

-- The poster's ngx.worker.id() (-1: the privileged agent), or nil when unknown.
function _M.worker_id(flags)
    local w = rshift(flags, WID_SHIFT)
    if w == WID_AGENT then
        return -1
    end
    return w > 0 and w - 1 or nil
end

-- Whether a cjson round trip gives v back as it is, so that string.buffer
-- may carry it instead: booleans, strings, integers below 1e14 (cjson
-- writes 14 significant digits) and tables without a metatable that are
-- either all string keys or an array 1..n of such values, at most
-- EXACT_DEPTH deep. Anything else (floats, nulls, mixed or sparse tables,
-- whose integer keys or holes cjson changes) answers false.
local EXACT_DEPTH = 8

local function number_exact(v)
    return v == floor(v) and v < 1e14 and v > -1e14 and (v ~= 0 or 1 / v > 0)
end

-- The walk calls itself for nested tables only: a flat table's values are
-- judged in the loop, so the usual payload traces as one loop.
local function table_exact(v, depth)
    if depth >= EXACT_DEPTH or getmetatable(v) ~= nil then
        return false
    end
    local n, max, strings = 0, 0, nil
    for k, x in pairs(v) do
        local kt = type(k)
        if kt == "string" then
            if strings == false then return false end
            strings = true
        elseif kt == "number" and strings ~= true and k >= 1 and k == floor(k) then
            strings = false
            if k > max then max = k end
        else
            return false
        end
        local xt = type(x)
        if xt == "number" then
            if not number_exact(x) then return false end
        elseif xt == "table" then
            if not table_exact(x, depth + 1) then return false end
        elseif xt ~= "string" and xt ~= "boolean" then
            return false
        end
        n = n + 1
    end
    return strings ~= false or max == n
end

local function json_exact(v)
    local t = type(v)
    if t == "table" then
        return table_exact(v, 0)
    elseif t == "number" then
        return number_exact(v)
    end
    return t == "string" or t == "boolean"
end
_M.json_exact = json_exact

-- Encodes data for a record: value (string or pointer), length, kind; on
-- failure nil, nil, err. Tables go through string.buffer when `use_sbuf`
-- (and this LuaJIT has it), else cjson; with `sbuf_if_exact`, through
-- string.buffer too when cjson would give them back unchanged (json_exact):
-- the same value reaches the handler, at a fraction of cjson's cost.
function _M.encode(data, use_sbuf, sbuf_if_exact)
    local t = type(data)
    if t == "string" then
        return data, #data, KIND_RAW
    elseif t == "nil" then
        return nil, 0, KIND_NIL
    end
    if sbuf_enc and (use_sbuf or sbuf_if_exact and json_exact(data)) then
        sbuf_enc:reset()
        local ok, err = pcall(sbuf_enc.encode, sbuf_enc, data)
        if not ok then
            return nil, nil, "cannot serialize data: " .. tostring(err)
        end
        local p, len = sbuf_enc:ref()
        return p, len, KIND_SBUF
    end
    local s, err = cjson_encode(data)
    if not s then
        return nil, nil, "cannot encode data as JSON: " .. tostring(err)
    end
    return s, #s, KIND_JSON
end

-- Decodes `len` data bytes at p of `kind`: true, data; or false, why.
function _M.decode(kind, p, len)
    if kind == KIND_RAW then
        return true, ffi_string(p, len)
    elseif kind == KIND_JSON then
        local data, err = cjson_decode(ffi_string(p, len))
        if data == nil then
            return false, "cannot decode its data: " .. tostring(err)
        end
        return true, data
    elseif kind == KIND_SBUF then
        if not sbuf_dec then
            return false, "its data is in LuaJIT's string.buffer format, which this LuaJIT lacks"
        end
        sbuf_dec:set(p, len)
        local ok, data = pcall(sbuf_dec.decode, sbuf_dec)
        sbuf_dec:reset()
        if not ok then
            return false, "cannot decode its data: " .. tostring(data)
        end
        return true, data
    end
    return true, nil
end

-- Claims a ring record's unique key `ulen` bytes at p: first claimer on
-- the node within `ttl` seconds wins (1), others get 0, -1 on error. Keys
-- are kept apart per API. A resty.events record (api FLAG_EVENTS) is first
-- claimed itself by its seq (the 8 bytes of rec.seq, the record's first
-- field), so only its first reader claims the key; that one gets 2 when the
-- key was taken by an earlier event (a duplicate, as the original's broker
-- says).
--
-- The keys are built in place, in the KEY_ROOM bytes before the unique key
-- (over the record's source and event names, which the caller has copied
-- out already): p - 3 .. p + ulen and p - 9 .. p - 1. A resty.events key
-- carries the record's bus (two buses are two separate instances, as two
-- brokers are in the original), a resty.worker.events key the poster's
-- subsystem (http's and stream's are apart, as their shm dicts are).
function _M.claim(zone, rec, p, ulen, api, ttl)
    if api ~= 0 then
        local k = p - 9
        k[0] = KEY_RECORD
        ffi_copy(k + 1, rec, 8)
        local rc = ev_claim(zone, k, 9, ttl)
        if rc ~= 1 then
            return rc
        end
        local bus = rshift(band(rec.flags, BUS_MASK), BUS_SHIFT)
        p[-3] = KEY_EVENTS
        p[-2] = rshift(bus, 8)
        p[-1] = band(bus, 255)
        rc = ev_claim(zone, p - 3, ulen + 3, ttl)
        return rc == 0 and 2 or rc
    end
    p[-1] = band(rec.flags, FLAG_STREAM) ~= 0 and KEY_WORKER_EVENTS_STREAM or KEY_WORKER_EVENTS
    return ev_claim(zone, p - 1, ulen + 1, ttl)
end

-- True for the first caller on the node for `key` within this
-- configuration load (a claim that lasts a year): for messages said once.
function _M.first_on_node(zone, key)
    local k = "N" .. tostring(wb.generation()) .. ":" .. key
    return ev_claim(zone, k, #k, 365 * DAY_S) == 1
end

return _M
