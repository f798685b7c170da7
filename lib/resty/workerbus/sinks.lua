-- resty.workerbus.sinks: who gets the events a Lua VM reads. The sinks
-- (one per API, or per resty.events object, each on its bus or on none),
-- the private sources whose events go to one function only, and the taps
-- (resty.workerbus.tail) that see every record before any claim or
-- decoding. resty.workerbus.events_core reads the ring and hands each
-- record here.

local ffi = require "ffi"
local wb = require "resty.workerbus"
local record = require "resty.workerbus.record"

local ffi_string = ffi.string
local tonumber = tonumber
local pcall = pcall
local log = ngx.log
local ERR = ngx.ERR
local rec = wb.record          -- the scratch set's record
local rec_kind = record.kind
local rec_api = record.api

local _M = {
    ntaps = 0,
    -- source -> fn(data, event, seq): such events go there only
    private = {},
}

local sinks, lag_sinks, nsinks = {}, {}, 0
-- Each sink's bus (resty.events: its `listening` path's number), false for
-- a sink of no bus (resty.worker.events: every event of this VM's
-- subsystem). Counts: sinks per bus, sinks of no bus.
local sink_bus, bus_sinks, plain_sinks = {}, {}, 0
local skipped = 0          -- records for other buses / the other subsystem
-- Taps (resty.workerbus.tail): see every ring record before any claim or
-- decoding, and never change what the sinks get.
local taps = {}

-- A sink: dispatch(data, event, source, pid, wid) for every event meant
-- for it, lagged(n) when the ring lapped this worker and n events were
-- lost. `bus` (resty.events: its listening path's number) limits it to the
-- events of that bus and those of no bus posted in this VM's subsystem;
-- nil: every event posted in this VM's subsystem (resty.worker.events).
function _M.add_sink(dispatch, lagged, bus)
    nsinks = nsinks + 1
    sinks[nsinks] = dispatch
    lag_sinks[nsinks] = lagged
    sink_bus[nsinks] = bus or false
    if bus then
        bus_sinks[bus] = (bus_sinks[bus] or 0) + 1
    else
        plain_sinks = plain_sinks + 1
    end
    return nsinks
end

function _M.remove_sink(dispatch)
    for i = 1, nsinks do
        if sinks[i] == dispatch then
            local bus = sink_bus[i]
            if bus then
                bus_sinks[bus] = bus_sinks[bus] - 1
                if bus_sinks[bus] == 0 then
                    bus_sinks[bus] = nil
                end
            else
                plain_sinks = plain_sinks - 1
            end
            for j = i, nsinks - 1 do
                sinks[j] = sinks[j + 1]
                lag_sinks[j] = lag_sinks[j + 1]
                sink_bus[j] = sink_bus[j + 1]
            end
            sinks[nsinks], lag_sinks[nsinks], sink_bus[nsinks] = nil, nil, nil
            nsinks = nsinks - 1
            return true
        end
    end
    return false
end

-- Records this VM passed over: posted on another bus or from the other
-- subsystem, for which it has no sink (they are another instance's).
function _M.skipped()
    return skipped
end

function _M.skip()
    skipped = skipped + 1
end

-- Events of `source` go to fn(data, event, seq) only, not to the sinks: the
-- PostgreSQL bus (resty.workerbus.pg) keeps its notifications to itself.
-- seq is the record's place in the ring (see head()).
function _M.add_private_source(source, fn)
    _M.private[source] = fn
end

-- A tap: tap.record(seq, pid, source, event, unique_len, data_len, data_ptr,
-- data_kind, api) for every ring record this worker reads (data_ptr is
-- valid during the call only; api: 0 resty.worker.events, FLAG_EVENTS
-- resty.events), tap.lagged(n) when the ring lapped this worker.
function _M.add_tap(tap)
    local n = _M.ntaps + 1
    taps[n] = tap
    _M.ntaps = n
end

function _M.remove_tap(tap)
    local n = _M.ntaps
    for i = 1, n do
        if taps[i] == tap then
            taps[i] = taps[n]
            taps[n] = nil
            _M.ntaps = n - 1
            return true
        end
    end
    return false
end

-- p: the record's bytes in the scratch buffer.
function _M.tap_record(p)
    local slen, elen, ulen = rec.source_len, rec.event_len, rec.unique_len
    local seq, pid, source = tonumber(rec.seq), rec.pid, ffi_string(p, slen)
    local event = ffi_string(p + slen, elen)
    local kind, api = rec_kind(rec.flags), rec_api(rec.flags)
    for i = _M.ntaps, 1, -1 do  -- backwards: a tap may remove itself
        local ok, err = pcall(taps[i].record, seq, pid, source, event, ulen, rec.data_len,
                              p + slen + elen + ulen, kind, api)
        if not ok then
            log(ERR, "worker-events: event tap failed: ", err)
        end
    end
end

function _M.tap_lagged(n)
    for i = _M.ntaps, 1, -1 do
        pcall(taps[i].lagged, n)
    end
end

-- To the sinks an event of bus `bus` (0: none) is meant for; `mine`: it
-- was posted in this VM's subsystem.
function _M.deliver(data, event, source, pid, wid, bus, mine)
    for i = 1, nsinks do
        local b = sink_bus[i]
        if b then
            if b == bus or (bus == 0 and mine) then
                sinks[i](data, event, source, pid, wid)
            end
        elseif mine then
            sinks[i](data, event, source, pid, wid)
        end
    end
end

-- Whether any sink of this VM wants a record of bus `bus` (see deliver).
function _M.wanted(bus, mine)
    if bus == 0 then
        return mine and nsinks > 0
    end
    return bus_sinks[bus] ~= nil or (mine and plain_sinks > 0)
end

-- The ring lapped this VM and n events were lost: every sink is told.
function _M.lagged(n)
    for i = 1, nsinks do
        local f = lag_sinks[i]
        if f then
            f(n)
        end
    end
end

return _M
