-- resty.worker.events on workerbus: the API of Kong's lua-resty-worker-events
-- 2.0.1, with events carried by the workerbus module's event ring instead
-- of a lua_shared_dict. See docs/worker-events.md.
--
-- Log lines: "worker-events: " prefixes only the handler trace, as in the
-- original (operators grep it); this module's own lines start "workerbus: ".

local need = require "resty.workerbus.need"

local core = need "resty.workerbus.events_core"
local handlers = require "resty.workerbus.handlers"
local wb = require "resty.workerbus"

local ngx = ngx
local log = ngx.log
local ERR = ngx.ERR
local NOTICE = ngx.NOTICE
local DEBUG = ngx.DEBUG
local type = type
local tostring = tostring
local select = select
local ipairs = ipairs
local pairs = pairs
local error = error
local assert = assert
local setmetatable = setmetatable
local floor = math.floor
local ceil = math.ceil
local huge = math.huge

local SOURCE = "resty-worker-events"
local API = 0               -- this API's flag bits in the ring records (no FLAG_EVENTS)
local OWNER = "resty.worker.events"

local DEFAULTS = {
    timeout = 2,
    interval = 1,
    wait_interval = 0.010,
    wait_max = 0.5,
    shm_retries = 999,
}

local _M = {
    _VERSION = "2.0.1",
    _WORKERBUS = "0.1.0",
}

-- Handlers: the shared registry, whose "every source" / "every event" key
-- no caller can pass (register() without a source is for all events).
local ALL = {}
local registry = handlers.new(ALL)

local function do_event(data, event, source, pid)
    registry:dispatch(nil, data, event, source, "pid", pid)
end

local function on_lagged(n)
    do_event(n, "lagged", SOURCE, nil)
end

-- Settings of this worker process (reset when forked from the master).
local conf_pid
local shm_name
local settings = {}
local notice_logged = false

-- Options of a configure() made in init_by_lua (the master): each worker
-- configures itself with them at its first call (register, post, poll,
-- configured), as no timer can start there.
local master_opts

local function configured()
    if master_opts and conf_pid ~= ngx.worker.pid() and ngx.get_phase() ~= "init" then
        local opts = master_opts
        master_opts = nil  -- this worker's copy: once per worker
        local ok, err = _M.configure(opts)
        if not ok then
            log(ERR, "worker-events: configure from init_by_lua failed in this worker: ", err)
        end
    end
    return conf_pid ~= nil and conf_pid == ngx.worker.pid() and core.attached()
end

-- Longest timeout or interval taken: a year (longer ones are mistakes,
-- and the module's timers and claims count milliseconds).
local MAX_SECONDS = 365 * 86400

local function check_number(opts, name, positive)
    local v = opts[name]
    if v == nil then
        v = settings[name] or DEFAULTS[name]
    end
    if type(v) ~= "number" then
        return nil, 'optional "' .. name .. '" option must be a number'
    end
    if v ~= v or v == huge or v == -huge then
        return nil, '"' .. name .. '" must be a finite number, got ' .. tostring(v)
    end
    if name == "shm_retries" then
        if v ~= floor(v) then
            return nil, '"shm_retries" must be a whole number, got ' .. tostring(v)
        end
    elseif v > MAX_SECONDS then
        return nil, '"' .. name .. '" must be at most ' .. MAX_SECONDS
                    .. ' seconds (a year), got ' .. tostring(v)
    end
    if positive and v <= 0 then
        return nil, '"' .. name .. '" must be greater than 0'
    elseif not positive and v < 0 then
        if name == "shm_retries" then
            return nil, '"shm_retries" must be 0 or greater'
        end
        return nil, '"' .. name .. '" must be greater than or equal to 0'
    end
    return v
end

-- A ring record of a 64-byte event: header (32) + data (64) + source and
-- event names (16, say).
local EVENT64 = 112

local function mb(bytes)
    return ceil(bytes / 1048576) .. "m"
end

-- Once on the node per configuration load: the dict named by `shm` is not
-- used; if it is larger than the ring, the ring's capacity and the line
-- that makes the ring as large.
local function dict_notice(shm)
    local zname = core.zone_name()
    if not core.first_on_node("dict-notice:" .. shm) then
        return
    end
    local dict = ngx.shared[shm]
    local dict_cap = dict.capacity and dict:capacity() or 0
    local ring_cap, zone_size
    local st = wb.status()
    for _, z in ipairs(st and st.zones or {}) do
        if z.name == zname and z.events then
            ring_cap, zone_size = z.events.capacity, z.size
        end
    end
    if ring_cap and dict_cap > ring_cap then
        log(NOTICE, "workerbus: shm \"", shm, "\" is a lua_shared_dict of ", dict_cap,
                    " bytes, larger than the event ring of workerbus zone \"", zname,
                    "\": ", ring_cap, " bytes, about ", floor(ring_cap / EVENT64),
                    " events of 64 bytes; events go through the ring and the dict is not ",
                    "used; for a ring as large as the dict, put \"workerbus_zone ", zname,
                    " ", mb(dict_cap * 2 + (zone_size or 0) - 2 * ring_cap),
                    ";\" in nginx.conf's main context")
        return
    end
    log(NOTICE, "workerbus: shm \"", shm, "\" is a lua_shared_dict, not a ",
                "workerbus zone; events go through the event ring of workerbus zone \"",
                zname, "\" and the dict is not used")
end

local function zone_for(shm)
    if type(shm) ~= "string" then
        return nil, 'shm "' .. tostring(shm) .. '" not found'
    end
    local z = wb.zone(shm)
    if z then
        return core.attach(shm, true)
    end
    local primary, err = wb.zone(nil)
    if not primary then
        return nil, err
    end
    if not ngx.shared[shm] then
        return nil, 'shm "' .. shm .. '" not found: it is neither a workerbus_zone nor a lua_shared_dict'
    end
    local idx
    idx, err = core.attach(nil, false)
    if not idx then
        return nil, err
    end
    if not notice_logged then
        notice_logged = true
        dict_notice(shm)
    end
    return idx
end

local function post_stopping()
    if configured() then
        local ok, err = core.post(SOURCE, "stopping", nil, nil, API)
        if not ok then
            log(ERR, "workerbus: cannot post the \"stopping\" event: ", err)
        end
    end
end

local sink_added = false

function _M.configure(opts)
    assert(type(opts) == "table", "Expected a table, got " .. type(opts))

    local started = configured()
    if not started then
        settings = {}
    end

    local shm = opts.shm
    if started and shm ~= nil and shm ~= shm_name then
        return nil, "Already started, cannot change shm"
    end
    if not started and shm == nil then
        return nil, '"shm" option required to start'
    end

    local new = {}
    for _, spec in ipairs({ { "timeout", true }, { "interval", false },
                           { "wait_interval", false }, { "wait_max", false },
                           { "shm_retries", false } }) do
        local v, err = check_number(opts, spec[1], spec[2])
        if not v then
            return nil, err
        end
        new[spec[1]] = v
    end

    if not started then
        local z, err = zone_for(shm)
        if not z then
            return nil, err
        end
        shm_name = shm
        conf_pid = ngx.worker.pid()
        if not sink_added then
            sink_added = true
            core.add_sink(do_event, on_lagged)
            core.on_exit(post_stopping)
        end
    end

    settings = new
    core.set_ttl(API, new.timeout)

    if ngx.get_phase() == "init" then
        -- The master: posts are held for the workers; each worker posts its
        -- own "started" and starts its poller when it configures.
        local copy = {}
        for k, v in pairs(opts) do copy[k] = v end
        copy.shm = shm_name
        master_opts = copy
        return true
    end

    if not started then
        -- We're live: every worker (this one included) gets "started".
        local ok, err = core.post(SOURCE, "started", nil, nil, API)
        if not ok then
            conf_pid = nil
            err = 'failed posting event "started" by "' .. SOURCE .. '"; ' .. tostring(err)
            log(ERR, "workerbus: ", err)
            return nil, err
        end
    end

    local ok, err = core.want_loop(OWNER, new.interval)
    if not ok then
        log(ERR, "workerbus: ", err)
        return nil, err
    end
    return true
end

function _M.configured()
    return configured()
end

local function check_name(what, v)
    if v == nil or v == "" then
        return nil, what .. " is required"
    end
    if type(v) ~= "string" then
        return nil, what .. " must be a string, got " .. type(v)
    end
    return true
end

function _M.post(source, event, data, unique)
    local ok, err = check_name("source", source)
    if not ok then
        return nil, err
    end
    ok, err = check_name("event", event)
    if not ok then
        return nil, err
    end
    if unique ~= nil then
        local t = type(unique)
        if t == "number" then
            unique = tostring(unique)
        elseif t ~= "string" then
            return nil, "unique must be a string, got " .. t
        elseif unique == "" then
            return nil, "unique must not be empty"
        end
    end
    if not configured() then
        return nil, "not configured"
    end

    ok, err = core.post(source, event, data, unique, API)
    if not ok then
        err = 'failed posting event "' .. event .. '" by "' .. source .. '"; ' .. tostring(err)
        log(ERR, "workerbus: ", err)
        return nil, err
    end
    return true
end

function _M.post_local(source, event, data)
    local ok, err = check_name("source", source)
    if not ok then
        return nil, err
    end
    ok, err = check_name("event", event)
    if not ok then
        return nil, err
    end
    return core.post_local(source, event, data)
end

function _M.poll()
    configured()
    local res, err = core.poll()
    if not res then
        log(ERR, "workerbus: ", err)
        return nil, err
    end
    return res
end

local function register(callback, weak, source, ...)
    if type(callback) ~= "function" then
        -- raised without a position, as the original's assert does
        error("expected function, got: " .. type(callback), 0)
    end
    if source == nil then
        registry:add(ALL, ALL, callback, weak)
        return true
    end
    local nev = select("#", ...)
    if nev == 0 then
        registry:add(source, ALL, callback, weak)
        return true
    end
    for i = 1, nev do
        local event = select(i, ...)
        if event == nil then
            break
        end
        registry:add(source, event, callback, weak)
    end
    return true
end

function _M.register(callback, source, ...)
    configured()
    register(callback, false, source, ...)
    return true
end

function _M.register_weak(callback, source, ...)
    register(callback, true, source, ...)
    return true
end

function _M.unregister(callback, source, ...)
    if type(callback) ~= "function" then
        error("expected function, got: " .. type(callback), 0)
    end
    if source == nil then
        return registry:remove(ALL, ALL, callback)
    end
    local nev = select("#", ...)
    if nev == 0 then
        return registry:remove(source, ALL, callback)
    end
    local found = false
    for i = 1, nev do
        local event = select(i, ...)
        if event == nil then
            break
        end
        if registry:remove(source, event, callback) then
            found = true
        end
    end
    return found
end

local function unknown_event(_, key)
    error("event '" .. tostring(key) .. "' is an unknown event", 2)
end

function _M.event_list(source, ...)
    local events = { _source = source }
    for i = 1, select("#", ...) do
        local event = select(i, ...)
        if event ~= nil then
            events[event] = event
        end
    end
    return setmetatable(events, { __index = unknown_event })
end

_M.events = _M.event_list(SOURCE, "started", "stopping", "lagged")

-- Every worker of every node that shares the PostgreSQL database
-- (workerbus_postgres; docs/postgres.md). Handlers get (data, event,
-- source, pid) as for post(); pid is 0: the poster may be on another node.
function _M.post_cluster(source, event, data)
    return require("resty.workerbus.cluster").post(source, event, data, 0)
end

return _M
