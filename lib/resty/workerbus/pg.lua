-- resty.workerbus.pg: post / wait / subscribe across nodes through the
-- node's one PostgreSQL connection (docs/postgres.md). The nginx module
-- holds the connection in one worker; a post is queued in the zone and
-- sent by that worker; an incoming notification is put in the node's event
-- ring, which every worker's poller reads. This file only keeps the
-- worker's waiters and subscribers and hands them what the poller delivers.

local ffi = require "ffi"

local need = require "resty.workerbus.need"

local wb = need "resty.workerbus"
local core = need "resty.workerbus.events_core"

local C = ffi.C
local type = type
local tonumber = tonumber
local tostring = tostring
local find = string.find
local sub = string.sub
local xpcall = xpcall
local traceback = debug.traceback
local log = ngx.log
local ERR = ngx.ERR
local last_error = wb.last_error

if not pcall(function() return C.workerbus_pg_post end) then
    error("resty.workerbus.pg: the loaded workerbus module has no PostgreSQL bridge; "
          .. "install the module and lib/resty from the same release", 2)
end

local _M = {
    _VERSION = "0.1.0",
    -- Ring source of bus notifications (src/pg/wire.rs RING_SOURCE).
    SOURCE = wb.K.PG_RING_SOURCE,
    DEFAULT_WAIT = 60,
}

local NOT_CONFIGURED = "the PostgreSQL bridge is not configured (no workerbus_postgres directive)"

local sizes = wb.sizes   -- the scratch set's (resty.workerbus)

-- Per worker: waiters[channel] = { {sema, from, payload, origin}, ... }
-- (from: the ring's head when the wait began);
-- subs[channel] = { {id, handler}, ... }; by_id[id] = channel.
local owner_pid
local waiters, subs, by_id, next_id = {}, {}, {}, 0
local hooked = false

local function reset_if_forked()
    local pid = ngx.worker.pid()
    if owner_pid ~= pid then
        owner_pid = pid
        waiters, subs, by_id, next_id = {}, {}, {}, 0
        hooked = false
    end
end

-- Whether the bridge is configured, and its limits.
function _M.limits()
    if C.workerbus_pg_limits(sizes, sizes + 1) ~= 1 then
        return nil, NOT_CONFIGURED
    end
    return tonumber(sizes[0]), tonumber(sizes[1])
end

local function deliver(data, channel, seq)
    local z = find(data, "\0", 1, true)
    local origin, payload = "", data
    if z then
        origin, payload = sub(data, 1, z - 1), sub(data, z + 1)
    end
    local list = waiters[channel]
    if list then
        -- Everyone who began waiting before this record entered the ring
        -- gets it; those who began after (the poller reads late: a first
        -- wait in this worker, or a busy worker) keep waiting.
        local rest
        for i = 1, #list do
            local w = list[i]
            if seq >= w.from then
                w.payload, w.origin = payload, origin
                w.sema:post(1)
            else
                rest = rest or {}
                rest[#rest + 1] = w
            end
        end
        waiters[channel] = rest
    end
    local s = subs[channel]
    if s then
        for i = 1, #s do
            local ok, err = xpcall(s[i].handler, traceback, payload, channel, origin)
            if not ok then
                log(ERR, "workerbus.pg: subscriber ", s[i].id, " of channel \"", channel,
                         "\" failed: ", tostring(err))
            end
        end
    end
end

-- Makes sure this worker's poller runs and hands us bus notifications.
local function hook()
    reset_if_forked()
    if hooked then
        return true
    end
    local ok, err = core.attach()
    if not ok then
        return nil, err
    end
    core.add_private_source(_M.SOURCE, deliver)
    ok, err = core.want_loop(_M, 60)
    if not ok then
        return nil, err
    end
    hooked = true
    return true
end

local function listen(channel, delta)
    local rc = C.workerbus_pg_listen(channel, #channel, delta)
    if rc < 0 then
        return nil, last_error()
    end
    return rc == 1
end

-- A light thread starts using channel: the node listens to it, the poller runs.
local function enter(channel)
    local ok, err = listen(channel, 1)
    if ok == nil then
        return nil, err
    end
    ok, err = hook()
    if not ok then
        listen(channel, -1)
        return nil, err
    end
    return true
end

-- Posts payload on channel to every waiter and subscriber of every node.
function _M.post(channel, payload)
    if type(channel) ~= "string" then
        return nil, "channel must be a string"
    end
    if type(payload) ~= "string" then
        return nil, "payload must be a string"
    end
    if C.workerbus_pg_post(channel, #channel, payload, #payload) ~= 0 then
        return nil, last_error()
    end
    return true
end

-- Waits for the next post on channel: payload, origin node; or nil, "timeout".
function _M.wait(channel, timeout)
    if type(channel) ~= "string" then
        return nil, "channel must be a string"
    end
    timeout = timeout or _M.DEFAULT_WAIT
    if type(timeout) ~= "number" or timeout < 0 then
        return nil, "timeout must be a non-negative number"
    end
    local ok, err = enter(channel)
    if not ok then
        return nil, err
    end
    local semaphore = require "ngx.semaphore"
    -- Only records that enter the ring from now on are for this wait.
    local w = { sema = semaphore.new(0), from = core.head() or 0 }
    local list = waiters[channel]
    if not list then
        list = {}
        waiters[channel] = list
    end
    list[#list + 1] = w
    w.sema:wait(timeout)
    listen(channel, -1)
    if w.payload ~= nil then
        return w.payload, w.origin
    end
    list = waiters[channel]
    if list then
        for i = #list, 1, -1 do
            if list[i] == w then
                table.remove(list, i)
            end
        end
        if #list == 0 then
            waiters[channel] = nil
        end
    end
    return nil, "timeout"
end

-- Calls handler(payload, channel, origin_node) for every post on channel.
function _M.subscribe(channel, handler)
    if type(channel) ~= "string" then
        return nil, "channel must be a string"
    end
    if type(handler) ~= "function" then
        error("handler must be a function, got " .. type(handler), 2)
    end
    local ok, err = enter(channel)
    if not ok then
        return nil, err
    end
    next_id = next_id + 1
    local s = subs[channel]
    if not s then
        s = {}
        subs[channel] = s
    end
    s[#s + 1] = { id = next_id, handler = handler }
    by_id[next_id] = channel
    return next_id
end

function _M.unsubscribe(id)
    reset_if_forked()
    local channel = by_id[id]
    if not channel then
        return nil, "no subscription " .. tostring(id)
    end
    by_id[id] = nil
    local s = subs[channel]
    for i = #s, 1, -1 do
        if s[i].id == id then
            table.remove(s, i)
        end
    end
    if #s == 0 then
        subs[channel] = nil
    end
    listen(channel, -1)
    return true
end

-- Whether this node's connection listens to channel now (for tests and
-- callers that must not post before the other side listens).
function _M.listening(channel)
    local rc = C.workerbus_pg_listen(channel, #channel, 0)
    if rc < 0 then
        return nil, last_error()
    end
    return rc == 1
end

return _M
