-- resty.events on workerbus: the API of Kong's lua-resty-events (new,
-- init_worker, run, publish, subscribe, unsubscribe, is_ready) without a
-- broker: events go through the workerbus module's event ring, read by the
-- same per-worker poller as resty.worker.events. See docs/events.md.

local need = require "resty.workerbus.need"

local core = need "resty.workerbus.events_core"
local handlers = require "resty.workerbus.handlers"
local record = require "resty.workerbus.record"

local ngx = ngx
local log = ngx.log
local DEBUG = ngx.DEBUG
local debug_on = require "resty.workerbus.debug_log"
local type = type
local tostring = tostring
local assert = assert
local setmetatable = setmetatable
local str_sub = string.sub
local str_byte = string.byte
local huge = math.huge
local worker_count = ngx.worker.count
local worker_id = ngx.worker.id
local get_phase = ngx.get_phase
local timer_at = ngx.timer.at

local FLAG_EVENTS = record.FLAG_EVENTS
local BUS_MAX = record.BUS_MAX
local SOURCE = "resty-events"     -- source of this module's own "lagged" event
local POLL_BOUND = 1              -- the poller wakes at least this often (seconds)

local UNIX_PREFIX = "unix:"
local DEFAULT_UNIQUE_TIMEOUT = 5
local MAX_UNIQUE_TIMEOUT = 2147483647  -- seconds; beyond it a claim would never end
local DEFAULT_MAX_QUEUE_LEN = 1024 * 10
local DEFAULT_MAX_PAYLOAD_LEN = 1024 * 64
local LIMIT_MAX_PAYLOAD_LEN = 1024 * 1024 * 16
local FRAME_MAX = 2 ^ 24 - 1  -- the original's frame length field: 3 bytes

local _M = {
    _VERSION = "0.3.1",
    _WORKERBUS = "0.1.0",
}
local _MT = { __index = _M }

-- A number that is neither NaN nor infinite (the original lets both through).
local function finite(n)
    return n == n and n ~= huge and n ~= -huge
end

-- The options of lua-resty-events, checked as it checks them and with its
-- messages, plus the non-finite and fractional values it lets through;
-- what each one means here is in docs/events.md.
local function check_options(opts)
    assert(type(opts) == "table", "Expected a table, got " .. type(opts))

    if opts.broker_id == nil then
        opts.broker_id = 0
    end
    local id = opts.broker_id
    if type(id) ~= "number" then
        return nil, '"broker_id" option must be a number'
    end
    if not finite(id) or id < 0 or id >= worker_count() or id % 1 ~= 0 then
        return nil, '"broker_id" option is invalid'
    end

    if not opts.listening then
        return nil, '"listening" option required to start'
    end
    if type(opts.listening) ~= "string" then
        return nil, '"listening" option must be a string'
    end
    if str_sub(opts.listening, 1, #UNIX_PREFIX) ~= UNIX_PREFIX then
        return nil, '"listening" option must start with ' .. UNIX_PREFIX
    end

    opts.unique_timeout = opts.unique_timeout or DEFAULT_UNIQUE_TIMEOUT
    local t = opts.unique_timeout
    if type(t) ~= "number" then
        return nil, 'optional "unique_timeout" option must be a number'
    end
    if not (t > 0) then  -- NaN included
        return nil, '"unique_timeout" must be greater than 0'
    end
    if t > MAX_UNIQUE_TIMEOUT then  -- math.huge included
        return nil, '"unique_timeout" must be at most ' .. MAX_UNIQUE_TIMEOUT
    end

    opts.max_queue_len = opts.max_queue_len or DEFAULT_MAX_QUEUE_LEN
    local q = opts.max_queue_len
    if type(q) ~= "number" then
        return nil, '"max_queue_len" option must be a number'
    end
    if not finite(q) or q <= 0 then
        return nil, '"max_queue_len" option is invalid'
    end

    opts.max_payload_len = opts.max_payload_len or DEFAULT_MAX_PAYLOAD_LEN
    local m = opts.max_payload_len
    if type(m) ~= "number" then
        return nil, '"max_payload_len" option must be a number'
    end
    if not (m > 0 and m <= LIMIT_MAX_PAYLOAD_LEN) then  -- NaN included
        return nil, '"max_payload_len" option is invalid'
    end

    if opts.enable_privileged_agent ~= nil
       and type(opts.enable_privileged_agent) ~= "boolean"
    then
        return nil, '"enable_privileged_agent" option must be a boolean'
    end

    opts.testing = opts.testing or false
    if type(opts.testing) ~= "boolean" then
        return nil, '"testing" option must be a boolean'
    end

    -- workerbus only: the zone whose event ring carries the events.
    if opts.zone ~= nil and type(opts.zone) ~= "string" then
        return nil, '"zone" option must be a string'
    end

    return true
end

-- The bus of a `listening` path: in the original every path is its own
-- broker, whose clients hear each other only; here a record carries its
-- path's number (1 to BUS_MAX, from a hash of the path: the same path
-- gives the same number in every process and VM), and an object hears its
-- own bus only (and the events of no bus, resty.worker.events', posted in
-- its subsystem). Two paths this VM uses that get the same number are
-- refused by new(). See docs/events.md, "http and stream".
local buses = {}   -- number -> path, in this VM
local function bus_of(path)
    local h = 0
    for i = 1, #path do
        h = (h * 31 + str_byte(path, i)) % 4294967296  -- exact in a double
    end
    return h % BUS_MAX + 1
end
_M._bus_of = bus_of  -- for tests

function _M.new(opts)
    assert(check_options(opts))
    local bus = bus_of(opts.listening)
    local other = buses[bus]
    assert(other == nil or other == opts.listening, '"listening" paths "' .. tostring(other)
           .. '" and "' .. opts.listening .. '" get the same bus number ' .. bus
           .. ': rename one of the two sockets')
    buses[bus] = opts.listening
    return setmetatable({
        _bus = bus,
        opts = opts,
        _funcs = {},      -- id -> callback
        _reg = handlers.new("*"),  -- source -> event -> ids ("*": any)
        _counter = 0,
        _ready = false,   -- init_worker ran and the poller has run since
    }, _MT)
end

-- The length of the frame lua-resty-events would send to its broker for
-- this event, which is what its max_payload_len bounds (docs/events.md,
-- "max_payload_len"): the event {source, event, data, wid} serialized, that
-- string serialized again as the data of {spec = {unique}, data}, both with
-- its codec: string.buffer with the six field names as its dictionary, or
-- the shared cjson.safe where LuaJIT lacks string.buffer. The bytes are
-- only measured and dropped; the ring carries the event in its own format.
-- Returns the length, or nil and why the data cannot be serialized.
local frame_len
do
    local event_t = { source = "", event = "", data = "", wid = 0 }
    local spec_t = { unique = "" }
    local outer_t = { spec = spec_t, data = "" }

    local function fill(source, event, data, unique)
        event_t.source, event_t.event, event_t.data = source, event, data
        event_t.wid = worker_id() or -1   -- the original's -1: no worker id
        spec_t.unique = unique
    end

    local function clear()
        event_t.data, outer_t.data, spec_t.unique = nil, "", nil
    end

    local ok, buffer = pcall(require, "string.buffer")
    if ok and type(buffer) == "table" then
        local fbuf = buffer.new { dict = { "spec", "data", "source", "event", "wid", "unique" } }
        local encode = fbuf.encode
        local LARGE_FRAME = 1024 * 1024
        frame_len = function(source, event, data, unique)
            fill(source, event, data, unique)
            fbuf:reset()
            local done, err = pcall(encode, fbuf, event_t)  -- raises on a function, ...
            local len
            if done then
                outer_t.data = fbuf:get()
                len = #encode(fbuf, outer_t)  -- strings and tables only
            end
            if len and len > LARGE_FRAME then
                fbuf:free()   -- a rare big event: do not keep its space
            else
                fbuf:reset()
            end
            clear()
            if not done then
                return nil, "cannot serialize data: " .. tostring(err)
            end
            return len
        end
    else
        local cjson = require "cjson.safe"
        frame_len = function(source, event, data, unique)
            fill(source, event, data, unique)
            local s, err = cjson.encode(event_t)
            if s then
                outer_t.data = s
                s, err = cjson.encode(outer_t)
            end
            clear()
            if not s then
                return nil, "cannot encode data as JSON: " .. tostring(err)
            end
            return #s
        end
    end
end
_M._frame_len = frame_len  -- for tests

local function dispatch(self, data, event, source, wid)
    self._reg:dispatch(self._funcs, data, event, source, "wid", wid)
end

local function attach(self)
    local zone = self.opts.zone
    return core.attach(zone, zone ~= nil)
end

-- is_ready turns true from a timer made after the poller's: it runs once
-- the poller has had its first turn (lua-resty-events: once connected to
-- the broker, also from a timer).
local function mark_ready(premature, self)
    if not premature then
        self._ready = true
    end
end

-- The privileged agent reads events only when the option says true
-- (unset or false: it reads nothing; the original's agent also connected
-- when the option was unset, and then missed what came before its queue).
local function agent_reads(opts)
    return opts.enable_privileged_agent == true
end

function _M:init_worker()
    local opts = self.opts
    self._ready = false
    if worker_id() == nil and core.is_agent() and not agent_reads(opts) then
        -- enable_privileged_agent false or unset: no reader, no events;
        -- init_worker succeeds.
        return true
    end
    if not opts.testing then
        local ok, err = attach(self)
        if not ok then
            return nil, err
        end
        core.set_ttl(FLAG_EVENTS, opts.unique_timeout)
        if not self._sink then
            self._sink = function(data, event, source, _, wid)
                return dispatch(self, data, event, source, wid)
            end
            core.add_sink(self._sink, function(n)
                return dispatch(self, n, "lagged", SOURCE, nil)
            end, self._bus)
        end
        -- one owner for every object (all want the same bound): objects
        -- made again and again (compat's configure) leave nothing behind
        ok, err = core.want_loop(_M, POLL_BOUND)
        if not ok then
            return nil, err
        end
    end
    local ok, err = timer_at(0, mark_ready, self)
    if not ok then
        return nil, "failed to create the readiness timer: " .. tostring(err)
    end
    return true
end

-- There is no broker and nothing to serve: the client of the `listening`
-- socket gets a short answer at once on the raw connection, which nginx then
-- closes (no keepalive, no lingering close; nothing more is read), and run()
-- returns. Called elsewhere, it only returns. See docs/events.md.
local RUN_BODY = "no event broker here: workerbus carries events in shared memory\n"
local RUN_ANSWER = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                   .. #RUN_BODY .. "\r\nConnection: close\r\n\r\n" .. RUN_BODY

function _M.run()
    if get_phase() == "content" and ngx.config.subsystem == "http" then
        local sock = ngx.req.socket(true)
        if sock then
            sock:settimeout(1000)
            sock:send(RUN_ANSWER)
        else
            ngx.exit(444)  -- no raw socket (HTTP/2, a body being read): just close
        end
    end
    return true
end

function _M:publish(target, source, event, data)
    assert(type(target) == "string" and target ~= "", "target is required")
    assert(type(source) == "string" and source ~= "", "source is required")
    assert(type(event) == "string" and event ~= "", "event is required")

    local opts = self.opts
    if opts.testing then
        log(DEBUG, "event published to 1 workers")
        dispatch(self, data, event, source, nil)
        return true
    end

    if target == "current" then
        return core.post_local(source, event, data, self._bus)
    end

    -- Measured and refused as the original does, its two messages in its
    -- order: the frame's own bound first, then the option.
    local unique = target ~= "all" and target or nil
    local len, why = frame_len(source, event, data, unique)
    if not len then
        return nil, "failed to publish event: " .. why
    end
    if len > FRAME_MAX then
        return nil, "failed to publish event: payload too big"
    end
    if len > opts.max_payload_len then
        return nil, "failed to publish event: payload exceeds the limitation ("
                    .. opts.max_payload_len .. ")"
    end

    if not core.attached() then
        local ok, err = attach(self)
        if not ok then
            return nil, "failed to publish event: " .. err
        end
    end

    local ok, err = core.post(source, event, data, unique, FLAG_EVENTS, nil, self._bus)
    if not ok then
        return nil, "failed to publish event: " .. err
    end
    -- The original's broker line; here every worker of the generation reads
    -- the event (one of them handles a unique one), and the privileged
    -- agent when the option is true (the original's broker then counts its
    -- queue too).
    if debug_on() then
        log(DEBUG, "event published to ", unique and 1
                   or worker_count() + (opts.enable_privileged_agent == true and 1 or 0), " workers")
    end
    return true
end

function _M:subscribe(source, event, callback)
    assert(type(source) == "string" and source ~= "", "source is required")
    assert(type(event) == "string" and event ~= "", "event is required")
    assert(type(callback) == "function", "expected function, got: " .. type(callback))

    local count = self._counter + 1
    self._counter = count
    local id = tostring(count)
    self._funcs[id] = callback

    self._reg:add(source, event, id)
    return id
end

function _M:unsubscribe(id)
    assert(type(id) == "string" and id ~= "", "id is required")
    self._funcs[id] = nil
    return true
end

-- Detaches this object from the worker's reader (resty.events.compat's
-- configure replaces its object with it): its callbacks get no more events.
function _M:_close()
    if self._sink then
        core.remove_sink(self._sink)
        self._sink = nil
    end
    self._ready = false
end

function _M:is_ready()
    return self._ready and (self.opts.testing or core.poller_running())
end

-- Every worker of every node that shares the PostgreSQL database
-- (workerbus_postgres; docs/postgres.md). Subscribers get (data, event,
-- source, wid) as for publish("all", ...); wid is nil.
function _M:publish_cluster(source, event, data)
    local ok, err = require("resty.workerbus.cluster").post(source, event, data, FLAG_EVENTS)
    if not ok then
        return nil, "failed to publish event: " .. err
    end
    return true
end

return _M
