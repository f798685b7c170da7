-- resty.events.compat on workerbus: the resty.worker.events-style face that
-- lua-resty-events ships (configure, configured, run, poll, post,
-- post_local, register, register_weak, unregister, event_list), over one
-- resty.events object, hence over the same ring and poller as the rest.
-- Kong and lua-resty-healthcheck load it by this name. See docs/events.md.

local events = require "resty.events"
local core = require "resty.workerbus.events_core"

local type = type
local select = select
local assert = assert
local pairs = pairs
local tremove = table.remove

local _M = {
    _VERSION = events._VERSION,   -- as the original: resty.events' version
}

local ev            -- the resty.events object made by configure
local configured = false

-- callback -> list of { id, source, event } it was registered with
local registered = {}

function _M.configure(opts)
    -- events.new raises on bad options, as the original's configure does.
    local new = events.new(opts)
    local ok, err = new:init_worker()
    if not ok then
        return nil, err
    end
    -- Callbacks registered before (or with an earlier configure) move over
    -- to the new object, so that none is lost or called twice.
    for callback, regs in pairs(registered) do
        for i = 1, #regs do
            local r = regs[i]
            if ev and r.id then
                ev:unsubscribe(r.id)
            end
            r.id = new:subscribe(r.source, r.event, callback)
        end
    end
    if ev and ev ~= new then
        ev:_close()
    end
    ev = new
    configured = true
    return true
end

function _M.configured()
    return configured
end

function _M.run()
    return events.run()
end

local function need_ev()
    assert(ev, "resty.events.compat is not configured (call configure first)")
    return ev
end

-- Delivers what waits for this worker (ring and local events) before it
-- returns, where the original sleeps 2 ms and hopes. Called from a handler
-- it returns at once; "done" either way.
function _M.poll()
    local res, err = core.poll()
    if not res then
        return nil, err
    end
    return "done"
end

function _M.post(source, event, data, unique)
    local ok, err = need_ev():publish(unique or "all", source, event, data)
    if not ok then
        return nil, err
    end
    return "done"
end

function _M.post_local(source, event, data)
    local ok, err = need_ev():publish("current", source, event, data)
    if not ok then
        return nil, err
    end
    return "done"
end

-- register(callback, source, event1, event2, ...): source and events
-- default to "*" (all sources, all events of that source). Before
-- configure (which the original does not allow), kept until configure.
function _M.register(callback, source, event, ...)
    assert(type(callback) == "function", "expected function, got: " .. type(callback))
    source = source or "*"
    local regs = registered[callback]
    if not regs then
        regs = {}
        registered[callback] = regs
    end
    for i = 0, select("#", ...) do
        local name
        if i == 0 then
            name = event or "*"
        else
            name = select(i, ...) or "*"
        end
        regs[#regs + 1] = {
            id = ev and ev:subscribe(source, name, callback),
            source = source,
            event = name,
        }
    end
end

-- The original keeps a strong reference here too.
_M.register_weak = _M.register

-- unregister(callback[, source[, event1, ...]]): removes the callback's
-- registrations, all of them or those of that source (and those events).
-- Returns true when one was removed, false when none matched.
function _M.unregister(callback, source, ...)
    local regs = registered[callback]
    if not regs then
        return false
    end
    local n = select("#", ...)
    local removed = false
    local i = 1
    while i <= #regs do
        local r = regs[i]
        local match = source == nil or r.source == source
        if match and n > 0 then
            match = false
            for j = 1, n do
                if select(j, ...) == r.event then
                    match = true
                    break
                end
            end
        end
        if match then
            if r.id then
                ev:unsubscribe(r.id)
            end
            tremove(regs, i)
            removed = true
        else
            i = i + 1
        end
    end
    if #regs == 0 then
        registered[callback] = nil
    end
    return removed
end

-- The same utility as resty.worker.events' (unknown events raise).
_M.event_list = require("resty.worker.events").event_list

return _M
