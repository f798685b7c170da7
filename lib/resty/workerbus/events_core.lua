-- resty.workerbus.events_core: the one event reader of a worker process.
--
-- resty.worker.events and resty.events are two faces of this module. Each
-- worker has one cursor in one zone's event ring, one background poller
-- (a timer light thread sleeping on an ngx.semaphore that the nginx module
-- posts when an event arrives), and a list of "sinks": one per API (or per
-- resty.events object) in use. Every event read from the ring, and every
-- local event, is decoded once and handed to every sink in the same order,
-- so both APIs can be used in one worker without taking each other's
-- events.
--
-- Log lines: the handler trace keeps the original's "worker-events: "
-- prefix (operators grep it); the module's own lines start "workerbus: ".
--
-- Record flags (chosen here, stored and returned as is by the module):
--   bits 0-1   data kind: 0 raw Lua string, 1 cjson text, 2 nil,
--              3 LuaJIT string.buffer serialization (resty.events)
--   bit 2      posted through resty.events (selects its unique timeout and
--              keeps its unique keys apart from resty.worker.events' ones)
--   bits 16-31 poster's ngx.worker.id() + 1 (0: unknown)

local ffi = require "ffi"
local bit = require "bit"

local need = require "resty.workerbus.need"

local wb = need "resty.workerbus"
local cjson = require("cjson.safe").new()

local C = ffi.C
local ffi_new = ffi.new
local ffi_string = ffi.string
local ffi_copy = ffi.copy
local band = bit.band
local rshift = bit.rshift
local tonumber = tonumber
local tostring = tostring
local type = type
local pairs = pairs
local pcall = pcall
local setmetatable = setmetatable
local co_running = coroutine.running
local co_status = coroutine.status
local ngx = ngx
local log = ngx.log
local ERR = ngx.ERR
local xpcall = xpcall
local traceback = debug.traceback
local WARN = ngx.WARN
local DEBUG = ngx.DEBUG
local exiting = ngx.worker.exiting
local cjson_encode = cjson.encode
local cjson_decode = cjson.decode
local last_error = wb.last_error
local ev_post = C.workerbus_ev_post
local ev_next = C.workerbus_ev_next
local ev_idle = C.workerbus_ev_idle
local ev_claim = C.workerbus_ev_claim
local ev_head = C.workerbus_ev_head
local DAY_S = 86400

local KIND_RAW, KIND_JSON, KIND_NIL, KIND_SBUF = 0, 1, 2, 3
local FLAG_EVENTS = 4
local WID_UNIT = 65536
local KEY_WORKER_EVENTS = 87   -- "W": prefix of resty.worker.events unique keys
local KEY_EVENTS = 69          -- "E": prefix of resty.events unique keys
local KEY_RECORD = 83          -- "S": prefix of a resty.events record's own claim (its seq)
local BATCH = 8192             -- events per poller turn before it yields (a few ms of work)
local EXIT_WATCH = 3600        -- re-arm period of the exit watcher timer

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
    FLAG_EVENTS = FLAG_EVENTS,
}

-- This process's state. Reset when the pid changes (a module loaded in the
-- master by init_by_lua is inherited by workers through fork).
local owner_pid
local zone                 -- ring's zone index, nil until attached
local zone_name = ""
local zone_explicit = false
local max_payload = 0
local wid_bits = 0         -- (ngx.worker.id() + 1) * WID_UNIT
local ttl = { [0] = 2, [FLAG_EVENTS] = 5 }  -- unique claim timeout per API

local rec = ffi_new("workerbus_record_t")
local need_len = ffi_new("size_t[1]")
local buf_cap = 16384
local buf = ffi_new("unsigned char[?]", buf_cap)
local key_cap = 256
local key_buf = ffi_new("unsigned char[?]", key_cap)
local seq_box = ffi_new("uint64_t[1]")

local sinks, lag_sinks, nsinks = {}, {}, 0
local private = {}         -- source -> fn(data, event): such events go there only
-- Taps (resty.workerbus.tail): see every ring record before any claim or
-- decoding, and never change what the sinks get.
local taps, ntaps = {}, 0
local exit_hooks = {}

-- Local events: parallel arrays, head..tail. A poll handles them before
-- the ring's events, as the original handles its local queue before the
-- events waiting in the shm.
local lq_src, lq_ev, lq_data = {}, {}, {}
local lq_head, lq_tail = 1, 0

local busy = false         -- a poll is running (a handler calling poll gets "recursive")
local ring_polled = false  -- this process read its ring at least once

local sema                 -- the poller's ngx.semaphore (see register_sema)
local loop_running = false
local waiting = false
local interval = 0
-- Idle wait when posters can wake this worker: wake-ups are reliable, so
-- the configured interval is not used as a timeout (no polling).
local IDLE_WAIT = 3600
local wakeable = false     -- the module can wake this worker's poller
local wakes = 0  -- times the idle poller woke up, for tests and operators
-- "lapped" log lines: at most one per LAG_LOG_EVERY seconds per worker;
-- the ones held back are summed into the next.
local LAG_LOG_EVERY = 10
local lag_logged_at = nil
local lag_held, lag_held_events = 0, 0
local wants = {}           -- owner -> interval wanted (0: no background loop)

-- The module posts the poller's semaphore on wake-up through its C address,
-- which is valid only while the Lua object lives. So the object whose
-- address is registered is anchored in the Lua registry, and both change
-- together: a copy of this module loaded anew (package.loaded cleared) has
-- none of this one's upvalues, yet the registered semaphore cannot be
-- collected under the module. The module forgets the address at worker exit.
local SEMA_ANCHOR = "resty.workerbus.events_core: registered semaphore"
local registry = debug.getregistry()

local function register_sema(s)
    local wakeable = C.workerbus_ev_set_sema(s and s.sem or nil) == 1
    registry[SEMA_ANCHOR] = s  -- the old object is let go only once its address is replaced
    return wakeable
end

local function reset_if_forked()
    local pid = ngx.worker.pid()
    if owner_pid == pid then
        return
    end
    owner_pid = pid
    zone, zone_name, zone_explicit, max_payload = nil, "", false, 0
    local id = ngx.worker.id()
    wid_bits = id and (id + 1) * WID_UNIT or 0
    lq_src, lq_ev, lq_data = {}, {}, {}
    lq_head, lq_tail = 1, 0
    busy, ring_polled = false, false
    sema, loop_running, waiting, interval, wakeable = nil, false, false, 0, false
    lag_logged_at, lag_held, lag_held_events = nil, 0, 0
    wants = {}
end

-- Binds this worker's reader to a zone. `name` nil: stay on the zone already
-- bound, else the primary one. `explicit`: the caller insists on this zone.
function _M.attach(name, explicit)
    reset_if_forked()
    if zone and not explicit then
        return zone
    end
    local z, err = wb.zone(name)
    if not z then
        return nil, err
    end
    if zone and z ~= zone then
        if zone_explicit or ring_polled then
            return nil, "events of this worker already go through workerbus zone \""
                        .. zone_name .. "\", not \"" .. tostring(name) .. "\""
        end
        -- Only a default choice was made and nothing was read yet: move.
    end
    if zone ~= z then
        zone = z
        zone_name = wb.zone_name(z) or ("#" .. z)
        max_payload = tonumber(C.workerbus_ev_max_payload(z))
    end
    zone_explicit = zone_explicit or explicit and true or false
    return zone
end

function _M.attached()
    return owner_pid == ngx.worker.pid() and zone ~= nil
end

function _M.zone_name()
    return zone_name
end

function _M.max_payload()
    return max_payload
end

-- Unique-event claim timeout for one API (0: resty.worker.events, FLAG_EVENTS: resty.events).
function _M.set_ttl(api, seconds)
    ttl[api] = seconds
end

-- A sink: dispatch(data, event, source, pid, wid) for every event,
-- lagged(n) when the ring lapped this worker and n events were lost.
function _M.add_sink(dispatch, lagged)
    nsinks = nsinks + 1
    sinks[nsinks] = dispatch
    lag_sinks[nsinks] = lagged
    return nsinks
end

function _M.remove_sink(dispatch)
    for i = 1, nsinks do
        if sinks[i] == dispatch then
            for j = i, nsinks - 1 do
                sinks[j] = sinks[j + 1]
                lag_sinks[j] = lag_sinks[j + 1]
            end
            sinks[nsinks], lag_sinks[nsinks] = nil, nil
            nsinks = nsinks - 1
            return true
        end
    end
    return false
end

-- Events of `source` go to fn(data, event, seq) only, not to the sinks: the
-- PostgreSQL bus (resty.workerbus.pg) keeps its notifications to itself.
-- seq is the record's place in the ring (see head()).
function _M.add_private_source(source, fn)
    private[source] = fn
end

-- A tap: tap.record(seq, pid, source, event, unique_len, data_len, data_ptr,
-- data_kind) for every ring record this worker reads (data_ptr is valid
-- during the call only), tap.lagged(n) when the ring lapped this worker.
function _M.add_tap(tap)
    ntaps = ntaps + 1
    taps[ntaps] = tap
end

function _M.remove_tap(tap)
    for i = 1, ntaps do
        if taps[i] == tap then
            taps[i] = taps[ntaps]
            taps[ntaps] = nil
            ntaps = ntaps - 1
            return true
        end
    end
    return false
end

local function tap_record()
    local slen, elen, ulen = rec.source_len, rec.event_len, rec.unique_len
    local seq, pid, source = tonumber(rec.seq), rec.pid, ffi_string(buf, slen)
    local event = ffi_string(buf + slen, elen)
    local kind = band(rec.flags, 3)
    for i = ntaps, 1, -1 do  -- backwards: a tap may remove itself
        local ok, err = pcall(taps[i].record, seq, pid, source, event, ulen, rec.data_len,
                              buf + slen + elen + ulen, kind)
        if not ok then
            log(ERR, "worker-events: event tap failed: ", err)
        end
    end
end

local function tap_lagged(n)
    for i = ntaps, 1, -1 do
        pcall(taps[i].lagged, n)
    end
end

-- Called once when the worker exits, before the poller's last poll.
function _M.on_exit(fn)
    exit_hooks[#exit_hooks + 1] = fn
end

local function deliver(data, event, source, pid, wid)
    for i = 1, nsinks do
        sinks[i](data, event, source, pid, wid)
    end
end

-- Encodes data for the ring: value (string or pointer), length, kind.
-- On failure: nil, nil, err.
local function encode(data, use_sbuf)
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

-- Appends an event to the ring. api: 0 or FLAG_EVENTS. Returns seq, or
-- nil, err. `max_data` (optional) bounds the encoded data.
function _M.post(source, event, data, unique, api, max_data)
    if not _M.attached() then
        return nil, "not configured"
    end
    local d, dlen, kind = encode(data, api == FLAG_EVENTS)
    if not dlen then
        return nil, kind
    end
    if max_data and dlen > max_data then
        return nil, "payload exceeds the limitation (" .. max_data .. ")"
    end
    local slen, elen = #source, #event
    local ulen = unique and #unique or 0
    local total = slen + elen + ulen + dlen
    if total > max_payload then
        return nil, "event of " .. total .. " bytes (source " .. slen .. " + event "
                    .. elen .. " + unique " .. ulen .. " + data " .. dlen
                    .. ") is larger than the maximum of " .. max_payload
                    .. " bytes of workerbus zone \"" .. zone_name .. "\""
    end
    local seq = ev_post(zone, source, slen, event, elen, unique, ulen, d, dlen,
                        kind + api + wid_bits)
    if seq < 0 then
        return nil, last_error()
    end
    return seq
end

-- Queues an event for this worker only; data is passed as is.
function _M.post_local(source, event, data)
    reset_if_forked()
    local t = lq_tail + 1
    lq_tail = t
    lq_src[t], lq_ev[t], lq_data[t] = source, event, data
    if waiting then
        sema:post(1)
    end
    return true
end

-- Delivers the queued local events, those their handlers queue included.
local function drain_local()
    while lq_head <= lq_tail do
        local i = lq_head
        local s, e, d = lq_src[i], lq_ev[i], lq_data[i]
        lq_src[i], lq_ev[i], lq_data[i] = nil, nil, nil
        lq_head = i + 1
        deliver(d, e, s, nil, nil)
    end
    if lq_head > lq_tail then
        lq_head, lq_tail = 1, 0
    end
end

-- First claim of a unique key wins; keys are kept apart per API. With
-- `seq` (resty.events), the first reader of the record claims the record
-- itself first; it alone then claims the key, and returns 2 when the key was
-- taken by an earlier event (a duplicate, as the original's broker says).
local function claim(p, ulen, api, seq)
    if ulen + 9 > key_cap then
        key_cap = ulen + 9
        key_buf = ffi_new("unsigned char[?]", key_cap)
    end
    if seq then
        key_buf[0] = KEY_RECORD
        seq_box[0] = seq
        ffi_copy(key_buf + 1, seq_box, 8)
        local rc = ev_claim(zone, key_buf, 9, ttl[api] or 2)
        if rc ~= 1 then
            return rc
        end
        rc = claim(p, ulen, api, nil)
        return rc == 0 and 2 or rc
    end
    key_buf[0] = api ~= 0 and KEY_EVENTS or KEY_WORKER_EVENTS
    ffi_copy(key_buf + 1, p, ulen)
    return ev_claim(zone, key_buf, ulen + 1, ttl[api] or 2)
end

local function handle_record()
    local flags = rec.flags
    local slen, elen, ulen, dlen = rec.source_len, rec.event_len, rec.unique_len, rec.data_len
    local pid = rec.pid
    local source = ffi_string(buf, slen)
    local event = ffi_string(buf + slen, elen)
    if ulen > 0 then
        local api = band(flags, FLAG_EVENTS)
        local rc = claim(buf + slen + elen, ulen, api, api ~= 0 and rec.seq or nil)
        if rc == 2 then
            -- lua-resty-events' broker line, which operators grep
            local w = rshift(flags, 16) - 1
            log(DEBUG, "unique event is duplicate on worker #", w >= 0 and w or "?", ": ",
                       ffi_string(buf + slen + elen, ulen))
            return
        elseif rc == 0 then
            log(DEBUG, "workerbus: skipping unique event; source=", source,
                       ", event=", event, ": another worker handles it")
            return
        elseif rc ~= 1 then
            log(ERR, "workerbus: cannot determine who handles unique event; source=",
                     source, ", event=", event, ", dropping it: ", last_error())
            return
        end
    end
    local kind = band(flags, 3)
    local p = buf + slen + elen + ulen
    local data
    if kind == KIND_RAW then
        data = ffi_string(p, dlen)
    elseif kind == KIND_JSON then
        local err
        data, err = cjson_decode(ffi_string(p, dlen))
        if data == nil then
            log(ERR, "workerbus: dropping event; source=", source, ", event=", event,
                     ": cannot decode its data: ", err)
            return
        end
    elseif kind == KIND_SBUF then
        if not sbuf_dec then
            log(ERR, "workerbus: dropping event; source=", source, ", event=", event,
                     ": its data is in LuaJIT's string.buffer format, which this LuaJIT lacks")
            return
        end
        local ok
        sbuf_dec:set(p, dlen)
        ok, data = pcall(sbuf_dec.decode, sbuf_dec)
        sbuf_dec:reset()
        if not ok then
            log(ERR, "workerbus: dropping event; source=", source, ", event=", event,
                     ": cannot decode its data: ", data)
            return
        end
    end
    local own = private[source]
    if own then
        return own(data, event, tonumber(rec.seq))
    end
    local w = rshift(flags, 16)
    deliver(data, event, source, pid, w > 0 and w - 1 or nil)
end

-- One call per gap, with its whole count (the module adds up laps met
-- before the next record). The log line is rate-limited per worker.
local function lagged(n)
    local now = ngx.now()
    if lag_logged_at and now - lag_logged_at < LAG_LOG_EVERY then
        lag_held, lag_held_events = lag_held + 1, lag_held_events + n
    else
        local also = ""
        if lag_held > 0 then
            also = " (and " .. lag_held .. " earlier gaps, " .. lag_held_events
                   .. " events, not logged)"
        end
        log(WARN, "workerbus: this worker was lapped by the event ring of workerbus zone \"",
                  zone_name, "\" and lost ", n, " events", also)
        lag_logged_at, lag_held, lag_held_events = now, 0, 0
    end
    for i = 1, nsinks do
        local f = lag_sinks[i]
        if f then
            f(n)
        end
    end
end

-- Reads and dispatches events until none is left, or `max` ring events.
-- Returns "done", "more" (max reached), or nil, err.
local function drain(max)
    local n = 0
    local z = zone
    while true do
        if lq_head <= lq_tail then
            drain_local()  -- local events first, as in the original
        end
        if not z then
            return "done"
        end
        local rc = ev_next(z, rec, buf, buf_cap, need_len)
        if rc == 1 or rc == 3 then
            ring_polled = true
            if rc == 3 then
                lagged(tonumber(rec.missed))  -- lost right before this record
            end
            if ntaps > 0 then
                tap_record()
            end
            handle_record()
            n = n + 1
            if max and n >= max then
                return "more"
            end
        elseif rc == 0 then
            ring_polled = true
            if lq_head > lq_tail then
                return "done"
            end
            -- local events queued by handlers: the loop delivers them, then reads again
        elseif rc == 2 then
            if ntaps > 0 then
                tap_lagged(tonumber(rec.missed))
            end
            lagged(tonumber(rec.missed))
        elseif rc == -2 then
            local want = tonumber(need_len[0])
            local cap = buf_cap
            while cap < want do
                cap = cap * 2
            end
            buf = ffi_new("unsigned char[?]", cap)
            buf_cap = cap
        else
            -- A process with no reader (the privileged agent, or a worker
            -- the lifecycle table could not track: its cursor reads 0) has
            -- nothing to read in init_worker, where the events APIs poll
            -- once; any other failure is the caller's to see.
            if ngx.get_phase() == "init_worker" and tonumber(C.workerbus_ev_cursor(zone)) == 0 then
                return "done"
            end
            return nil, "cannot read events: " .. last_error()
        end
    end
end

-- Who runs the current poll: its coroutine (held weakly), or MAIN.
local busy_owner = setmetatable({}, { __mode = "v" })
local MAIN = {}

-- Whether a poll is under way. A poll whose coroutine died or was dropped
-- while a handler had yielded (its request ended) would otherwise block
-- every later poll.
local function poll_running()
    if not busy then
        return false
    end
    local owner = busy_owner[1]
    if owner == MAIN or (owner ~= nil and co_status(owner) ~= "dead") then
        return true
    end
    log(WARN, "workerbus: a poll was abandoned inside a handler (its request ",
              "or timer ended); polling resumes")
    busy = false
    return false
end

-- Reads and dispatches events: all of them, or at most `max` ring events.
-- Returns "done", "more" (max reached), "recursive" (a poll is already
-- running: called from a handler), or nil, err.
local function poll(max)
    reset_if_forked()
    if poll_running() then
        return "recursive"
    end
    busy = true
    local co, main = co_running()
    busy_owner[1] = (co == nil or main) and MAIN or co
    local ok, res, err = pcall(drain, max)
    busy = false
    busy_owner[1] = nil
    if not ok then
        return nil, "event poll failed: " .. tostring(res)
    end
    return res, err
end
_M.poll = poll

local loop

local function start_loop()
    if loop_running or interval <= 0 or exiting() then
        return true
    end
    local ok, err = ngx.timer.at(0, loop)
    if not ok then
        return nil, "failed to create the event poller timer: " .. tostring(err)
    end
    loop_running = true
    return true
end

local function run_exit_hooks()
    for i = 1, #exit_hooks do
        local ok, err = pcall(exit_hooks[i])
        if not ok then
            log(ERR, "workerbus: events exit hook failed: ", err)
        end
    end
    local ok, err = poll()
    if not ok then
        log(ERR, "workerbus: last event poll before exit failed: ", err)
    end
    -- This worker reads no more: its unread events must not hold up the
    -- others' posts while it drains requests before it exits.
    if sema then
        register_sema(nil)
    end
end

-- Fires early (premature) when the worker starts exiting: wakes the poller
-- so that it sees ngx.worker.exiting() without waiting out its interval.
local watching = false
local function exit_watch(premature)
    if premature then
        watching = false
        if waiting and sema then
            sema:post(1)
        end
        return
    end
    watching = false
    if loop_running and not exiting() then
        watching = ngx.timer.at(EXIT_WATCH, exit_watch) and true or false
    end
end

loop = function(premature)
    if premature then
        loop_running = false
        run_exit_hooks()
        return
    end
    if ngx.worker.pid() ~= owner_pid then
        return
    end
    if not sema then
        local semaphore = require "ngx.semaphore"
        local s, err = semaphore.new(0)
        if not s then
            loop_running = false
            log(ERR, "workerbus: cannot create the event poller's semaphore: ", err)
            return
        end
        sema = s
        wakeable = register_sema(s)
    end
    if not watching then
        watching = ngx.timer.at(EXIT_WATCH, exit_watch) and true or false
    end
    local errors = 0
    while true do
        local res, err = poll(BATCH)
        if not res then
            errors = errors + 1
            if errors == 1 or errors % 1000 == 0 then
                log(ERR, "workerbus: background event poll failed (", errors, " times): ", err)
            end
        end
        if exiting() then
            break
        end
        if interval <= 0 then
            -- Manual poll() only from now on: this worker no longer guards
            -- unread events (a full ring laps it, and tells it), and a new
            -- poller claims them again.
            loop_running = false
            register_sema(nil)
            sema = nil
            return
        end
        if res == "more" then
            ngx.sleep(0.001)  -- let requests run (sleep(0) warns without OpenResty's patch)
        elseif res == "recursive" or not res then
            -- A handler's poll is draining (or reading failed): not idle, so
            -- nobody will wake us; look again shortly.
            sema:wait(0.05)
        elseif zone == nil or ev_idle(zone) ~= 1 then
            -- Idle: this worker's reader is flagged, and the next post wakes
            -- it. Wake-ups are reliable, so whatever the interval the
            -- poller waits for one (the interval only serves where the
            -- module could not set up this worker's wake-up socket).
            waiting = true
            sema:wait(wakeable and IDLE_WAIT or interval)
            waiting = false
            wakes = wakes + 1
        end
        if exiting() then
            break
        end
    end
    loop_running = false
    run_exit_hooks()
end

-- An owner (an API) wants the background poller to wake at least every
-- `seconds` (0: it needs no poller). Starts the poller when needed.
function _M.want_loop(owner, seconds)
    reset_if_forked()
    wants[owner] = seconds > 0 and seconds or nil
    local iv = 0
    for _, s in pairs(wants) do
        if s > 0 and (iv == 0 or s < iv) then
            iv = s
        end
    end
    interval = iv
    if waiting then
        sema:post(1)  -- take the new interval into account now
    end
    return start_loop()
end

-- Calls one subscriber. Its error is logged with source and event (not the
-- payload, which may be private) and never propagated. `who` names the
-- last argument in the log: "pid" or "wid".
function _M.call_handler(handler, data, event, source, who, id)
    local ok, err = xpcall(handler, traceback, data, event, source, id)
    if not ok then
        log(ERR, "worker-events: event callback failed; source=", source,
                 ", event=", event, ", ", who, "=", tostring(id),
                 " error='", tostring(err), "'")
    end
end

-- True for the first caller on the node for `key` within this
-- configuration load (a claim that lasts a year): for messages said once.
function _M.first_on_node(key)
    if not zone then
        return true
    end
    local k = "N" .. tostring(wb.generation()) .. ":" .. key
    return ev_claim(zone, k, #k, 365 * DAY_S) == 1
end

-- How many times the background poller woke from an idle wait.
function _M.poller_wakes()
    return wakes
end

function _M.poller_running()
    return loop_running
end

-- The seq the next record posted to the ring will get (nil: not attached).
function _M.head()
    if not zone then
        return nil
    end
    return tonumber(ev_head(zone))
end

-- For tests and status: this worker's next seq to read, the ring's next seq.
function _M.position()
    if not zone then
        return nil
    end
    return tonumber(C.workerbus_ev_cursor(zone)), tonumber(ev_head(zone))
end

_M.has_string_buffer = sbuf_enc ~= nil

return _M
