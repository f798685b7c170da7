-- Event benchmark driven by bench/run: every worker counts what its handler
-- receives; one request posts a burst, another measures latency at a fixed rate.

local ffi = require "ffi"
local events = require "resty.worker.events"

ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } wb_bench_timespec;
    int clock_gettime(int clk, wb_bench_timespec *ts);
]]

local ts = ffi.new("wb_bench_timespec")
local CLOCK_REALTIME = 0

-- Wall clock in nanoseconds, comparable across workers.
local function now_ns()
    ffi.C.clock_gettime(CLOCK_REALTIME, ts)
    return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

local _M = {}
local dict = ngx.shared.bench_stats
local handled = 0
local target = 0

function _M.init_worker()
    events.register(function(data, event)
        if event == "burst" then
            handled = handled + 1
            if handled == target then
                dict:set("done:" .. ngx.worker.pid(), now_ns())
            end
        elseif event == "ping" then
            local sent = type(data) == "table" and data.t or tonumber(data)
            if sent and ngx.worker.pid() ~= dict:get("poster") then
                dict:rpush("lat", now_ns() - sent)
            end
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

-- Posts `count` pings at `rate`/s; other workers record post-to-handler latency.
function _M.latency()
    local rate = tonumber(ngx.var.arg_rate) or 100
    local count = tonumber(ngx.var.arg_count) or 500
    local kind = ngx.var.arg_kind or "string"
    dict:delete("lat")
    dict:set("poster", ngx.worker.pid())
    for _ = 1, count do
        local t = now_ns()
        if kind == "table" then
            events.post("bench", "ping", { t = t, name = "upstream-a" })
        else
            events.post("bench", "ping", string.format("%-64.0f", t))
        end
        ngx.sleep(1 / rate)
    end
    ngx.sleep(0.5)
    local lat = {}
    while true do
        local v = dict:lpop("lat")
        if not v then break end
        lat[#lat + 1] = v
    end
    table.sort(lat)
    local function pct(p) return lat[math.max(1, math.ceil(#lat * p))] or 0 end
    ngx.say(string.format("samples=%d p50_us=%.1f p99_us=%.1f", #lat, pct(0.5) / 1e3, pct(0.99) / 1e3))
end

return _M
