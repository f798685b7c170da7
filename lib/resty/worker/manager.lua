-- resty.worker.manager: the API of Kong's lua-resty-worker-manager, driven
-- by the workerbus module's own lifecycle table. The module records every
-- configuration load (init_module), worker start (init_process), exit
-- (exit_process) and crash itself, so the counts the callbacks get are not
-- guessed from heartbeats kept in a shared dict. See docs/worker-manager.md.

local ffi = require "ffi"
local wb = require "resty.workerbus"

local C = wb.C
local type = type
local error = error
local tostring = tostring
local tonumber = tonumber
local xpcall = xpcall
local traceback = debug.traceback
local ngx = ngx
local ngx_log = ngx.log
local ngx_sleep = ngx.sleep
local timer_at = ngx.timer.at
local get_phase = ngx.get_phase
local worker_pid = ngx.worker.pid
local ERR, WARN = ngx.ERR, ngx.WARN

-- libc, not the module's ABI (whose declarations are all in resty.workerbus)
ffi.cdef [[
    int usleep(unsigned int usec);
]]

local _M = { _VERSION = "0.1.0" }

local NAME = "resty.worker.manager"
-- Longest wait for the node lock, as the original's lock auto-release: past
-- it (a callback that never returns, a stopped holder) the callback runs
-- unserialized, with a warning.
local LOCK_WAIT = 30
-- Longest wait of an old worker's exit for the new generation's first
-- worker, on a reload (see await_next_generation).
local RELOAD_WAIT = 2
-- A timer that only ever fires prematurely: when the worker exits.
local FOREVER = 365 * 24 * 3600

local conf    -- set by on_init_by_lua
local worker  -- set by on_init_worker_by_lua
local counts = wb.counts      -- the scratch set's (resty.workerbus)
local master_id = wb.ids

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
-- `blocking` (init_worker, where nothing may yield): the worker blocks 1 ms
-- between tries, and only itself.
local function lock(blocking)
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
        if blocking then
            C.usleep(1000)
        else
            ngx_sleep(delay)
        end
        waited = waited + delay
        if delay < 0.01 and not blocking then
            delay = delay * 2 < 0.01 and delay * 2 or 0.01
        end
    end
end

-- Runs fn holding the node-wide lock: no two callbacks run at once on the node.
local function locked(what, fn, blocking)
    local held, err = lock(blocking)
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

-- On a reload the master runs the new configuration's init_by_lua (master
-- start, which then sees every old worker in n_prev), starts the new
-- workers, then tells the old ones to quit. An old worker's exit waits for
-- the first new worker to be tracked (RELOAD_WAIT at most, for a new
-- configuration that does not use this module), so that it sees n_next.
local function await_next_generation(generation)
    local waited = 0
    while waited < RELOAD_WAIT do
        if C.workerbus_lc_current_generation() <= generation then
            return
        end
        local _, _, n_next = get_counts(generation, 0)
        if n_next and n_next > 0 then
            return
        end
        ngx_sleep(0.005)
        waited = waited + 0.005
    end
end

-- The worker start, in init_worker: before on_init_worker_by_lua returns.
local function on_start()
    local w = worker
    locked("worker start", function()
        if C.workerbus_lc_mark_started() < 0 then
            error("worker not tracked, its callbacks do not run: " .. wb.last_error())
        end
        w.started = true
        call("worker start", w.start, w.id, get_counts(w.generation, conf.failed))
    end, true)
end

local function on_exit(premature)
    if not premature then
        return
    end
    local w = worker
    if not w.started then
        return
    end
    local generation = w.generation
    await_next_generation(generation)
    locked("worker exit", function()
        -- No `failed` grace here: a dead worker must not keep the last
        -- living one from seeing n_mine == 1.
        local n_prev, n_mine, n_next = get_counts(generation, 0)
        call("worker exit", w.exit, w.id, n_prev, n_mine, n_next)
        if C.workerbus_lc_leave() < 0 then
            ngx_log(ERR, NAME, ": ", wb.last_error())
        end
        if n_mine <= 1 and C.workerbus_lc_take_master_exit(generation) == 1 then
            call("master exit", conf.master_exit, generation, get_counts(generation, 0))
        end
    end)
end

--- In init_by_lua. opts: shm (required, a name; see the docs), interval
-- (heartbeat, s, default 10), failed (s, default 5). The master start
-- callback runs here, in the master, before this returns: what it sets up
-- is inherited by every worker. The master callbacks get the generation
-- number as their id (1 at a fresh start, one more per reload).
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
    if C.workerbus_lc_master_counts(master_id, counts) < 0 then
        raise("cannot count workers: " .. wb.last_error(), 2)
    end
    local n_prev, n_next = tonumber(counts[0]), tonumber(counts[2])
    conf.master_id = tonumber(master_id[0])
    call("master start", master_start_cb, conf.master_id, n_prev >= 0 and n_prev or nil,
         tonumber(counts[1]), n_next >= 0 and n_next or nil)
    return true
end

--- In init_worker_by_lua. The worker start callback runs before this
-- returns. The worker callbacks get "<master id>-<pid>" as their id.
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
        started = false,
    }
    worker.id = worker.generation .. "-" .. worker_pid()
    -- The privileged agent runs init_worker_by_lua too, but is no worker.
    local okp, process = pcall(require, "ngx.process")
    if okp and process.type() == "privileged agent" then
        return true
    end
    if C.workerbus_lc_set_hang_timeout(conf.failed) < 0 then
        ngx_log(ERR, NAME, ": cannot set the hang timeout: ", wb.last_error())
    end
    -- The exit runs as the premature run of a timer armed now.
    local ok, err = timer_at(FOREVER, on_exit)
    if not ok then
        raise("cannot start: " .. tostring(err), 2)
    end
    on_start()
    return true
end

return _M
