-- resty.sync: data synchronized by version (the lua-resty-sync 0.06 API) on
-- the workerbus module. The module keeps, per instance, a runner lease
-- (exactly one worker of the node runs the callbacks) and, per task, the
-- last update (version, data, last-modified time) as one block in a zone's
-- slab. This file only encodes Lua values, calls the FFI and schedules runs.
-- See docs/sync.md.

local ffi = require "ffi"
local need = require "resty.workerbus.need"

local wb = need "resty.workerbus"
local core = need "resty.workerbus.events_core"
local value = need "resty.workerbus.sync_value"

local C = ffi.C
local type = type
local tostring = tostring
local tonumber = tonumber
local pcall = pcall
local xpcall = xpcall
local traceback = debug.traceback
local setmetatable = setmetatable
local str_find = string.find
local ngx = ngx
local log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local INFO = ngx.INFO
-- Every schedule and duration here is on the monotonic clock (nginx's
-- ngx_current_msec, the one the runner lease uses), which a wall-clock step
-- does not move: ngx.now() would run a task at once after a step forward
-- and not for an hour after a step back. Only an update's last-modified time
-- is wall-clock (the module stamps it when publishing).
local monotonic_msec = require("resty.core.time").monotonic_msec
local update_time = ngx.update_time
local timer_at = ngx.timer.at
local exiting = ngx.worker.exiting
local last_error = wb.last_error

-- Monotonic seconds, as of the last time update.
local function now()
    return monotonic_msec() / 1000
end

local EVENT_SOURCE = "workerbus.sync"
-- trigger(): wakes the runner's worker (a private source: no sink sees it).
local TRIGGER_SOURCE = "workerbus.sync.trigger"
-- Longest pause between two lease ticks, and the lease in ticks.
local MAX_TICK = 1
local LEASE_TICKS, MIN_LEASE = 3, 3

local _M = {
    _VERSION = "0.06",
    ACTION_DATA = 0,
    ACTION_VERSION = 1,
}

local mt = { __index = _M }
local ordinals = {}     -- shm -> instances made under that name in this worker
local by_event = {}     -- "<zone>:<task>" -> task, for on_update
local by_inst = {}      -- "<zone>:<inst>" -> started instance, for triggers
local sink_added = false

local encode, refresh = value.encode, value.refresh

local function notify(task)
    if not refresh(task) or task.notified == task.seq then
        return
    end
    task.notified = task.seq
    local hs = task.handlers
    for i = 1, #hs do
        local ok, err = xpcall(hs[i], traceback, task.data, task.version)
        if not ok then
            log(ERR, "sync: on_update handler of tag \"", task.tag, "\" failed: ", err)
        end
    end
end

local function on_event(data, event, source)
    if source ~= EVENT_SOURCE then
        return
    end
    local task = by_event[event]
    if task then
        notify(task)
    end
end

-- The ring lapped this worker: look at every task.
local function on_lagged()
    for _, task in pairs(by_event) do
        notify(task)
    end
end

function _M.new(interval, shm)
    if type(interval) ~= "number" or not (interval > 0) or interval == math.huge then
        return nil, "interval must be a number greater than 0"
    end
    if type(shm) ~= "string" then
        return nil, "shm must be a string"
    end
    local zone, key
    local z = wb.zone(shm)
    if z then
        zone, key = z, shm
    elseif ngx.shared[shm] then
        -- A lua_shared_dict name: the instance lives in the primary workerbus zone.
        local err
        zone, err = wb.zone(nil)
        if not zone then
            return nil, err
        end
        key = "dict:" .. shm
    else
        return nil, "no shared memory zone \"" .. shm .. "\": declare \"workerbus_zone "
                    .. shm .. " <size>;\" or \"lua_shared_dict " .. shm .. " <size>;\""
    end
    local n = (ordinals[shm] or 0) + 1
    key = key .. "#" .. n
    local inst = C.workerbus_sync_instance(zone, key, #key, interval * 1000)
    if inst < 0 then
        return nil, last_error()
    end
    ordinals[shm] = n
    local tick = interval < MAX_TICK and interval or MAX_TICK
    local lease = tick * LEASE_TICKS
    return setmetatable({
        interval = interval,
        zone = zone,
        inst = inst,
        key = key,
        tick = tick,
        lease_ms = (lease > MIN_LEASE and lease or MIN_LEASE) * 1000,
        tasks = {},
        order = {},
        started = false,
    }, mt)
end

function _M.register(self, callback, tag)
    if self.started then
        return nil, "cannot register after start"
    end
    if type(callback) ~= "function" then
        return nil, "callback must be a function"
    end
    if type(tag) ~= "string" then
        return nil, "tag must be a string"
    end
    if self.tasks[tag] then
        return nil, "tag \"" .. tag .. "\" is already registered"
    end
    local idx = C.workerbus_sync_task(self.zone, self.inst, tag, #tag)
    if idx < 0 then
        return nil, "tag \"" .. tag .. "\": " .. last_error()
    end
    local task = {
        tag = tag,
        callback = callback,
        zone = self.zone,
        idx = idx,
        seqp = C.workerbus_sync_seq_ptr(self.zone, idx),
        seq = 0,
        notified = 0,
        handlers = {},
        scheduled = false,  -- its interval timer is pending
        running = false,    -- a run (or a chain of triggered runs) is under way
        kicked = false,     -- an immediate run is coming (a trigger)
    }
    self.tasks[tag] = task
    self.order[#self.order + 1] = task
    by_event[self.zone .. ":" .. idx] = task
    return true
end

-- The callback's answer for `mode`, or nil, err.
local function ask(task, mode, allow_table)
    local ok, v = pcall(task.callback, mode)
    if not ok then
        return nil, "callback raised: " .. tostring(v)
    end
    if v == nil then
        return nil, "callback returned nil for the " .. (mode == 1 and "version" or "data")
    end
    local t, s = encode(v, allow_table)
    if not t then
        return nil, (mode == 1 and "version: " or "data: ") .. s
    end
    return v, t, s
end

local function fetch(self, task)
    local version, vt, vs = ask(task, 1, false)
    if version == nil then
        return nil, vt
    end
    if refresh(task) and task.version == version then
        return true
    end
    local data, dt, ds = ask(task, 0, true)
    if data == nil then
        return nil, dt
    end
    if C.workerbus_sync_runner(self.zone, self.inst) ~= ngx.worker.pid() then
        -- Taken over while the callback ran (this worker was stuck): the new runner decides.
        return nil, "no longer the runner; this update is dropped"
    end
    local seq = C.workerbus_sync_publish(self.zone, task.idx, vt, vs, #vs, dt, ds, #ds)
    if seq < 0 then
        return nil, last_error() .. "; previous data kept"
    end
    notify(task)
    local ok, err = core.post(EVENT_SOURCE, self.zone .. ":" .. task.idx, tostring(seq), nil, 0)
    if not ok then
        log(WARN, "sync: tag \"", task.tag, "\": update ", tostring(seq),
                  " published, but its event was not posted: ", err)
    end
    return true
end

-- One run of one task; `in_init`: from init_worker, where a failure is
-- retried at once from a timer (no cosocket or ngx.sleep there).
local function run(self, task, in_init)
    if C.workerbus_sync_begin_run(self.zone, self.inst) ~= 1 then
        return false
    end
    update_time()
    local started = monotonic_msec()
    local ok, res, err = pcall(fetch, self, task)
    C.workerbus_sync_end_run(self.zone, self.inst)
    update_time()
    local dur_us = (monotonic_msec() - started) * 1000
    if not ok then
        err = res
    elseif res == true then
        C.workerbus_sync_record_run(self.zone, task.idx, started, dur_us, nil, 0)
        return true
    end
    local msg = tostring(err)
    if in_init then
        log(INFO, "sync: tag \"", task.tag, "\" failed in init_worker (", msg, "); retried from a timer")
        return false, msg
    end
    log(ERR, "sync: tag \"", task.tag, "\" of \"", self.key, "\": ", msg)
    C.workerbus_sync_record_run(self.zone, task.idx, started, dur_us, msg, #msg)
    return false, msg
end

local schedule, go

-- A triggered run, soon: unless one is under way (its loop looks at the
-- trigger again when the run ends) or already coming. A trigger whose
-- timer cannot be made stays in the zone: the next tick sees it.
local function kick_timer(premature, self, task)
    task.kicked = false
    if not premature then
        go(self, task, false)
    end
end

local function kick(self, task)
    if task.running or task.kicked or exiting() then
        return
    end
    local ok, err = timer_at(0, kick_timer, self, task)
    if not ok then
        log(ERR, "sync: cannot run triggered tag \"", task.tag, "\" now (the next tick will): ", err)
        return
    end
    task.kicked = true
end

-- Runs the task (`forced`: its interval passed), then again as long as a
-- trigger asks for one: the zone's trigger word is taken right before each
-- run, so a trigger during a run makes exactly one more run after it, and
-- any number of triggers before a run make that one run. `task.running`
-- keeps a second run of the task from starting in this worker (the only
-- one that runs it: the lease's owner); nothing yields between the last
-- look at the trigger word and clearing it, so a trigger's event that
-- finds it set is always followed by that look.
go = function(self, task, forced)
    if task.running then
        return
    end
    task.running = true
    local started, runner = nil, true
    while true do
        if exiting() or C.workerbus_sync_tick(self.zone, self.inst, self.lease_ms, 0) ~= 1 then
            runner = false
            break
        end
        local asked = C.workerbus_sync_triggered(self.zone, task.idx, 1) == 1
        if not (forced or asked) then
            break
        end
        forced = false
        update_time()
        started = now()
        run(self, task, false)
    end
    task.running = false
    if runner and started then
        schedule(self, task, started + self.interval - now())
    end
end

-- The task's interval passed. A run under way (a triggered one) schedules
-- the next interval itself when it ends.
local function run_timer(premature, self, task)
    task.scheduled = false
    if premature or exiting() or task.running then
        return
    end
    go(self, task, true)
end

schedule = function(self, task, delay)
    if task.scheduled or exiting() then
        return
    end
    -- At least 1 ms: a 0 s timer made by an expiring timer expires in the
    -- same pass, and a chain of them would never let the event loop turn.
    local ok, err = timer_at(delay > 0.001 and delay or 0.001, run_timer, self, task)
    if not ok then
        log(ERR, "sync: cannot schedule tag \"", task.tag, "\": ", err)
        return
    end
    task.scheduled = true
end

-- Every worker, every tick: renew, take or leave the runner lease; a new
-- runner starts every task's schedule, and the runner runs the triggered
-- tasks whose wake-up it missed (made while no live worker held the lease,
-- or whose event could not be posted).
local function tick(premature, self)
    local going = premature or exiting()
    local role = C.workerbus_sync_tick(self.zone, self.inst, self.lease_ms, going and 1 or 0)
    if role == 1 and not going then
        for i = 1, #self.order do
            local task = self.order[i]
            if not task.scheduled and not task.running then
                -- A new runner keeps its predecessor's schedule.
                local last = tonumber(C.workerbus_sync_last_run_ms(self.zone, task.idx)) / 1000
                local delay = last + self.interval - now()
                -- Never more than an interval away, whatever the stamp says
                -- (a wall-clock stamp of an older module in a kept zone
                -- would otherwise put the run off for decades).
                schedule(self, task, delay < self.interval and delay or self.interval)
            end
            if not task.running and C.workerbus_sync_triggered(self.zone, task.idx, 0) == 1 then
                kick(self, task)
            end
        end
    end
end

-- The tasks named by a trigger: `tag` or, when it is nil (or "" from a
-- channel), all of them.
local function tasks_of(self, tag)
    if tag == nil or tag == "" then
        return self.order
    end
    local task = self.tasks[tag]
    return task and { task }
end

local function is_runner(self)
    return C.workerbus_sync_runner(self.zone, self.inst) == ngx.worker.pid()
end

-- A trigger's event, in every worker: the runner starts the runs.
local function on_trigger(tag, event)
    local self = by_inst[event]
    if not self or not is_runner(self) then
        return
    end
    local list = tasks_of(self, tag)
    for i = 1, list and #list or 0 do
        kick(self, list[i])
    end
end

function _M.start(self)
    if self.started then
        return nil, "already started"
    end
    self.started = true
    if not sink_added then
        local ok, err = core.attach(nil, false)
        if not ok then
            return nil, "cannot attach to the event ring: " .. tostring(err)
        end
        sink_added = true
        core.add_sink(on_event, on_lagged)
        core.add_private_source(TRIGGER_SOURCE, on_trigger)
        local ok, err = core.want_loop("resty.sync", 3600)
        if not ok then
            log(ERR, "sync: on_update will not fire: ", err)
        end
    end
    local in_init = ngx.get_phase() == "init_worker"
    local role = C.workerbus_sync_tick(self.zone, self.inst, self.lease_ms, 0)
    if role == 1 then
        update_time()
        local started = now()
        for i = 1, #self.order do
            local task = self.order[i]
            C.workerbus_sync_triggered(self.zone, task.idx, 1)   -- this run answers it
            local ok = run(self, task, in_init)
            -- A failure in init_worker is retried at once; the rest wait an interval.
            schedule(self, task, ok and started + self.interval - now() or 0)
        end
    end
    local ok, err = ngx.timer.every(self.tick, tick, self)
    if not ok then
        return nil, "cannot start the sync timer: " .. tostring(err)
    end
    by_inst[self.zone .. ":" .. self.inst] = self
    return true
end

-- Runs the version check of task `tag` (every task when nil) at once in the
-- instance's runner on this node, wherever it is called; triggers coalesce,
-- and a trigger during a run makes one more run after it. The request is
-- kept in the zone until the runner takes it (a runner that dies first
-- leaves it to the next), and the runner's worker is woken through the
-- event ring.
function _M.trigger(self, tag)
    if not self.started then
        return nil, "not started: call start() first"
    end
    if tag ~= nil and type(tag) ~= "string" then
        return nil, "tag must be a string or nil"
    end
    local list = tag ~= "" and tasks_of(self, tag)
    if not list then
        return nil, "unknown tag \"" .. tag .. "\""
    end
    for i = 1, #list do
        if C.workerbus_sync_trigger(self.zone, list[i].idx) ~= 1 then
            return nil, last_error()
        end
    end
    if is_runner(self) then
        for i = 1, #list do
            kick(self, list[i])
        end
        return true
    end
    local ok, err = core.post(TRIGGER_SOURCE, self.zone .. ":" .. self.inst, tag or "", nil, 0)
    if not ok then
        -- The request is in the zone: the runner's next tick (within 1 s) runs it.
        log(WARN, "sync: trigger of \"", self.key, "\" could not wake the runner (",
                  err, "): it runs at the runner's next tick")
    end
    return true
end

-- A post on PostgreSQL channel `channel` (from any node, or from SQL:
-- `SELECT workerbus_post(channel, tag)`) triggers `tag` (every task when
-- the payload is empty) in the runner of every node that listens. Every
-- worker records the request in the zone (the runner also starts it), so
-- a runner that dies as the post arrives leaves it to the next.
function _M.trigger_on(self, channel)
    if type(channel) ~= "string" then
        return nil, "channel must be a string"
    end
    local ok, id, err = pcall(wb.subscribe, channel, function(payload)
        if not self.started then
            return
        end
        local list = tasks_of(self, payload)
        local me = is_runner(self)
        if not list then
            if me then
                log(WARN, "sync \"", self.key, "\": a post on channel \"", channel,
                          "\" names no tag of it: \"", payload, "\"; ignored")
            end
            return
        end
        for i = 1, #list do
            C.workerbus_sync_trigger(self.zone, list[i].idx)
            if me then
                kick(self, list[i])
            end
        end
    end)
    if not ok then
        return nil, tostring(id)
    end
    if not id then
        return nil, err
    end
    return true
end

local function task_of(self, tag)
    if not self.started then
        return nil, "not started: call start() first"
    end
    if type(tag) ~= "string" then
        return nil, "tag must be a string"
    end
    local task = self.tasks[tag]
    if not task then
        return nil, "unknown tag \"" .. tag .. "\""
    end
    if not refresh(task) then
        return nil, "no data"
    end
    return task
end

function _M.get_version(self, tag)
    local task, err = task_of(self, tag)
    if not task then
        return nil, err
    end
    return task.version
end

-- A table is decoded once per version and shared by every call: read-only.
function _M.get_data(self, tag)
    local task, err = task_of(self, tag)
    if not task then
        return nil, err
    end
    return task.data
end

function _M.get_last_modified_time(self, tag)
    local task, err = task_of(self, tag)
    if not task then
        return nil, err
    end
    return task.modified
end

-- data, version, last_modified of one and the same update.
function _M.get(self, tag)
    local task, err = task_of(self, tag)
    if not task then
        return nil, err
    end
    return task.data, task.version, task.modified
end

-- fn(data, version) runs in every worker once per new version it sees.
function _M.on_update(self, tag, fn)
    if type(tag) ~= "string" then
        return nil, "tag must be a string"
    end
    if type(fn) ~= "function" then
        return nil, "handler must be a function"
    end
    local task = self.tasks[tag]
    if not task then
        return nil, "unknown tag \"" .. tag .. "\""
    end
    task.handlers[#task.handlers + 1] = fn
    return true
end

-- How many updates this worker copied out of the zone (all instances).
function _M.copies()
    return value.copies()
end

-- The pid of the worker running this instance's callbacks (0: none yet).
function _M.runner(self)
    return C.workerbus_sync_runner(self.zone, self.inst)
end

return _M
