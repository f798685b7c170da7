# vim:set ft= ts=4 sw=4 et:
# resty.sync's trigger: with a 60 s interval a trigger from any worker runs
# the version check at once and every worker's on_update sees the new
# version; triggers coalesce and a task never runs twice at once; a trigger
# made as the runner is killed (-9) reaches the next runner, and one made
# after the takeover works; bad input gives exact errors. The PostgreSQL
# channel (trigger_on) is t/502-sync-trigger-pg.t. No latency is asserted
# here (bench/sync_run measures it): every wait is a deadline loop.

use Test::Nginx::Socket::Lua 'no_plan';

workers(4);
master_on();
no_long_string();

# Every block: a deadline loop, per-version sets of workers whose on_update
# ran (runs dict, "upd:<tag>:<version>:<pid>"), and the source (src dict).
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
                ngx.sleep(0.01)
                ngx.update_time()
            end
            return true
        end
        -- How many workers' on_update saw `version` of `tag`.
        function T.seen(tag, version)
            local n = 0
            local prefix = "upd:" .. tag .. ":" .. version .. ":"
            for _, k in ipairs(ngx.shared.runs:get_keys(0)) do
                if k:sub(1, #prefix) == prefix then
                    n = n + 1
                end
            end
            return n
        end
        -- A task whose version is src's "v:<tag>" (default "v1"); counts
        -- its version checks ("checks:<tag>"), the checks under way
        -- ("active:<tag>") and the most ever under way at once ("max:<tag>").
        function T.task(sync, s, tag, hold)
            assert(s:register(function(mode)
                local src, d = ngx.shared.src, ngx.shared.runs
                local v = src:get("v:" .. tag) or "v1"
                if mode == sync.ACTION_DATA then
                    return "data of " .. v
                end
                local n = d:incr("active:" .. tag, 1, 0)
                if n > (d:get("max:" .. tag) or 0) then
                    d:set("max:" .. tag, n)
                end
                local c = d:incr("checks:" .. tag, 1, 0)
                d:set("co:" .. tag .. ":" .. c, tostring(coroutine.running()))
                if hold then hold(d) end
                d:incr("active:" .. tag, -1)
                return v
            end, tag))
            assert(s:on_update(tag, function(data, version)
                assert(data == "data of " .. version)
                ngx.shared.runs:set("upd:" .. tag .. ":" .. version .. ":" .. ngx.worker.pid(), true)
            end))
        end
        package.loaded.T = T
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: interval 60 s: trigger(tag) from whichever worker serves the request, then trigger() for every task; every worker's on_update sees each new version
--- main_config
    workerbus_zone wb 4m;
--- http_config eval
$::Helpers . <<'_EOC_';
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local T = package.loaded.T
        local s = assert(sync.new(60, "wb"))
        T.task(sync, s, "a")
        T.task(sync, s, "b")
        assert(s:start())
        SYNCER = s
    }
_EOC_
--- config
    location = /t {
        content_by_lua_block {
            local T = package.loaded.T
            local src, d = ngx.shared.src, ngx.shared.runs
            -- a worker sees v1 once the first event reaches it: make one
            src:set("v:a", "v2")
            ngx.say("trigger a: ", SYNCER:trigger("a"))
            ngx.say("a v2 in 4 workers: ", T.wait(function() return T.seen("a", "v2") == 4 end))
            ngx.say("b untouched: ", d:get("checks:b"), " check(s)")
            src:set("v:a", "v3")
            src:set("v:b", "v3")
            ngx.say("trigger all: ", SYNCER:trigger())
            ngx.say("a and b v3 in 4 workers: ", T.wait(function()
                return T.seen("a", "v3") == 4 and T.seen("b", "v3") == 4
            end))
            local data, version = SYNCER:get("b")
            ngx.say("get b: ", version, " ", data)
        }
    }
    location = /more {
        content_by_lua_block {
            -- another request, maybe another worker: still at once
            local T = package.loaded.T
            ngx.shared.src:set("v:b", "v4")
            ngx.say("trigger b: ", SYNCER:trigger("b"))
            ngx.say("b v4 in 4 workers: ", T.wait(function() return T.seen("b", "v4") == 4 end))
        }
    }
--- request eval
["GET /t", "GET /more", "GET /more"]
--- response_body eval
["trigger a: true
a v2 in 4 workers: true
b untouched: 1 check(s)
trigger all: true
a and b v3 in 4 workers: true
get b: v3 data of v3
",
"trigger b: true
b v4 in 4 workers: true
",
"trigger b: true
b v4 in 4 workers: true
"]
--- timeout: 30
--- no_error_log
[error]
[warn]



=== TEST 2: 40 triggers from all four workers during a run make exactly one more run after it, never two at once; then one trigger makes one run
--- main_config
    workerbus_zone wb 4m;
--- http_config eval
$::Helpers . <<'_EOC_';
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local T = package.loaded.T
        local s = assert(sync.new(60, "wb"))
        -- Once "gate" is set, the next check holds until "release".
        T.task(sync, s, "t", function(d)
            if ngx.get_phase() ~= "init_worker" and d:get("gate") and d:add("held", true) then
                T.wait(function() return d:get("release") end, 20)
            end
            if ngx.get_phase() ~= "init_worker" then
                ngx.sleep(0.01)   -- a run under way for a while, so overlaps would show
            end
        end)
        assert(s:start())
        SYNCER = s
        -- Each worker, when "fire" is set, triggers 10 times (once for every task).
        local fired = false
        ngx.timer.every(0.01, function()
            local d = ngx.shared.runs
            if fired or not d:get("fire") then return end
            fired = true
            for i = 1, 10 do
                if i == 1 then assert(s:trigger()) else assert(s:trigger("t")) end
                d:incr("fired", 1, 0)
            end
        end)
    }
_EOC_
--- config
    location = /t {
        content_by_lua_block {
            local T = package.loaded.T
            local d = ngx.shared.runs
            local before = d:get("checks:t")
            d:set("gate", true)
            ngx.say("trigger: ", SYNCER:trigger("t"))
            ngx.say("run held: ", T.wait(function() return d:get("held") end))
            d:set("fire", true)
            ngx.say("40 triggers made: ", T.wait(function() return d:get("fired") == 40 end))
            d:set("release", true)
            ngx.say("runs after the gate: ", T.wait(function() return d:get("checks:t") == before + 2 end)
                    and 2 or d:get("checks:t") - before)
            -- "right after it": in the same timer, not at a later tick
            ngx.say("the next run right after it: ",
                    d:get("co:t:" .. (before + 1)) == d:get("co:t:" .. (before + 2)))
            ngx.say("under way: ", T.wait(function() return d:get("active:t") == 0 end) and 0)
            -- one more trigger, with a new version: every worker sees it
            -- after exactly one more run (a third, spurious run would count)
            ngx.shared.src:set("v:t", "v2")
            ngx.say("trigger: ", SYNCER:trigger("t"))
            ngx.say("v2 in 4 workers: ", T.wait(function() return T.seen("t", "v2") == 4 end))
            ngx.say("runs after the gate: ", d:get("checks:t") - before)
            ngx.say("most at once: ", d:get("max:t"))
        }
    }
--- request
GET /t
--- response_body
trigger: true
run held: true
40 triggers made: true
runs after the gate: 2
the next run right after it: true
under way: 0
trigger: true
v2 in 4 workers: true
runs after the gate: 3
most at once: 1
--- timeout: 40
--- no_error_log
[error]



=== TEST 3: kill -9 of the runner: a trigger made right after the kill reaches the next runner; one made after the takeover works
--- main_config
    workerbus_zone wb 4m;
--- http_config eval
$::Helpers . <<'_EOC_';
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local T = package.loaded.T
        local s = assert(sync.new(60, "wb"))
        T.task(sync, s, "t")
        SYNCER = s
        local victim = ngx.shared.runs:get("victim")
        if not victim then
            assert(s:start())
        else
            -- The respawned worker would take the lease in start() and run
            -- every task there: it starts only once a survivor took over,
            -- so that the trigger can only reach that survivor (from the zone).
            ngx.timer.at(0, function()
                T.wait(function() local r = s:runner() return r ~= 0 and r ~= victim end, 20)
                assert(s:start())
                ngx.shared.runs:set("respawn started", true)
            end)
        end
        -- A worker that is not the runner kills it, then changes the
        -- version and triggers at once (the lease still names the dead pid).
        local ffi = require "ffi"
        ffi.cdef "int kill(int pid, int sig);"
        ngx.timer.every(0.01, function()
            local d = ngx.shared.runs
            local victim = s:runner()
            if not d:get("kill") or victim == ngx.worker.pid() or victim == 0 then
                return
            end
            if d:add("victim", victim) then
                ffi.C.kill(victim, 9)
                ngx.shared.src:set("v:t", "v2")
                d:set("trigger", tostring(s:trigger("t")))
                d:set("runner at trigger", s:runner())
            end
        end)
    }
_EOC_
--- config
    location = /kill {
        content_by_lua_block {
            -- this worker may be the victim: answer before the kill
            ngx.shared.runs:set("kill", true)
            ngx.say("kill asked")
        }
    }
    location = /check {
        content_by_lua_block {
            local T = package.loaded.T
            local d = ngx.shared.runs
            ngx.say("killed and triggered: ", T.wait(function() return d:get("trigger") end) and d:get("trigger"))
            local victim = d:get("victim")
            ngx.say("the lease still named the victim: ", d:get("runner at trigger") == victim)
            -- the three workers that lived see v2 (a respawned one may
            -- start after it was published)
            ngx.say("v2 in the 3 survivors: ", T.wait(function() return T.seen("t", "v2") >= 3 end))
            ngx.say("a new runner: ", T.wait(function()
                local r = SYNCER:runner()
                return r ~= 0 and r ~= victim
            end))
            ngx.say("the respawned worker started: ", T.wait(function() return d:get("respawn started") end))
            ngx.shared.src:set("v:t", "v3")
            ngx.say("trigger: ", SYNCER:trigger("t"))
            ngx.say("v3 in 4 workers: ", T.wait(function() return T.seen("t", "v3") == 4 end))
            ngx.say("the victim saw none: ", d:get("upd:t:v3:" .. victim) == nil)
        }
    }
--- request eval
["GET /kill", "GET /check"]
--- response_body eval
["kill asked
",
"killed and triggered: true
the lease still named the victim: true
v2 in the 3 survivors: true
a new runner: true
the respawned worker started: true
trigger: true
v3 in 4 workers: true
the victim saw none: true
"]
--- timeout: 30
--- error_log eval
qr/sync "wb#1": worker process \d+ is the runner, taken from pid \d+ \(owner died\)/



=== TEST 4: bad input gives nil and an exact error
--- main_config
    workerbus_zone wb 4m;
--- http_config eval
$::Helpers . <<'_EOC_';
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local out = {}
        local function try(what, ...)
            local r, err = ...
            out[#out + 1] = what .. ": " .. tostring(r) .. ", " .. tostring(err)
        end
        local s = assert(sync.new(60, "wb"))
        assert(s:register(function() return "x" end, "a"))
        try("trigger before start", s:trigger("a"))
        try("trigger() before start", s:trigger())
        assert(s:start())
        try("trigger(1)", s:trigger(1))
        try("trigger({})", s:trigger({}))
        try("trigger(false)", s:trigger(false))
        try("trigger(unknown)", s:trigger("zz"))
        try("trigger('')", s:trigger(""))
        try("trigger(a)", s:trigger("a"))
        try("trigger()", s:trigger())
        try("trigger_on(1)", s:trigger_on(1))
        try("trigger_on(nil)", s:trigger_on())
        try("trigger_on without the bridge", s:trigger_on("sync"))
        OUT = out
    }
_EOC_
--- config
    location = /t {
        content_by_lua_block { ngx.say(table.concat(OUT, "\n")) }
    }
--- request
GET /t
--- response_body
trigger before start: nil, not started: call start() first
trigger() before start: nil, not started: call start() first
trigger(1): nil, tag must be a string or nil
trigger({}): nil, tag must be a string or nil
trigger(false): nil, tag must be a string or nil
trigger(unknown): nil, unknown tag "zz"
trigger(''): nil, unknown tag ""
trigger(a): true, nil
trigger(): true, nil
trigger_on(1): nil, channel must be a string
trigger_on(nil): nil, channel must be a string
trigger_on without the bridge: nil, the PostgreSQL bridge is not configured (no workerbus_postgres directive)
