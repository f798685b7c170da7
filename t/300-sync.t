# vim:set ft= ts=4 sw=4 et:
# resty.sync (the lua-resty-sync 0.06 API) on the module: one runner per
# instance per node, failover on kill -9 and HUP without two runs at once,
# concurrent tasks, atomic updates, large data, on_update, bad input.

use Test::Nginx::Socket::Lua 'no_plan';

workers(4);
master_on();
no_long_string();

# Helpers every block can use (package.loaded.T): a deadline loop, and run
# records kept in the lua_shared_dict "runs" (s<id> = "pid start gen",
# e<id> = end) with the check that no two runs ever overlapped.
our $Helpers = <<'_EOC_';
    lua_shared_dict runs 4m;
    lua_shared_dict src 1m;
    init_by_lua_block {
        local T = {}
        function T.wait(cond, limit)
            local deadline = ngx.now() + (limit or 10)
            while not cond() do
                if ngx.now() > deadline then
                    return false
                end
                ngx.sleep(0.05)
                ngx.update_time()
            end
            return true
        end
        local function now()
            ngx.update_time()
            return ngx.now()
        end
        -- Records a run around fn(); sleeps `pause` inside it (raises in
        -- init_worker, where ngx.sleep does not exist: the run is retried).
        function T.run(pause, fn)
            local d = ngx.shared.runs
            if pause and pause > 0 then
                ngx.sleep(pause)   -- raises in init_worker before anything is recorded
            end
            local id = d:incr("n", 1, 0)
            local start = now()
            d:set("s" .. id, ngx.worker.pid() .. " " .. start .. " "
                  .. require("resty.workerbus").generation())
            if pause and pause > 0 then
                ngx.sleep(pause)
            end
            local r = fn and fn()
            d:set("e" .. id, now())
            return r
        end
        function T.runs()
            local d = ngx.shared.runs
            local out = {}
            for id = 1, d:get("n") or 0 do
                local s = d:get("s" .. id)
                if s then
                    local pid, start, gen = s:match("^(%d+) (%S+) (%d+)$")
                    out[#out + 1] = { id = id, pid = tonumber(pid), start = tonumber(start),
                                      gen = tonumber(gen), stop = d:get("e" .. id) }
                end
            end
            table.sort(out, function(a, b) return a.start < b.start end)
            return out
        end
        -- nil when no two runs overlapped; runs of `dead` without an end
        -- ended when it was killed, at `killed`.
        function T.overlap(dead, killed)
            local runs = T.runs()
            for i = 2, #runs do
                local prev, cur = runs[i - 1], runs[i]
                local stop = prev.stop or (prev.pid == dead and killed)
                if not stop then
                    return "run " .. prev.id .. " (pid " .. prev.pid .. ") never ended but run "
                           .. cur.id .. " (pid " .. cur.pid .. ") started"
                end
                if cur.start < stop then
                    return "run " .. cur.id .. " (pid " .. cur.pid .. ") started at " .. cur.start
                           .. " before run " .. prev.id .. " (pid " .. prev.pid .. ") ended at " .. stop
                end
            end
            return nil
        end
        function T.pids()
            local set, n = {}, 0
            for _, r in ipairs(T.runs()) do
                if not set[r.pid] then set[r.pid] = true n = n + 1 end
            end
            return n, set
        end
        package.loaded.T = T
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: the original's synopsis runs unchanged (lua_shared_dict, no lua-resty-lock): data in the first request, fresh data after an interval
--- http_config
    lua_shared_dict sync 5m;
    lua_shared_dict locks 1m;

    init_worker_by_lua_block {
        local sync = require "resty.sync"

        local syncer, err = sync.new(5, "sync")
        if not syncer then
            ngx.log(ngx.WARN, "failed to create sync object: ", err)
            return
        end

        local callback = function(mode)
            if mode == sync.ACTION_DATA then
                -- GET DATA
                return "data " .. math.random(100) -- just some fake data
            else
                -- GET VERSION
                return "version " .. math.random(100)
            end
        end

        -- register some tasks
        syncer:register(callback, "ex1")

        -- start to run
        syncer:start()

        -- save it
        SYNCER = syncer
    }
--- config
    location = /t {
        content_by_lua_block {
            local sync = require "resty.sync"

            local syncer = SYNCER

            local version, err = syncer:get_version("ex1")
            if not version then
                ngx.log(ngx.WARN, "failed to fetch version: ", err)
                return
            end

            local data, err = syncer:get_data("ex1")

            if not data then
                ngx.log(ngx.WARN, "failed to fetch data: ", err)
                return
            end

            ngx.say("task ex1, data: ", data, " and version: ", version)

            ngx.sleep(5)

            -- after 5s
            local version2, err = syncer:get_version("ex1")
            if not version2 then
            	ngx.log(ngx.WARN, "failed to fetch version: ", err)
            	return
            end

            local data2, err = syncer:get_data("ex1")

            if not data2 then
            	ngx.log(ngx.WARN, "failed to fetch data: ", err)
            	return
            end

            ngx.say("after 5s, task ex1, data: ", data2, " and version: ", version2)
        }
    }
--- request
GET /t
--- timeout: 10
--- response_body_like
^task ex1, data: data \d+ and version: version \d+
after 5s, task ex1, data: data \d+ and version: version \d+
--- no_error_log
[warn]
[error]



=== TEST 2: four workers read the same version and data within an interval; the callbacks run in exactly one worker; the status shows the instance
--- main_config
    workerbus_zone wb 4m;
--- http_config eval
$::Helpers . <<'_EOC_';
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.2, "wb"))
        assert(s:register(function(mode)
            local d = ngx.shared.runs
            d:incr("calls:" .. ngx.worker.pid(), 1, 0)
            local v = ngx.shared.src:get("version") or "v1"
            return mode == sync.ACTION_VERSION and v or ("data of " .. v)
        end, "t"))
        assert(s:start())
        -- every worker reports what it reads
        ngx.timer.every(0.05, function()
            local v = s:get_version("t")
            local d = s:get_data("t")
            ngx.shared.src:set("seen:" .. ngx.worker.pid(), tostring(v) .. "|" .. tostring(d))
        end)
    }
_EOC_
--- config
    location = /t {
        content_by_lua_block {
            local T = package.loaded.T
            local src = ngx.shared.src
            local function all_see(want)
                local n = 0
                for _, k in ipairs(src:get_keys(0)) do
                    if k:find("^seen:") then
                        if src:get(k) ~= want then return false end
                        n = n + 1
                    end
                end
                return n == 4
            end
            ngx.say("v1 everywhere: ", T.wait(function() return all_see("v1|data of v1") end))
            src:set("version", "v2")
            ngx.say("v2 everywhere: ", T.wait(function() return all_see("v2|data of v2") end))
            -- several intervals: count the calls of every worker
            local function calls()
                local total, pids = 0, 0
                for _, k in ipairs(ngx.shared.runs:get_keys(0)) do
                    if k:find("^calls:") then
                        total = total + ngx.shared.runs:get(k)
                        pids = pids + 1
                    end
                end
                return total, pids
            end
            T.wait(function() return calls() >= 20 end)
            local total, pids = calls()
            ngx.say("calls >= 20: ", total >= 20, ", workers that called: ", pids)
            local st = require("resty.workerbus").status()
            local inst = st.zones[1].sync[1]
            local task = inst.tasks[1]
            ngx.say(inst.instance, " interval ", inst.interval, " runner alive: ",
                    ngx.shared.runs:get("calls:" .. inst.runner_pid) ~= nil)
            ngx.say(task.tag, " ", task.version, " ", task.version_type, " ", task.data_type,
                    " size ", task.size, " runs>0 ", task.runs > 0, " failures ", task.failures)
        }
    }
--- request
GET /t
--- timeout: 25
--- response_body
v1 everywhere: true
v2 everywhere: true
calls >= 20: true, workers that called: 1
wb#1 interval 0.2 runner alive: true
t v2 string string size 10 runs>0 true failures 0
--- no_error_log
[error]



=== TEST 3: two instances on one shm keep their own intervals and runners
--- main_config
    workerbus_zone wb 4m;
--- http_config eval
$::Helpers . <<'_EOC_';
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        for _, iv in ipairs({ 0.3, 1.2 }) do
            local s = assert(sync.new(iv, "wb"))
            assert(s:register(function(mode)
                if mode == sync.ACTION_VERSION then
                    ngx.update_time()
                    ngx.shared.runs:rpush("at:" .. iv, ngx.now())
                end
                return "same"
            end, "t"))
            assert(s:start())
        end
    }
_EOC_
--- config
    location = /t {
        content_by_lua_block {
            local T = package.loaded.T
            local d = ngx.shared.runs
            T.wait(function() return (d:llen("at:1.2") or 0) >= 4 end, 20)
            for _, iv in ipairs({ "0.3", "1.2" }) do
                local prev, min_gap, n = nil, 1e9, 0
                while true do
                    local t = d:lpop("at:" .. iv)
                    if not t then break end
                    n = n + 1
                    if prev then min_gap = math.min(min_gap, t - prev) end
                    prev = t
                end
                ngx.say(iv, ": ", n >= 4, ", never sooner than its interval: ", min_gap >= tonumber(iv) - 0.02)
                d:set("n:" .. iv, n)
            end
            ngx.say("the short interval ran more often: ", d:get("n:0.3") > d:get("n:1.2"))
        }
    }
--- request
GET /t
--- timeout: 25
--- response_body
0.3: true, never sooner than its interval: true
1.2: true, never sooner than its interval: true
the short interval ran more often: true
--- no_error_log
[error]



=== TEST 4: kill -9 of the runner in the middle of a run: another worker runs within interval + lease, and no two runs ever overlap
--- main_config
    workerbus_zone wb 4m;
--- http_config eval
$::Helpers . <<'_EOC_';
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.5, "wb"))
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then
                return package.loaded.T.run(0.2, function()
                    return ngx.shared.runs:get("n")
                end)
            end
            return "data"
        end, "t"))
        assert(s:start())
        -- A worker that is not the runner kills it while a run is under way.
        local ffi = require "ffi"
        ffi.cdef "int kill(int pid, int sig);"
        ngx.timer.every(0.02, function()
            local d = ngx.shared.runs
            local victim = s:runner()
            if not d:get("kill") or victim == ngx.worker.pid() or victim == 0 then
                return
            end
            local n = d:get("n")
            local open = n and d:get("s" .. n) and not d:get("e" .. n)
                         and tonumber(d:get("s" .. n):match("^%d+")) == victim
            if open and d:add("victim", victim) then
                ngx.update_time()
                d:set("killed", ngx.now())
                ffi.C.kill(victim, 9)
            end
        end)
    }
_EOC_
--- config
    location = /kill {
        content_by_lua_block {
            local T = package.loaded.T
            local d = ngx.shared.runs
            ngx.say("runs before: ", T.wait(function() return (d:get("n") or 0) >= 3 end))
            d:set("kill", true)
        }
    }
    location = /check {
        content_by_lua_block {
            local T = package.loaded.T
            local d = ngx.shared.runs
            T.wait(function() return d:get("killed") end)
            local victim, killed = d:get("victim"), d:get("killed")
            local first
            T.wait(function()
                for _, r in ipairs(T.runs()) do
                    if r.pid ~= victim and r.start > killed then first = r return true end
                end
            end)
            ngx.say("another worker ran: ", first ~= nil)
            ngx.say("within interval + lease (3.5 s): ", first ~= nil and first.start - killed <= 3.5)
            local n = d:get("n")
            T.wait(function() return d:get("n") >= n + 3 end)
            ngx.say("overlap: ", tostring(T.overlap(victim, killed)))
        }
    }
--- request eval
["GET /kill", "GET /check"]
--- response_body eval
["runs before: true\n",
"another worker ran: true
within interval + lease (3.5 s): true
overlap: nil
"]
--- timeout: 25
--- error_log eval
qr/sync "wb#1": worker process \d+ is the runner, taken from pid \d+ \(owner died\)/



=== TEST 5: HUP: the runner moves to a worker of the new generation, never two runs at once
--- main_config
    workerbus_zone wb 4m;
--- http_config eval
$::Helpers . <<'_EOC_';
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.3, "wb"))
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then
                return package.loaded.T.run(0.25, function() return "same" end)
            end
            return "data"
        end, "t"))
        assert(s:start())
    }
_EOC_
--- config
    location = /t {
        content_by_lua_block {
            local T = package.loaded.T
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            local d = ngx.shared.runs
            T.wait(function() return (d:get("n") or 0) >= 3 end)
            ffi.C.kill(require("ngx.process").get_master_pid(), 1)
            local ok = T.wait(function()
                local gen2 = 0
                for _, r in ipairs(T.runs()) do
                    if r.gen == 2 and r.stop then gen2 = gen2 + 1 end
                end
                return gen2 >= 3
            end, 15)
            ngx.say("generation 2 runs: ", ok)
            local last1, first2
            for _, r in ipairs(T.runs()) do
                if r.gen == 1 then last1 = r end
                if r.gen == 2 and not first2 then first2 = r end
            end
            ngx.say("generation 1 ran no more after generation 2 began: ",
                    last1 ~= nil and first2 ~= nil and last1.start < first2.start)
            ngx.say("overlap: ", tostring(T.overlap()))
        }
    }
--- request
GET /t
--- timeout: 25
--- response_body
generation 2 runs: true
generation 1 ran no more after generation 2 began: true
overlap: nil
--- no_error_log
[error]
