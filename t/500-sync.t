# vim:set ft= ts=4 sw=4 et:
# resty.sync (the lua-resty-sync 0.06 API) on the module: one runner per
# instance per node, failover on kill -9 and HUP without two runs at once,
# concurrent tasks, atomic updates, large data, on_update, bad input.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();

# Blocks 2-15 use the helpers of t/lib/wbtest/sync.lua (`local T = require
# "wbtest.sync"`): a deadline loop, and run records kept in the
# lua_shared_dict "runs" with the check that no two runs ever overlapped.
# Their callbacks read the source from the lua_shared_dict "src".

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
        # Not the synopsis: the worker that answers may start before the
        # runner's first run is done (the original runs its callbacks later,
        # in a light thread, and says "no data" until then): wait for it,
        # with a deadline, as a client would retry.
        access_by_lua_block {
            local deadline = ngx.now() + 5
            while not SYNCER:get_version("ex1") and ngx.now() < deadline do
                ngx.sleep(0.01)
            end
        }
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
--- timeout: 15
--- response_body_like
^task ex1, data: data \d+ and version: version \d+
after 5s, task ex1, data: data \d+ and version: version \d+
--- no_error_log
[warn]
[error]



=== TEST 2: four workers read the same version and data within an interval; the callbacks run in exactly one worker; the status shows the instance
--- zone: wb 4m
--- shared_dicts: runs 4m, src 1m
--- http_config
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
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
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
--- zone: wb 4m
--- shared_dicts: runs 4m
--- http_config
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
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
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
--- zone: wb 4m
--- shared_dicts: runs 4m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local T = require "wbtest.sync"
        local s = assert(sync.new(0.5, "wb"))
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then
                return T.run(0.2, function()
                    return ngx.shared.runs:get("n")
                end)
            end
            return "data"
        end, "t"))
        assert(s:start())
        SYNCER = s
        -- A worker that is not the runner kills it while a run is under way.
        T.kill_runner(s, 0.02, function(victim)
            local d = ngx.shared.runs
            local n = d:get("n")
            return n and d:get("s" .. n) and not d:get("e" .. n)
                   and tonumber(d:get("s" .. n):match("^%d+")) == victim
        end)
    }
--- config
    location = /kill {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local d = ngx.shared.runs
            ngx.say("runs before: ", T.wait(function() return (d:get("n") or 0) >= 3 end))
            d:set("kill", true)
        }
    }
    location = /check {
        content_by_lua_block {
            local T = require "wbtest.sync"
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
            local inst = require("resty.workerbus").status().zones[1].sync[1]
            ngx.say("status: runner changed ", inst.runner_pid ~= victim and inst.runner_pid == SYNCER:runner(),
                    ", takeovers >= 1: ", inst.takeovers >= 1, ", runner changes >= 2: ", inst.runner_changes >= 2)
            -- asserted here: the real runner checks --- error_log after each request
            ngx.say("takeover logged: ", require("wbtest").logged(
                'sync "wb#1": worker process %d+ is the runner, taken from pid %d+ %(owner died%)'))
        }
    }
--- request eval
["GET /kill", "GET /check"]
--- response_body eval
["runs before: true\n",
"another worker ran: true
within interval + lease (3.5 s): true
overlap: nil
status: runner changed true, takeovers >= 1: true, runner changes >= 2: true
takeover logged: true
"]
--- timeout: 25



=== TEST 5: HUP: the runner moves to a worker of the new generation, never two runs at once
--- zone: wb 4m
--- shared_dicts: runs 4m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local T = require "wbtest.sync"
        local s = assert(sync.new(0.3, "wb"))
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then
                return T.run(0.25, function() return "same" end)
            end
            return "data"
        end, "t"))
        assert(s:start())
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local d = ngx.shared.runs
            T.wait(function() return (d:get("n") or 0) >= 3 end)
            require("wbtest").kill(require("ngx.process").get_master_pid(), 1)   -- SIGHUP
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



=== TEST 6: a 5 MB data value is synchronized to every worker
--- zone: big 24m
--- shared_dicts: src 1m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.5, "big"))
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then return 1 end
            return string.rep("0123456789abcdef", 5 * 1024 * 1024 / 16)
        end, "big"))
        assert(s:start())
        ngx.timer.every(0.05, function()
            local d = s:get_data("big")
            if d then
                ngx.shared.src:set("len:" .. ngx.worker.pid(), #d .. " " .. ngx.md5(d))
            end
        end)
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local src = ngx.shared.src
            local want = #string.rep("x", 5 * 1024 * 1024) .. " "
                         .. ngx.md5(string.rep("0123456789abcdef", 5 * 1024 * 1024 / 16))
            local ok = T.wait(function()
                local n = 0
                for _, k in ipairs(src:get_keys(0)) do
                    if src:get(k) == want then n = n + 1 end
                end
                return n == 4
            end)
            ngx.say("4 workers hold the 5 MB value: ", ok)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
4 workers hold the 5 MB value: true
--- no_error_log
[error]



=== TEST 7: data too large for the zone is logged with its size and the zone's free bytes; the previous data stays
--- zone: small 2m
--- shared_dicts: src 1m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.2, "small"))
        assert(s:register(function(mode)
            local v = ngx.shared.src:get("version") or 1
            if mode == sync.ACTION_VERSION then return v end
            return v == 1 and "small data" or string.rep("x", 4 * 1024 * 1024)
        end, "t"))
        assert(s:start())
        SYNCER = s
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local s = SYNCER
            T.wait(function() return s:get_data("t") end)
            ngx.shared.src:set("version", 2)
            local wb = require "resty.workerbus"
            local task
            T.wait(function()
                task = wb.status().zones[1].sync[1].tasks[1]
                return task.failures >= 2
            end)
            ngx.say(s:get_data("t"), " ", s:get_version("t"))
            ngx.say("too_large counted: ", task.too_large >= 2, "; last_error: ", task.last_error)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body_like
^small data 1
too_large counted: true; last_error: an update of 4194\d\d\d bytes does not fit: the zone has \d+ bytes free; previous data kept
--- error_log eval
qr/\[error\] .*sync: tag "t" of "small#1": an update of 4194\d{3} bytes does not fit: the zone has \d+ bytes free; previous data kept/



=== TEST 8: a task that sleeps 3 s does not delay another task of the same instance
--- zone: wb 4m
--- shared_dicts: runs 4m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.2, "wb"))
        local d = ngx.shared.runs
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then
                ngx.sleep(3)   -- raises in init_worker: retried at once from a timer
                d:incr("slow done", 1, 0)
            end
            return "slow"
        end, "slow"))
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then
                d:incr("fast", 1, 0)
                d:set("fast while slow ran " .. (d:get("fast")), d:get("slow done") or 0)
            end
            return "fast"
        end, "fast"))
        assert(s:start())
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local d = ngx.shared.runs
            T.wait(function() return (d:get("slow done") or 0) >= 1 end)
            -- the fast task ran at least 4 times before the first slow run ended
            ngx.say("fast runs 2..5 before the slow one ended: ",
                    d:get("fast while slow ran 5") == 0)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
fast runs 2..5 before the slow one ended: true
--- no_error_log
[error]



=== TEST 9: on_update fires once per worker per new version, with data and version
--- zone: wb 4m
--- shared_dicts: runs 4m, src 1m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.1, "wb"))
        assert(s:register(function(mode)
            ngx.shared.runs:incr("calls", 1, 0)
            local v = ngx.shared.src:get("version") or "v1"
            return mode == sync.ACTION_VERSION and v or { v = v, list = { 1, 2, 3 } }
        end, "t"))
        assert(s:on_update("t", function(data, version)
            ngx.shared.runs:incr("upd:" .. version .. ":" .. data.v .. ":" .. #data.list
                                 .. ":" .. ngx.worker.pid(), 1, 0)
        end))
        assert(s:start())
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local d = ngx.shared.runs
            local function count(v)
                local workers, total = 0, 0
                for _, k in ipairs(d:get_keys(0)) do
                    if k:find("^upd:" .. v .. ":") then
                        workers = workers + 1
                        total = total + d:get(k)
                    end
                end
                return workers, total, k
            end
            T.wait(function() return count("v1") == 4 end)
            ngx.shared.src:set("version", "v2")
            T.wait(function() return count("v2") == 4 end)
            -- several more runs of the same version fire nothing
            local calls = d:get("calls")
            T.wait(function() return d:get("calls") >= calls + 10 end)
            for _, v in ipairs({ "v1", "v2" }) do
                local workers, total = count(v)
                ngx.say(v, ": ", workers, " workers, ", total, " calls")
            end
            for _, k in ipairs(d:get_keys(0)) do
                if k:find("^upd:") and not k:find("^upd:(v%d):%1:3:%d+$") then
                    ngx.say("bad handler arguments: ", k)
                end
            end
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
v1: 4 workers, 4 calls
v2: 4 workers, 4 calls
--- no_error_log
[error]



=== TEST 10: get() during 1,000 updates never pairs the data of one update with the version of another, in any worker
--- zone: wb 8m
--- shared_dicts: runs 4m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.001, "wb"))
        local n = 0
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then
                n = n + 1   -- a new version on every run
                return n
            end
            return { v = n, pad = string.rep("p", n % 2000) }
        end, "t"))
        assert(s:start())
        local d = ngx.shared.runs
        local function reader(premature)
            if premature then return end
            local last = 0
            while last < 1000 do
                local data, version, modified = s:get("t")
                if data then
                    d:incr("reads", 1, 0)
                    if data.v ~= version or #data.pad ~= version % 2000 or type(modified) ~= "number" then
                        d:incr("torn", 1, 0)
                    end
                    if version ~= last then
                        d:incr("versions seen", 1, 0)
                        last = version
                    end
                end
                ngx.sleep(0.001)
            end
            d:incr("readers done", 1, 0)
        end
        ngx.timer.at(0, reader)
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local d = ngx.shared.runs
            ngx.say("readers done: ", T.wait(function() return d:get("readers done") == 4 end, 60))
            ngx.say("torn reads: ", d:get("torn") or 0)
            ngx.say("versions seen > 400: ", d:get("versions seen") > 400, ", reads > 2000: ", d:get("reads") > 2000)
        }
    }
--- request
GET /t
--- timeout: 70
--- response_body
readers done: true
torn reads: 0
versions seen > 400: true, reads > 2000: true
--- no_error_log
[error]



=== TEST 11: bad input gives nil and an exact error
--- zone: wb 4m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local try, out = require("wbtest").recorder()
        try("new(0)", sync.new(0, "wb"))
        try("new(-1)", sync.new(-1, "wb"))
        try("new('5')", sync.new("5", "wb"))
        try("new(nan)", sync.new(0/0, "wb"))
        try("new(shm 5)", sync.new(5, 5))
        try("new(shm nil)", sync.new(5))
        try("new(unknown)", sync.new(5, "nope"))
        local s = assert(sync.new(5, "wb"))
        local f = function() return "x" end
        try("register(non-function)", s:register("f", "a"))
        try("register(tag 1)", s:register(f, 1))
        try("register(long tag)", s:register(f, string.rep("t", 65)))
        try("register", s:register(f, "a"))
        try("register(duplicate)", s:register(f, "a"))
        try("get_data before start", s:get_data("a"))
        try("on_update(unknown)", s:on_update("zz", f))
        try("on_update(non-function)", s:on_update("a", 1))
        try("on_update(tag 1)", s:on_update(1, f))
        try("start", s:start())
        try("start twice", s:start())
        try("register after start", s:register(f, "b"))
        try("get_data(1)", s:get_data(1))
        try("get_version(nil)", s:get_version())
        try("get_last_modified_time({})", s:get_last_modified_time({}))
        try("get(1)", s:get(1))
        try("get_data(unknown)", s:get_data("zz"))
        local empty = assert(sync.new(5, "wb"))
        assert(empty:register(function() return nil end, "none"))
        assert(empty:start())
        try("get_data(no data)", empty:get_data("none"))
        try("get_version(no data)", empty:get_version("none"))
        try("get_last_modified_time(no data)", empty:get_last_modified_time("none"))
        try("get(no data)", empty:get("none"))
        OUT = out
    }
--- config
    location = /t {
        content_by_lua_block { ngx.say(table.concat(OUT, "\n")) }
    }
--- request
GET /t
--- response_body
new(0): nil, interval must be a number greater than 0
new(-1): nil, interval must be a number greater than 0
new('5'): nil, interval must be a number greater than 0
new(nan): nil, interval must be a number greater than 0
new(shm 5): nil, shm must be a string
new(shm nil): nil, shm must be a string
new(unknown): nil, no shared memory zone "nope": declare "workerbus_zone nope <size>;" or "lua_shared_dict nope <size>;"
register(non-function): nil, callback must be a function
register(tag 1): nil, tag must be a string
register(long tag): nil, tag "ttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttt": name of 65 bytes is longer than 64
register: true, nil
register(duplicate): nil, tag "a" is already registered
get_data before start: nil, not started: call start() first
on_update(unknown): nil, unknown tag "zz"
on_update(non-function): nil, handler must be a function
on_update(tag 1): nil, tag must be a string
start: true, nil
start twice: nil, already started
register after start: nil, cannot register after start
get_data(1): nil, tag must be a string
get_version(nil): nil, tag must be a string
get_last_modified_time({}): nil, tag must be a string
get(1): nil, tag must be a string
get_data(unknown): nil, unknown tag "zz"
get_data(no data): nil, no data
get_version(no data): nil, no data
get_last_modified_time(no data): nil, no data
get(no data): nil, no data



=== TEST 12: a callback that raises, returns nil or an unsupported type is logged with its tag and counted; the previous data stays
--- zone: wb 4m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.2, "wb"))
        local function after_first(bad)
            return function(mode)
                if ngx.get_phase() == "init_worker" then
                    return mode == sync.ACTION_VERSION and 1 or "good"
                end
                return bad(mode)
            end
        end
        assert(s:register(after_first(function(mode) error("boom") end), "raise"))
        assert(s:register(after_first(function(mode) return nil end), "nil"))
        assert(s:register(after_first(function(mode)
            if mode == sync.ACTION_VERSION then return 2 end
            return function() end
        end), "func"))
        assert(s:register(after_first(function(mode) return {} end), "table version"))
        assert(s:start())
        SYNCER = s
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local wb = require "resty.workerbus"
            local tasks
            T.wait(function()
                tasks = {}
                for _, t in ipairs(wb.status().zones[1].sync[1].tasks) do
                    tasks[t.tag] = t
                    if t.failures < 2 then return false end
                end
                return true
            end)
            for _, tag in ipairs({ "raise", "nil", "func", "table version" }) do
                local d, v = SYNCER:get(tag)
                ngx.say(tag, ": ", d, " ", v, ", failures >= 2: ", tasks[tag].failures >= 2,
                        ", runs: ", tasks[tag].runs >= tasks[tag].failures)
                ngx.say("  ", tasks[tag].last_error)
            end
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body_like
^raise: good 1, failures >= 2: true, runs: true
  callback raised: .*boom
nil: good 1, failures >= 2: true, runs: true
  callback returned nil for the version
func: good 1, failures >= 2: true, runs: true
  data: a value of type function is not supported \(string, number, boolean, table\)
table version: good 1, failures >= 2: true, runs: true
  version: a value of type table is not supported \(string, number, boolean\)
--- error_log eval
[qr/\[error\] .*sync: tag "raise" of "wb#1": callback raised: .*boom/,
 qr/\[error\] .*sync: tag "nil" of "wb#1": callback returned nil for the version/,
 qr/\[error\] .*sync: tag "func" of "wb#1": data: a value of type function is not supported/,
 qr/\[error\] .*sync: tag "table version" of "wb#1": version: a value of type table is not supported/]



=== TEST 13: Lua types are kept in every worker; a table is decoded once per version and shared by every get_data
--- zone: wb 4m
--- shared_dicts: src 1m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.2, "wb"))
        local vals = {
            str = { "v1", "text" },
            num = { 42.5, 1e300 },
            int = { 7, -3 },
            bool = { true, false },
            tab = { "t1", { a = 1, list = { "x", "y" }, nested = { ok = true } } },
        }
        for tag, vd in pairs(vals) do
            assert(s:register(function(mode)
                return mode == sync.ACTION_VERSION and vd[1] or vd[2]
            end, tag))
        end
        assert(s:start())
        ngx.timer.every(0.05, function()
            local out = {}
            for _, tag in ipairs({ "str", "num", "int", "bool", "tab" }) do
                local d, v, m = s:get(tag)
                if d == nil then return end
                out[#out + 1] = tag .. "=" .. type(v) .. ":" .. tostring(v) .. "/" .. type(d) .. ":"
                                .. (type(d) == "table" and (d.a .. d.list[2] .. tostring(d.nested.ok)) or tostring(d))
            end
            local t1, t2 = s:get_data("tab"), s:get_data("tab")
            out[#out + 1] = "same table: " .. tostring(t1 == t2)
            out[#out + 1] = "last modified: " .. type(s:get_last_modified_time("str"))
            ngx.shared.src:set("types:" .. ngx.worker.pid(), table.concat(out, " "))
        end)
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local src = ngx.shared.src
            local n = 0
            T.wait(function()
                n = 0
                for _, k in ipairs(src:get_keys(0)) do n = n + 1 end
                return n == 4
            end)
            local seen = {}
            for _, k in ipairs(src:get_keys(0)) do seen[src:get(k)] = true end
            for line in pairs(seen) do ngx.say(line) end
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
str=string:v1/string:text num=number:42.5/number:1e+300 int=number:7/number:-3 bool=boolean:true/boolean:false tab=string:t1/table:1ytrue same table: true last modified: number
--- no_error_log
[error]



=== TEST 14: a callback that needs a cosocket fails in init_worker and is retried at once from a timer
--- zone: wb 4m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(60, "wb"))
        assert(s:register(function(mode)
            local sock = ngx.socket.tcp()   -- raises in init_worker
            local ok, err = sock:connect("127.0.0.1", $TEST_NGINX_SERVER_PORT)
            if not ok then return nil end
            sock:close()
            return mode == sync.ACTION_VERSION and "v" or "fetched over a cosocket"
        end, "t"))
        assert(s:start())
        SYNCER = s
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            T.wait(function() return SYNCER:get_data("t") end)
            ngx.say(SYNCER:get_data("t"))
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
fetched over a cosocket
--- error_log eval
qr/\[info\] .*sync: tag "t" failed in init_worker \(callback raised: .*API disabled in the context of init_worker_by_lua\*\); retried from a timer/
--- no_error_log
[error]



=== TEST 15: a worker copies an update out of the zone once per version, however often it reads
--- zone: wb 4m
--- shared_dicts: src 1m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(0.1, "wb"))
        assert(s:register(function(mode)
            local v = ngx.shared.src:get("version") or "v1"
            return mode == sync.ACTION_VERSION and v or string.rep(v, 1000)
        end, "t"))
        assert(s:start())
        SYNCER = s
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
            local sync = require "resty.sync"
            local s = SYNCER
            T.wait(function() return s:get_version("t") == "v1" end)
            local c0 = sync.copies()
            for _ = 1, 1000 do
                s:get_data("t") s:get_version("t") s:get("t") s:get_last_modified_time("t")
            end
            ngx.say("copies for 4000 reads of one version: ", sync.copies() - c0)
            ngx.shared.src:set("version", "v2")
            T.wait(function() return s:get_version("t") == "v2" end)
            for _ = 1, 1000 do s:get_data("t") end
            ngx.say("copies after a new version: ", sync.copies() - c0, ", data ", #s:get_data("t"))
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
copies for 4000 reads of one version: 0
copies after a new version: 1, data 2000
--- no_error_log
[error]
