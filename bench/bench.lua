-- Event benchmark driven by bench/run: every worker counts what its handler
-- receives; one request posts a burst, another measures latency at a fixed rate.

local ffi = require "ffi"
local events = require "resty.worker.events"

ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } wb_bench_timespec;
    int clock_gettime(int clk, wb_bench_timespec *ts);
]]

-- bench/instructions runs callgrind with --zero-before=getpgrp and
-- --dump-before=getsid: calling them is how a worker zeroes and dumps its
-- own counts (nginx never calls either).
pcall(ffi.cdef, "int getpgrp(void); int getsid(int pid);")

local ts = ffi.new("wb_bench_timespec")
local CLOCK_REALTIME = 0

-- The hop trace (bench/hops): only a module built with the `hop-trace`
-- feature exports workerbus_hop_row; with any other the handler skips it.
pcall(ffi.cdef, "int workerbus_hop_row(uint64_t *out);")
local hop_row = pcall(function() return ffi.C.workerbus_hop_row end) and ffi.C.workerbus_hop_row or nil
local hops = ffi.new("uint64_t[7]")

-- Wall clock in nanoseconds, comparable across workers.
local function now_ns()
    ffi.C.clock_gettime(CLOCK_REALTIME, ts)
    return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

local _M = {}
local dict = ngx.shared.bench_stats

-- A delivery's hop stamps (ns, CLOCK_MONOTONIC: exact as Lua numbers), as
-- one line of the list `key`.
local function push_hops(premature, key, row)
    if premature then return end
    for i = 1, #row do row[i] = string.format("%.0f", row[i]) end
    dict:rpush(key, table.concat(row, " "))
end
local handled = 0
local target = 0
-- Where this worker's ping samples go: the poster's own apart. Set by the
-- "poster" event at a scenario's start, never decided per ping: a branch
-- that flips between the warm-up and the measure is a side exit of the
-- poller's trace, and LuaJIT may fail to compile its side trace ("register
-- coalescing too complex") and retry at each of the next ~245 pings, each
-- attempt costing the worker tens of microseconds (docs/event-ring.md).
local lat_key, hops_key = "lat", "hops"

function _M.init_worker()
    events.register(function(data, event)
        if event == "burst" then
            handled = handled + 1
            if handled == target then
                dict:set("done:" .. ngx.worker.pid(), now_ns())
            end
        elseif event == "ping" then
            local t = now_ns()
            local sent = type(data) == "table" and data.s * 1e9 + data.ns or tonumber(data)
            if sent then
                dict:rpush(lat_key, t - sent)
            end
            if hop_row and hop_row(hops) == 7 then
                -- Copied now, written out later: formatting the row here
                -- would lengthen the own handler the trace times (and its
                -- hold of the other workers' wake-ups, src/module/wake.rs).
                local row = {}
                for i = 0, 6 do row[i + 1] = tonumber(hops[i]) end
                ngx.timer.at(0, push_hops, hops_key, row)
            end
        elseif event == "poster" then
            local own = data == ngx.worker.pid()
            lat_key, hops_key = own and "own" or "lat", own and "hops_own" or "hops"
            dict:incr("poster_acks", 1, 0)
        elseif event == "instr" then
            if data == "zero" then ffi.C.getpgrp() else ffi.C.getsid(0) end
            dict:incr("instr_acks", 1, 0)
        elseif event == "reset" then
            handled, target = 0, data.n
            dict:set("handled:" .. ngx.worker.pid(), 0)
        end
    end, "bench")
    -- The original's usual settings: a lua_shared_dict named "process_events"
    -- (64m in bench/run, no workerbus_zone line) and a 10 ms poll interval.
    local ok, err = events.configure { shm = "process_events", interval = 0.01 }
    if not ok then
        ngx.log(ngx.ERR, "bench: configure failed: ", err)
    end
    -- Reports this worker's count on demand.
    events.register(function()
        dict:set("handled:" .. ngx.worker.pid(), handled)
    end, "bench-report")
end

local function payload(kind, i)
    if kind == "table" then
        return { id = i, name = "upstream-a", healthy = true }
    end
    return string.rep("x", 56) .. string.format("%08d", i % 1e8)   -- 64 bytes
end

-- POST a burst of n events; returns ns inside post() per call and posts/s.
function _M.burst()
    local n = tonumber(ngx.var.arg_n) or 100000
    local kind = ngx.var.arg_kind or "string"
    events.post("bench", "reset", { n = n })
    events.poll()
    ngx.sleep(0.2)
    local datas = {}
    for i = 1, n do datas[i] = payload(kind, i) end
    dict:set("start", now_ns())
    local t0 = now_ns()
    local post = events.post
    local failed = 0
    for i = 1, n do
        if not post("bench", "burst", datas[i]) then failed = failed + 1 end
    end
    local t1 = now_ns()
    ngx.say(string.format("post_ns=%.1f posts_per_s=%.0f failed=%d", (t1 - t0) / n, n / ((t1 - t0) / 1e9), failed))
end

-- Seconds from the burst's start until each worker handled all of it.
function _M.collect()
    events.post("bench-report", "report")
    ngx.sleep(0.3)
    local start = dict:get("start")
    local out = {}
    for _, pid in ipairs(dict:get_keys(0)) do
        local p = pid:match("^done:(%d+)$")
        if p then
            out[#out + 1] = string.format("worker=%s secs=%.6f", p, (dict:get(pid) - start) / 1e9)
        end
    end
    for _, k in ipairs(dict:get_keys(0)) do
        local p = k:match("^handled:(%d+)$")
        if p then out[#out + 1] = string.format("handled worker=%s n=%d", p, dict:get(k)) end
    end
    table.sort(out)
    ngx.say(table.concat(out, "\n"))
end

-- Gap before the next ping: uniform over 5-15 ms, as the floor's
-- (examples/wake_floor) and as a health checker's or cache invalidator's.
local function gap()
    return 0.005 + math.random() * 0.010
end

-- A table's timestamp goes as seconds and nanoseconds: resty.worker.events
-- sends tables as JSON, and cjson writes numbers with 14 significant
-- digits, which would round a nanosecond timestamp to 100 us.
local function ping(kind)
    if kind == "table" then
        ffi.C.clock_gettime(CLOCK_REALTIME, ts)
        events.post("bench", "ping", { s = tonumber(ts.tv_sec), ns = tonumber(ts.tv_nsec), name = "upstream-a" })
    else
        events.post("bench", "ping", string.format("%-64.0f", now_ns()))
    end
end

local function drain_list(key)
    local lat = {}
    while true do
        local v = dict:lpop(key)
        if not v then break end
        lat[#lat + 1] = v
    end
    return lat
end

local function pcts(lat)
    table.sort(lat)
    local function pct(p) return lat[math.max(1, math.ceil(#lat * p))] or 0 end
    return #lat, pct(0.5) / 1e3, pct(0.99) / 1e3
end

local WARM = 30   -- pings before the measure, as the floor drops its first tenth

-- Tells every worker that this one posts the next scenario's pings, and
-- waits (at most 2 s) until all of them know.
local function set_poster()
    dict:set("poster_acks", 0)
    dict:set("poster", ngx.worker.pid())   -- for bench/instructions, read by no handler
    events.post("bench", "poster", ngx.worker.pid())
    local deadline = ngx.now() + 2
    while (dict:get("poster_acks") or 0) < ngx.worker.count() and ngx.now() < deadline do
        ngx.sleep(0.01)
    end
end

local function reset()
    dict:delete("lat"); dict:delete("own"); dict:delete("hops"); dict:delete("hops_own")
end

local function report()
    ngx.sleep(0.5)
    local n, p50, p99 = pcts(drain_list("lat"))
    local on, o50, o99 = pcts(drain_list("own"))
    ngx.say(string.format("samples=%d p50_us=%.1f p99_us=%.1f own_samples=%d own_p50_us=%.1f own_p99_us=%.1f",
                          n, p50, p99, on, o50, o99))
    for _, key in ipairs({ "hops", "hops_own" }) do
        for _, row in ipairs(drain_list(key)) do
            ngx.say(key, " ", row)
        end
    end
end

-- bench/instructions: every worker zeroes (?op=zero) or dumps (?op=dump)
-- its callgrind counts; answers once all of them have.
function _M.instr()
    dict:set("instr_acks", 0)
    events.post("bench", "instr", ngx.var.arg_op == "zero" and "zero" or "dump")
    local deadline = ngx.now() + 30
    while (dict:get("instr_acks") or 0) < ngx.worker.count() and ngx.now() < deadline do
        ngx.sleep(0.01)
    end
    ngx.say(dict:get("instr_acks"))
end

-- (a) A poster in a content handler: `count` pings (after WARM unmeasured
-- ones), gaps of 5-15 ms; the other workers record post-to-handler
-- latency, the poster its own post's.
function _M.latency()
    local count = tonumber(ngx.var.arg_count) or 300
    local kind = ngx.var.arg_kind or "string"
    set_poster()
    for _ = 1, WARM do
        ping(kind)
        ngx.sleep(gap())
    end
    ngx.sleep(0.05)
    reset()
    for _ = 1, count do
        ping(kind)
        ngx.sleep(gap())
    end
    report()
end

-- (b) A poster in an nginx timer (a health checker, a cache invalidator):
-- each ping from its own timer, the next one 5-15 ms later.
function _M.latency_timer()
    local count = tonumber(ngx.var.arg_count) or 300
    local kind = ngx.var.arg_kind or "table"
    local left = WARM + count
    local function tick(premature)
        if premature then return end
        if left == count then reset() end
        ping(kind)
        left = left - 1
        if left > 0 then
            ngx.timer.at(gap(), tick)
        end
    end
    set_poster()
    ngx.timer.at(gap(), tick)
    while left > 0 do
        ngx.sleep(0.05)
    end
    report()
end

return _M
