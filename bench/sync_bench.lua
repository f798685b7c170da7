-- resty.sync benchmark driven by bench/sync_run: get_data against a shdict
-- get (what lua-resty-sync's get_data does) for a 100-byte and a 1 MB value,
-- and the time from a version change at the source to every worker's
-- on_update.

local ffi = require "ffi"
local sync = require "resty.sync"

ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } wb_sbench_timespec;
    int clock_gettime(int clk, wb_sbench_timespec *ts);
]]

local ts = ffi.new("wb_sbench_timespec")

-- Wall clock in nanoseconds, comparable across workers.
local function now_ns()
    ffi.C.clock_gettime(0, ts)
    return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

local _M = {}
local stats = ngx.shared.bench_stats
local VALUES = { small = string.rep("s", 100), big = string.rep("b", 1024 * 1024) }
local syncer

-- The pushed instance: interval 60 s, so that only triggers run it.
local pushed
local CHANNEL = "wb_sync_bench"

function _M.init_worker(interval, bridge)
    -- The original's synopsis: sync.new(interval, "sync") over a lua_shared_dict.
    syncer = assert(sync.new(interval, "sync"))
    for tag, value in pairs(VALUES) do
        assert(syncer:register(function(mode)
            if mode == sync.ACTION_VERSION then return "v1" end
            return value
        end, tag))
    end
    assert(syncer:register(function(mode)
        local v = stats:get("src_version") or 0
        if mode == sync.ACTION_VERSION then return v end
        stats:set("fetched:" .. v, now_ns())
        return "data " .. v
    end, "moving"))
    assert(syncer:on_update("moving", function(_, version)
        stats:set("upd:" .. version .. ":" .. ngx.worker.pid(), now_ns())
    end))
    assert(syncer:start())

    pushed = assert(sync.new(60, "sync"))
    assert(pushed:register(function(mode)
        local v = stats:get("pv") or 0
        if mode == sync.ACTION_VERSION then
            stats:incr("pchecks", 1, 0)
            return v
        end
        return "data " .. v
    end, "pushed"))
    assert(pushed:on_update("pushed", function(_, version)
        local t = now_ns()
        local k = stats:incr("pn:" .. version, 1, 0)
        stats:set("pt:" .. version .. ":" .. k, t)
    end))
    if bridge then
        assert(pushed:trigger_on(CHANNEL))
    end
    assert(pushed:start())
end

-- ns per call of syncer:get_data(tag) and of ngx.shared.sync:get(tag),
-- each result used (its length summed). `jit=off`: in LuaJIT's interpreter,
-- where nothing is hoisted out of the loop (an upper bound).
local function measure(tag, n)
    local dict = ngx.shared.sync
    local get_data = syncer.get_data
    local sum = 0
    local t0 = now_ns()
    for _ = 1, n do
        sum = sum + #get_data(syncer, tag)
    end
    local t1 = now_ns()
    local m = math.max(1, math.floor(n / (tag == "big" and 500 or 1)))
    for _ = 1, m do
        sum = sum + #dict:get(tag)
    end
    local t2 = now_ns()
    return (t1 - t0) / n, (t2 - t1) / m, sum
end

function _M.get()
    local tag = ngx.var.arg_tag
    local n = tonumber(ngx.var.arg_n)
    ngx.shared.sync:set(tag, VALUES[tag])
    assert(syncer:get_data(tag) == VALUES[tag])
    local s, d = measure(tag, n)
    jit.off(measure)
    local si, di = measure(tag, math.floor(n / 10))
    jit.on(measure)
    ngx.say("sync_ns=", s, " shdict_ns=", d, " sync_interp_ns=", si, " shdict_interp_ns=", di)
end

-- Changes the version at the source; waits until every worker's on_update
-- ran; prints the slowest worker's delay from the change and from the fetch.
function _M.change()
    local workers = tonumber(ngx.var.arg_workers)
    local v = stats:incr("src_version", 1, 0)
    local t0 = now_ns()
    local deadline = ngx.now() + 30
    local last
    while true do
        local n = 0
        last = 0
        for _, k in ipairs(stats:get_keys(0)) do
            if k:find("^upd:" .. v .. ":") then
                n = n + 1
                last = math.max(last, stats:get(k))
            end
        end
        if n == workers then break end
        if ngx.now() > deadline then
            ngx.say("timeout") return
        end
        ngx.sleep(0.001)
    end
    local fetched = stats:get("fetched:" .. v)
    ngx.say("change_ms=", (last - t0) / 1e6, " push_us=", (last - fetched) / 1e3)
end

local function percentile(sorted, p)
    return sorted[math.max(1, math.ceil(#sorted * p))]
end

-- n triggers, one after the other (a random pause of 0 to 5 ms between
-- them): each changes the version at the source, then calls
-- trigger("pushed") (via=local) or posts the tag on the bridge channel
-- (via=bridge: this node's PostgreSQL connection, LISTEN, the channel's
-- subscriber in the runner), and waits until every worker's on_update saw
-- it. The time is from the call to the last worker's on_update. Refused
-- ("runner") in the runner's own worker: the measure is of the wake-up.
function _M.trigger()
    local n, workers, via = tonumber(ngx.var.arg_n), tonumber(ngx.var.arg_workers), ngx.var.arg_via
    if pushed:runner() == ngx.worker.pid() then
        ngx.say("runner") return
    end
    local wb = require "resty.workerbus"
    if via == "bridge" then
        local pg = require "resty.workerbus.pg"
        local deadline = ngx.now() + 20
        while not pg.listening(CHANNEL) do
            if ngx.now() > deadline then ngx.say("not listening") return end
            ngx.sleep(0.01)
        end
    end
    local us = {}
    local checks0 = stats:get("pchecks") or 0
    for i = 1, n do
        ngx.sleep(math.random(0, 5) / 1000)
        local v = stats:incr("pv", 1, 0)
        local t0 = now_ns()
        local ok, err
        if via == "bridge" then
            ok, err = wb.post(CHANNEL, "pushed")
        else
            ok, err = pushed:trigger("pushed")
        end
        if not ok then ngx.say("trigger ", i, ": ", err) return end
        local deadline = ngx.now() + 10
        while (stats:get("pn:" .. v) or 0) < workers do
            if ngx.now() > deadline then ngx.say("timeout at ", i) return end
            ngx.sleep(0.001)
        end
        local last = 0
        for k = 1, workers do
            last = math.max(last, stats:get("pt:" .. v .. ":" .. k))
        end
        us[i] = (last - t0) / 1e3
    end
    table.sort(us)
    ngx.say("p50_us=", percentile(us, 0.5), " p99_us=", percentile(us, 0.99), " max_us=", us[#us],
            " checks=", (stats:get("pchecks") or 0) - checks0)
end

return _M
