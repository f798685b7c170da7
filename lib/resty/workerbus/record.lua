-- resty.workerbus.record: the format of an event-ring record, in one place.
--
-- A record is source, event, unique key and data bytes plus a flags word
-- (the module stores and returns it as is; its layout is src/abi.rs's
-- `record`, read here through resty.workerbus's K):
--   bits 0-1   data kind: KIND_RAW (a Lua string), KIND_JSON (cjson text),
--              KIND_NIL, KIND_SBUF (LuaJIT string.buffer, resty.events)
--   bit 2      FLAG_EVENTS: posted through resty.events (its unique timeout,
--              its unique keys kept apart from resty.worker.events' ones)
--   bits 16-31 poster's ngx.worker.id() + 1 (0: unknown)
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
local cjson_encode = cjson.encode
local cjson_decode = cjson.decode
local ev_claim = C.workerbus_ev_claim

local K = wb.K
local KIND_MASK = K.KIND_MASK
local KIND_RAW, KIND_JSON, KIND_NIL, KIND_SBUF = K.KIND_RAW, K.KIND_JSON, K.KIND_NIL, K.KIND_SBUF
local FLAG_EVENTS = K.FLAG_EVENTS
local WID_SHIFT = K.WID_SHIFT

-- First byte of a claim key: whose key it is.
local KEY_WORKER_EVENTS = 87   -- "W": a resty.worker.events unique key
local KEY_EVENTS = 69          -- "E": a resty.events unique key
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
    has_string_buffer = sbuf_enc ~= nil,
    -- Bytes a reader leaves free before a record in its buffer: the claim
    -- keys are built there, in place (see claim).
    KEY_ROOM = 9,
}

-- The flags of a record: data kind, API (0 or FLAG_EVENTS), and the
-- poster's worker id (nil: unknown).
function _M.flags(kind, api, worker_id)
    return kind + api + (worker_id and lshift(worker_id + 1, WID_SHIFT) or 0)
end

function _M.kind(flags)
    return band(flags, KIND_MASK)
end

function _M.api(flags)
    return band(flags, FLAG_EVENTS)
end

-- The poster's ngx.worker.id(), or nil when unknown.
function _M.worker_id(flags)
    local w = rshift(flags, WID_SHIFT)
    return w > 0 and w - 1 or nil
end

-- Encodes data for a record: value (string or pointer), length, kind; on
-- failure nil, nil, err. Tables go through string.buffer when `use_sbuf`
-- (and this LuaJIT has it), else cjson.
function _M.encode(data, use_sbuf)
    local t = type(data)
    if t == "string" then
        return data, #data, KIND_RAW
    elseif t == "nil" then
        return nil, 0, KIND_NIL
    end
    if use_sbuf and sbuf_enc then
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
-- out already): p - 1 .. p + ulen and p - 9 .. p - 1.
function _M.claim(zone, rec, p, ulen, api, ttl)
    if api ~= 0 then
        local k = p - 9
        k[0] = KEY_RECORD
        ffi_copy(k + 1, rec, 8)
        local rc = ev_claim(zone, k, 9, ttl)
        if rc ~= 1 then
            return rc
        end
        p[-1] = KEY_EVENTS
        rc = ev_claim(zone, p - 1, ulen + 1, ttl)
        return rc == 0 and 2 or rc
    end
    p[-1] = KEY_WORKER_EVENTS
    return ev_claim(zone, p - 1, ulen + 1, ttl)
end

-- True for the first caller on the node for `key` within this
-- configuration load (a claim that lasts a year): for messages said once.
function _M.first_on_node(zone, key)
    local k = "N" .. tostring(wb.generation()) .. ":" .. key
    return ev_claim(zone, k, #k, 365 * DAY_S) == 1
end

return _M
