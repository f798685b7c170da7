# vim:set ft= ts=4 sw=4 et:
# resty.sync's trigger: with a 60 s interval a trigger from any worker runs
# the version check at once and every worker's on_update sees the new
# version; triggers coalesce and a task never runs twice at once; a trigger
# made as the runner is killed (-9) reaches the next runner, and one made
# after the takeover works; bad input gives exact errors. The PostgreSQL
# channel (trigger_on) is t/502-sync-trigger-pg.t. No latency is asserted
# here (bench/sync_run measures it): every wait is a deadline loop.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();

# Blocks 1-3 use the helpers of t/lib/wbtest/sync.lua (`local T = require
# "wbtest.sync"`): a deadline loop, T.task() (a task whose version is the
# lua_shared_dict "src"'s, counting its checks in the lua_shared_dict
# "runs"), and T.seen() (how many workers' on_update saw a version).

run_tests();

__DATA__

=== TEST 1: interval 60 s: trigger(tag) from whichever worker serves the request, then trigger() for every task; every worker's on_update sees each new version
--- zone: wb 4m
--- shared_dicts: runs 4m, src 1m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local T = require "wbtest.sync"
        local s = assert(sync.new(60, "wb"))
        T.task(s, "a")
        T.task(s, "b")
        assert(s:start())
        SYNCER = s
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
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
            local T = require "wbtest.sync"
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
--- zone: wb 4m
--- shared_dicts: runs 4m, src 1m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local T = require "wbtest.sync"
        local s = assert(sync.new(60, "wb"))
        -- Once "gate" is set, the next check holds until "release".
        T.task(s, "t", function(d)
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
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest.sync"
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
--- zone: wb 4m
--- shared_dicts: runs 4m, src 1m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local T = require "wbtest.sync"
        local s = assert(sync.new(60, "wb"))
        T.task(s, "t")
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
        T.kill_runner(s, 0.01, nil, function()
            local d = ngx.shared.runs
            ngx.shared.src:set("v:t", "v2")
            d:set("trigger", tostring(s:trigger("t")))
            d:set("runner at trigger", s:runner())
        end)
    }
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
            local T = require "wbtest.sync"
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
            -- asserted here: the real runner checks --- error_log after each request
            ngx.say("takeover logged: ", require("wbtest").logged(
                'sync "wb#1": worker process %d+ is the runner, taken from pid %d+ %(owner died%)'))
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
takeover logged: true
"]
--- timeout: 30



=== TEST 4: bad input gives nil and an exact error
--- zone: wb 4m
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local try, out = require("wbtest").recorder()
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
