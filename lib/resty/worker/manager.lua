-- resty.worker.manager: the API of Kong's lua-resty-worker-manager, driven
-- by the workerbus module's own lifecycle table. The module records every
-- configuration load (init_module), worker start (init_process), exit
-- (exit_process) and crash itself, so the counts the callbacks get are not
-- guessed from heartbeats kept in a shared dict. See docs/worker-manager.md.

local ffi = require "ffi"
local bit = require "bit"
local wb = require "resty.workerbus"

local C = wb.C
local type = type
local error = error
local tostring = tostring
local tonumber = tonumber
local xpcall = xpcall
local band = bit.band
local traceback = debug.traceback
local ngx = ngx
local ngx_log = ngx.log
local ngx_sleep = ngx.sleep
local timer_at = ngx.timer.at
local get_phase = ngx.get_phase
local worker_pid = ngx.worker.pid
local ERR, WARN = ngx.ERR, ngx.WARN

ffi.cdef [[
    int workerbus_lc_lock(void);
    void workerbus_lc_unlock(void);
    int workerbus_lc_lock_owner(void);
    int workerbus_lc_counts(uint64_t generation, double failed_sec, int64_t *out);
    int workerbus_lc_mark_started(void);
    int workerbus_lc_leave(void);
    int workerbus_lc_claim_master_start(uint64_t generation);
    int workerbus_lc_claim_master_exit(uint64_t generation);
    int workerbus_lc_gen_flags(uint64_t generation);
    int workerbus_lc_set_hang_timeout(double sec);
    uint64_t workerbus_lc_current_generation(void);
]]

local _M = { _VERSION = "0.1.0" }

local NAME = "resty.worker.manager"
-- Longest wait for the node lock, as the original's lock auto-release: past
-- it (a callback that never returns, a stopped holder) the callback runs
-- unserialized, with a warning.
local LOCK_WAIT = 30
-- Longest wait of an old worker's exit for the new generation's master
-- start, on a reload (see await_next_master).
local RELOAD_WAIT = 2
local GEN_MASTER_STARTED = 1
-- A timer that only ever fires prematurely: when the worker exits.
local FOREVER = 365 * 24 * 3600

local conf    -- set by on_init_by_lua
local worker  -- set by on_init_worker_by_lua
local counts = ffi.new("int64_t[3]")

local function raise(msg, level)
    error(NAME .. ": " .. msg, level + 1)
end

local function check_phase(fn, want, what)
    local phase = get_phase()
    if phase ~= want then
        raise(fn .. " must be called in " .. what .. ", not in " .. tostring(phase), 3)
    end
end

local function check_cb(name, cb)
    if cb ~= nil and type(cb) ~= "function" then
        raise(name .. " must be a function, got " .. type(cb), 3)
    end
end

-- n_prev, n_mine, n_next of `generation`. failed > 0: workers that died
-- less than `failed` s ago still count in n_mine (worker and master start).
local function get_counts(generation, failed)
    if C.workerbus_lc_counts(generation, failed, counts) < 0 then
        ngx_log(ERR, NAME, ": cannot count workers: ", wb.last_error())
        return nil, 0, nil
    end
    local n_prev, n_mine, n_next = tonumber(counts[0]), tonumber(counts[1]), tonumber(counts[2])
    return n_prev >= 0 and n_prev or nil, n_mine, n_next >= 0 and n_next or nil
end

local function call(what, cb, id, n_prev, n_mine, n_next)
    if cb then
        local ok, err = xpcall(cb, traceback, id, n_prev, n_mine, n_next)
        if not ok then
            ngx_log(ERR, NAME, ": ", what, " callback failed: ", tostring(err))
        end
    end
end

-- Takes the node-wide lock: retries every 1 ms, backing off to 10 ms. It is
-- not reentrant, so this worker's other light threads wait as well.
local function lock()
    local delay, waited = 0.001, 0
    while true do
        local rc = C.workerbus_lc_lock()
        if rc == 1 then
            return true
        elseif rc < 0 then
            return nil, wb.last_error()
        elseif waited >= LOCK_WAIT then
            return nil, "still held by pid " .. C.workerbus_lc_lock_owner() .. " after " .. LOCK_WAIT .. " s"
        end
        ngx_sleep(delay)
        waited = waited + delay
        if delay < 0.01 then
            delay = delay * 2 < 0.01 and delay * 2 or 0.01
        end
    end
end

-- Runs fn holding the node-wide lock: no two callbacks run at once on the node.
local function locked(what, fn)
    local held, err = lock()
    if not held then
        ngx_log(WARN, NAME, ": ", what, ": node lock not taken (", err, "); running unserialized")
    end
    local ok, perr = xpcall(fn, traceback)
    if held then
        C.workerbus_lc_unlock()
    end
    if not ok then
        ngx_log(ERR, NAME, ": ", what, ": ", tostring(perr))
    end
end

-- On a reload the master starts the new generation's workers, then tells
-- the old ones to quit. The original ran "master start" in init_by_lua, in
-- the master, before that; here it runs in the first new worker. So an old
-- worker's exit waits for it (RELOAD_WAIT at most, for a new configuration
-- that does not use this module): "master start" then sees every old worker
-- (n_prev) and the old workers' exits see the new generation (n_next).
local function await_next_master(generation)
    local waited = 0
    while waited < RELOAD_WAIT do
        local newest = C.workerbus_lc_current_generation()
        if newest <= generation then
            return
        end
        local flags = C.workerbus_lc_gen_flags(newest)
        if flags < 0 or band(flags, GEN_MASTER_STARTED) ~= 0 then
            return
        end
        ngx_sleep(0.005)
        waited = waited + 0.005
    end
end

local function on_start(premature)
    if premature then
        return  -- exiting before the start ran: this worker never counted
    end
    local w = worker
    w.starting = true
    locked("worker start", function()
        local generation = w.generation
        if C.workerbus_lc_claim_master_start(generation) == 1 then
            call("master start", conf.master_start, generation, get_counts(generation, conf.failed))
        end
        if C.workerbus_lc_mark_started() < 0 then
            error("worker not tracked, its callbacks do not run: " .. wb.last_error())
        end
        w.started = true
        call("worker start", w.start, worker_pid(), get_counts(generation, conf.failed))
    end)
    w.starting = false
end

local function on_exit(premature)
    if not premature then
        return
    end
    local w = worker
    while w.starting do
        ngx_sleep(0.005)  -- a start still in progress runs to its end first
    end
    if not w.started then
        return
    end
    local generation = w.generation
    await_next_master(generation)
    locked("worker exit", function()
        -- No `failed` grace here: a dead worker must not keep the last
        -- living one from seeing n_mine == 1.
        local n_prev, n_mine, n_next = get_counts(generation, 0)
        call("worker exit", w.exit, worker_pid(), n_prev, n_mine, n_next)
        if C.workerbus_lc_leave() < 0 then
            ngx_log(ERR, NAME, ": ", wb.last_error())
        end
        if n_mine <= 1 and C.workerbus_lc_claim_master_exit(generation) == 1 then
            call("master exit", conf.master_exit, generation, get_counts(generation, 0))
        end
    end)
end

--- In init_by_lua. opts: shm (required, a name; see the docs), interval
-- (heartbeat, s, default 10), failed (s, default 5). The master callbacks
-- get the generation number as their id.
function _M.on_init_by_lua(opts, master_start_cb, master_exit_cb)
    check_phase("on_init_by_lua", "init", "init_by_lua")
    if conf then
        raise("on_init_by_lua was already called", 2)
    end
    if type(opts) ~= "table" then
        raise("opts must be a table, got " .. type(opts), 2)
    end
    if type(opts.shm) ~= "string" or opts.shm == "" then
        raise("opts.shm is required (a string)", 2)
    end
    for _, k in ipairs { "interval", "failed" } do
        local v = opts[k]
        if v ~= nil and (type(v) ~= "number" or not (v > 0) or v == math.huge) then
            raise("opts." .. k .. " must be a positive number", 2)
        end
    end
    check_cb("master_start_cb", master_start_cb)
    check_cb("master_exit_cb", master_exit_cb)
    conf = {
        shm = opts.shm,
        interval = opts.interval or 10,
        failed = opts.failed or 5,
        master_start = master_start_cb,
        master_exit = master_exit_cb,
    }
    return true
end

--- In init_worker_by_lua. The worker callbacks get the worker's pid as their id.
function _M.on_init_worker_by_lua(start_cb, exit_cb)
    check_phase("on_init_worker_by_lua", "init_worker", "init_worker_by_lua")
    if not conf then
        raise("on_init_by_lua must be called first, in init_by_lua", 2)
    end
    if worker then
        raise("on_init_worker_by_lua was already called", 2)
    end
    check_cb("start_cb", start_cb)
    check_cb("exit_cb", exit_cb)
    worker = {
        start = start_cb,
        exit = exit_cb,
        generation = wb.generation(),
        starting = false,
        started = false,
    }
    -- The privileged agent runs init_worker_by_lua too, but is no worker.
    local okp, process = pcall(require, "ngx.process")
    if okp and process.type() == "privileged agent" then
        return true
    end
    if C.workerbus_lc_set_hang_timeout(conf.failed) < 0 then
        ngx_log(ERR, NAME, ": cannot set the hang timeout: ", wb.last_error())
    end
    -- init_worker cannot wait for the lock; timers can. The exit timer is
    -- armed now, so that an exit during a slow start is never missed.
    local ok, err = timer_at(FOREVER, on_exit)
    if ok then
        ok, err = timer_at(0, on_start)
    end
    if not ok then
        raise("cannot start: " .. tostring(err), 2)
    end
    return true
end

return _M
