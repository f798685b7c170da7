-- resty.workerbus.events_core: the event reader of a Lua VM (http or
-- stream) in a worker process or the privileged agent.
--
-- resty.worker.events and resty.events are two faces of this module. Each
-- VM has one cursor in one zone's event ring, one background poller (a
-- timer light thread sleeping on an ngx.semaphore that the nginx module
-- posts when an event arrives), and sinks (resty.workerbus.sinks): one per
-- API or resty.events object in use. Every event read from the ring, and
-- every local event, is decoded once and handed to the sinks it is meant
-- for in the same order, so both APIs can be used in one worker without
-- taking each other's events.
--
-- What a record holds and how its data, flags and unique keys are encoded
-- is resty.workerbus.record's; the handler lists are
-- resty.workerbus.handlers'. Log lines: the module's own start "workerbus: ".

local ffi = require "ffi"

local need = require "resty.workerbus.need"

local wb = need "resty.workerbus"
local record = need "resty.workerbus.record"
local sinks = need "resty.workerbus.sinks"

local C = ffi.C
local ffi_string = ffi.string
local tonumber = tonumber
local tostring = tostring
local pairs = pairs
local pcall = pcall
local setmetatable = setmetatable
local co_running = coroutine.running
local co_status = coroutine.status
local ngx = ngx
local log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local DEBUG = ngx.DEBUG
local exiting = ngx.worker.exiting
local last_error = wb.last_error
local get_buf = wb.get_buf
local rec = wb.record          -- the scratch set's record and lengths
local sizes = wb.sizes
local encode = record.encode
local decode = record.decode
local claim = record.claim
local rec_kind = record.kind
local rec_api = record.api
local rec_worker = record.worker_id
local rec_bus = record.bus
local from_stream = record.from_stream
local where = record.where
local ev_post = C.workerbus_ev_post
local ev_next = C.workerbus_ev_next
local ev_idle = C.workerbus_ev_idle
local ev_head = C.workerbus_ev_head

local FLAG_EVENTS = record.FLAG_EVENTS
local KEY_ROOM = record.KEY_ROOM
-- This Lua VM (0 http, 1 stream): the module gives each VM of a process
-- its own readers (cursors) and posts each VM's semaphore with its own
-- subsystem's function. A record says which VM posted it.
local VM = wb.VM
local IS_STREAM = VM == 1
local BATCH = 8192             -- events per poller turn before it yields (a few ms of work)
local EXIT_WATCH = 3600        -- re-arm period of the exit watcher timer

local _M = {
    _VERSION = "0.1.0",
    FLAG_EVENTS = FLAG_EVENTS,
    has_string_buffer = record.has_string_buffer,
}

-- This process's state. Reset when the pid changes (a module loaded in the
-- master by init_by_lua is inherited by workers through fork).
local owner_pid
local zone                 -- ring's zone index, nil until attached
local zone_name = ""
local zone_explicit = false
local max_payload = 0
local worker_id            -- ngx.worker.id(), put in the records' flags
local ttl = { [0] = 2, [FLAG_EVENTS] = 5 }  -- unique claim timeout per API

local private = sinks.private  -- source -> fn(data, event, seq): such events go there only
local deliver, wanted = sinks.deliver, sinks.wanted
local tap_record, tap_lagged = sinks.tap_record, sinks.tap_lagged
local exit_hooks = {}

-- Local events: parallel arrays, head..tail. A poll handles them before
-- the ring's events, as the original handles its local queue before the
-- events waiting in the shm.
local lq_src, lq_ev, lq_data, lq_bus = {}, {}, {}, {}
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
    local rc = C.workerbus_ev_set_sema(VM, s and s.sem or nil)
    if rc < 0 then
        -- Nothing registered: this VM's poller polls at its interval.
        log(ERR, "workerbus: ", last_error(), "; the event poller polls")
        registry[SEMA_ANCHOR] = nil
        return false
    end
    registry[SEMA_ANCHOR] = s  -- the old object is let go only once its address is replaced
    return rc == 1
end

local is_agent = C.workerbus_is_privileged_agent

local function reset_if_forked()
    local pid = ngx.worker.pid()
    if owner_pid == pid then
        return
    end
    owner_pid = pid
    zone, zone_name, zone_explicit, max_payload = nil, "", false, 0
    -- lua-resty-events' ids: the privileged agent is -1
    worker_id = ngx.worker.id() or (is_agent() == 1 and -1 or nil)
    lq_src, lq_ev, lq_data, lq_bus = {}, {}, {}, {}
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

-- Whether this process is OpenResty's privileged agent.
function _M.is_agent()
    return is_agent() == 1
end

-- Called once when the worker exits, before the poller's last poll.
function _M.on_exit(fn)
    exit_hooks[#exit_hooks + 1] = fn
end

-- Appends an event to the ring. api: 0 or FLAG_EVENTS. Returns seq, or
-- nil, err. `max_data` (optional) bounds the encoded data; `bus`
-- (resty.events: its listening path's number) is the bus it is posted on.
function _M.post(source, event, data, unique, api, max_data, bus)
    if not _M.attached() then
        return nil, "not configured"
    end
    -- resty.worker.events' tables go as JSON, as in the original, unless
    -- cjson would give them back unchanged (record.encode)
    local d, dlen, kind = encode(data, api == FLAG_EVENTS, true)
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
                        record.flags(kind, api, worker_id, where(VM, bus)))
    if seq < 0 then
        return nil, last_error()
    end
    return seq
end

-- Queues an event for this worker only (this VM's sinks of `bus`, and
-- those of no bus); data is passed as is.
function _M.post_local(source, event, data, bus)
    reset_if_forked()
    local t = lq_tail + 1
    lq_tail = t
    lq_src[t], lq_ev[t], lq_data[t], lq_bus[t] = source, event, data, bus or 0
    if waiting then
        sema:post(1)
    end
    return true
end

-- Delivers the queued local events, those their handlers queue included.
local function drain_local()
    while lq_head <= lq_tail do
        local i = lq_head
        local s, e, d, b = lq_src[i], lq_ev[i], lq_data[i], lq_bus[i]
        lq_src[i], lq_ev[i], lq_data[i], lq_bus[i] = nil, nil, nil, nil
        lq_head = i + 1
        deliver(d, e, s, nil, nil, b, true)
    end
    if lq_head > lq_tail then
        lq_head, lq_tail = 1, 0
    end
end

-- Who gets what this VM reads: resty.workerbus.sinks.
_M.add_sink, _M.remove_sink = sinks.add_sink, sinks.remove_sink
_M.add_private_source, _M.skipped = sinks.add_private_source, sinks.skipped
_M.add_tap, _M.remove_tap = sinks.add_tap, sinks.remove_tap

-- The source and event names of the last record read, and their bytes: a
-- run of records with the same names (a burst, a health checker's posts)
-- takes the same strings instead of having LuaJIT hash and look up the
-- same bytes twice per record (about a sixth of what a burst event cost
-- its reader: bench/instructions). Names longer than NAMES_ROOM in all are
-- made each time.
local NAMES_ROOM = 256
pcall(ffi.cdef, "int memcmp(const void *s1, const void *s2, size_t n);")  -- pcall: declared elsewhere
local names_buf = ffi.new("uint8_t[?]", NAMES_ROOM)
local last_slen, last_elen, last_source, last_event = -1, -1, nil, nil

local function names(p, slen, elen)
    local n = slen + elen
    if slen == last_slen and elen == last_elen and C.memcmp(p, names_buf, n) == 0 then
        return last_source, last_event
    end
    local source, event = ffi_string(p, slen), ffi_string(p + slen, elen)
    if n <= NAMES_ROOM then
        ffi.copy(names_buf, p, n)
        last_slen, last_elen, last_source, last_event = slen, elen, source, event
    else
        last_slen = -1
    end
    return source, event
end

-- One ring record at p in the scratch buffer (KEY_ROOM bytes after its
-- start): unique claim, decoding, delivery.
local function handle_record(p)
    local flags = rec.flags
    local slen, elen, ulen, dlen = rec.source_len, rec.event_len, rec.unique_len, rec.data_len
    local pid = rec.pid
    local source, event = names(p, slen, elen)
    local own = private[source]
    -- Another bus's or subsystem's event, which this VM has no sink for:
    -- passed over before any claim, so that a unique one is handled by a
    -- reader it is meant for.
    local bus = rec_bus(flags)
    local mine = from_stream(flags) == IS_STREAM
    if not own and not wanted(bus, mine) then
        sinks.skip()
        return
    end
    if ulen > 0 then
        local api = rec_api(flags)
        local rc = claim(zone, rec, p + slen + elen, ulen, api, ttl[api] or 2)
        if rc == 2 then
            -- lua-resty-events' broker line, which operators grep
            log(DEBUG, "unique event is duplicate on worker #", rec_worker(flags) or "?", ": ",
                       ffi_string(p + slen + elen, ulen))
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
    local ok, data = decode(rec_kind(flags), p + slen + elen + ulen, dlen)
    if not ok then
        log(ERR, "workerbus: dropping event; source=", source, ", event=", event, ": ", data)
        return
    end
    if own then
        return own(data, event, tonumber(rec.seq))
    end
    deliver(data, event, source, pid, rec_worker(flags), bus, mine)
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
    sinks.lagged(n)
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
        local b, cap = get_buf(0)
        local p = b + KEY_ROOM
        local rc = ev_next(z, VM, rec, p, cap - KEY_ROOM, sizes)
        if rc == 1 or rc == 3 then
            ring_polled = true
            if rc == 3 then
                lagged(tonumber(rec.missed))  -- lost right before this record
            end
            if sinks.ntaps > 0 then
                tap_record(p)
            end
            handle_record(p)
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
            if sinks.ntaps > 0 then
                tap_lagged(tonumber(rec.missed))
            end
            lagged(tonumber(rec.missed))
        elseif rc == -2 then
            get_buf(tonumber(sizes[0]) + KEY_ROOM)
        else
            -- A process with no reader (a worker the lifecycle table could
            -- not track, or a helper process: its cursor reads 0) has
            -- nothing to read in init_worker, where the events APIs poll
            -- once; any other failure is the caller's to see.
            if ngx.get_phase() == "init_worker" and tonumber(C.workerbus_ev_cursor(zone, VM)) == 0 then
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
        elseif zone == nil or ev_idle(zone, VM) ~= 1 then
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

-- True for the first caller on the node for `key` within this
-- configuration load: for messages said once.
function _M.first_on_node(key)
    if not zone then
        return true
    end
    return record.first_on_node(zone, key)
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
    return tonumber(C.workerbus_ev_cursor(zone, VM)), tonumber(ev_head(zone))
end

return _M
