-- resty.worker.manager: drop-in for Kong's lua-resty-worker-manager, driven
-- by the workerbus module's own lifecycle table (it sees every start, exit
-- and crash itself) instead of heartbeats kept in a shared dict.
-- See docs/worker-manager.md.

local ffi = require "ffi"
local wb = require "resty.workerbus"

local C = wb.C
local type = type
local error = error
local xpcall = xpcall
local tostring = tostring
local traceback = debug.traceback
local ngx_log = ngx.log
local ERR, WARN = ngx.ERR, ngx.WARN

ffi.cdef [[
    int workerbus_lc_lock(void);
    void workerbus_lc_unlock(void);
    int workerbus_lc_counts(uint64_t generation, double failed_sec, int64_t *out);
    int workerbus_lc_mark_started(void);
    int workerbus_lc_leave(void);
    int workerbus_lc_claim_master_start(uint64_t generation);
    int workerbus_lc_set_hang_timeout(double sec);
    uint64_t workerbus_lc_master_started(void);
    uint64_t workerbus_lc_current_generation(void);
    int usleep(unsigned int usec);
]]

local _M = { _VERSION = "0.1-workerbus" }

local NAME = "resty.worker.manager"
local init_opts       -- from on_init_by_lua
local worker_cbs      -- from on_init_worker_by_lua
local counts = ffi.new("int64_t[3]")
local FOREVER = 365 * 24 * 3600  -- a timer that only ever fires prematurely, at exit

local function phase_error(fn, want)
    error(NAME .. ": " .. fn .. " must be called in " .. want .. ", not in "
          .. tostring(ngx.get_phase()), 3)
end

local function get_counts(generation)
    C.workerbus_lc_counts(generation, init_opts.failed, counts)
    local function opt(v) v = tonumber(v) return v >= 0 and v or nil end
    return opt(counts[0]), tonumber(counts[1]), opt(counts[2])
end

local function run(what, cb, id, generation)
    if not cb then
        return
    end
    local n_prev, n_mine, n_next = get_counts(generation)
    local ok, err = xpcall(cb, traceback, id, n_prev, n_mine, n_next)
    if not ok then
        ngx_log(ERR, NAME, ": ", what, " callback failed: ", tostring(err))
    end
end

-- Runs fn holding the node-wide lock, so no two callbacks run at once.
-- `sleep` yields between tries (timers); at exit, where the worker must not
-- wait on the event loop, a short blocking pause is used instead.
local function locked(sleep, fn)
    local waited = 0
    while C.workerbus_lc_lock() ~= 1 do
        if waited > 30 then
            ngx_log(WARN, NAME, ": callback lock still held after 30 s; running unserialized")
            break
        end
        if sleep then
            ngx.sleep(0.002)
        else
            C.usleep(2000)
        end
        waited = waited + 0.002
    end
    local ok, err = xpcall(fn, traceback)
    C.workerbus_lc_unlock()
    if not ok then
        ngx_log(ERR, NAME, ": ", tostring(err))
    end
end

-- On a reload, an old worker waits (2 s at most) until the new generation's
-- master start has run, so that it sees every old worker still running
-- (n_prev) and the old workers' exits see the new generation (n_next).
local function await_next_master(generation)
    if tonumber(C.workerbus_lc_current_generation()) <= generation then
        return
    end
    for _ = 1, 1000 do
        if tonumber(C.workerbus_lc_master_started()) > generation then
            return
        end
        C.usleep(2000)
    end
end

local function on_exit(premature)
    if not premature then
        return
    end
    local generation = wb.generation()
    await_next_master(generation)
    locked(false, function()
        run("worker exit", worker_cbs.exit, ngx.worker.pid(), generation)
        local _, n_mine = get_counts(generation)
        C.workerbus_lc_leave()
        if n_mine <= 1 then
            run("master exit", init_opts.master_exit, generation, generation)
        end
    end)
end

local function on_start(premature)
    if premature then
        return
    end
    local generation = wb.generation()
    locked(true, function()
        if C.workerbus_lc_claim_master_start(generation) == 1 then
            run("master start", init_opts.master_start, generation, generation)
        end
        C.workerbus_lc_mark_started()
        run("worker start", worker_cbs.start, ngx.worker.pid(), generation)
    end)
    local ok, err = ngx.timer.at(FOREVER, on_exit)
    if not ok then
        ngx_log(ERR, NAME, ": cannot arm the exit timer: ", err)
    end
end

local function check_cb(name, cb)
    if cb ~= nil and type(cb) ~= "function" then
        error(NAME .. ": " .. name .. " must be a function, got " .. type(cb), 3)
    end
end

-- opts: shm (required), interval (heartbeat, default 10), failed (default 5).
function _M.on_init_by_lua(opts, master_start_cb, master_exit_cb)
    if ngx.get_phase() ~= "init" then
        phase_error("on_init_by_lua", "init_by_lua")
    end
    if init_opts then
        error(NAME .. ": on_init_by_lua was already called", 2)
    end
    if type(opts) ~= "table" then
        error(NAME .. ": opts must be a table, got " .. type(opts), 2)
    end
    if type(opts.shm) ~= "string" or opts.shm == "" then
        error(NAME .. ": opts.shm is required (a string)", 2)
    end
    for _, k in ipairs { "interval", "failed" } do
        if opts[k] ~= nil and (type(opts[k]) ~= "number" or opts[k] <= 0) then
            error(NAME .. ": opts." .. k .. " must be a positive number", 2)
        end
    end
    check_cb("master_start_cb", master_start_cb)
    check_cb("master_exit_cb", master_exit_cb)
    init_opts = {
        shm = opts.shm,
        interval = opts.interval or 10,
        failed = opts.failed or 5,
        master_start = master_start_cb,
        master_exit = master_exit_cb,
    }
end

function _M.on_init_worker_by_lua(start_cb, exit_cb)
    if ngx.get_phase() ~= "init_worker" then
        phase_error("on_init_worker_by_lua", "init_worker_by_lua")
    end
    if not init_opts then
        error(NAME .. ": call on_init_by_lua in init_by_lua first", 2)
    end
    if worker_cbs then
        error(NAME .. ": on_init_worker_by_lua was already called", 2)
    end
    check_cb("start_cb", start_cb)
    check_cb("exit_cb", exit_cb)
    worker_cbs = { start = start_cb, exit = exit_cb }
    if C.workerbus_lc_set_hang_timeout(init_opts.failed) < 0 then
        ngx_log(ERR, NAME, ": ", wb.last_error())
    end
    local ok, err = ngx.timer.at(0, on_start)
    if not ok then
        error(NAME .. ": cannot start: " .. tostring(err), 2)
    end
end

return _M
