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

function _M.init_worker(interval)
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

return _M
