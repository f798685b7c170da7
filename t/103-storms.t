# vim:set ft= ts=4 sw=4 et:
# Fault storms, bounded to a few seconds each, while every worker posts:
# a kill -9 storm and a HUP storm. Every event a worker misses must be
# reported to it (a `lagged` count) or counted as cut off by a writer that
# was killed mid-post (the ring's `dropped`); nothing wedges; requests keep
# succeeding across reloads.
#
# Each poster numbers its events (pid:n, n counted only when post()
# accepted it); each receiver tracks the last n of every poster it saw and
# adds up the holes. Tallies live in a lua_shared_dict, per receiver pid,
# so that those of killed workers survive them.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();
# Each post logs a debug line (as in the original); thousands per storm.
log_level('info');

our $Config = <<'_EOC_';
    lua_shared_dict tally 8m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local tally = ngx.shared.tally
        local me = ngx.worker.pid()
        local last = {}
        -- a respawn (its slot of its generation had a worker before) must
        -- not replay what was posted before it started
        local slot_key = "slot:" .. require("resty.workerbus").generation() .. ":" .. ngx.worker.id()
        local respawn = not tally:add(slot_key, me)
        ngx.update_time()
        local born = ngx.now()
        ev.register(function(data)
            local poster, n, t = data:match("^(%d+):(%d+):([%d.]+)$")
            if not poster then return end
            n = tonumber(n)
            if respawn and tonumber(t) < born - 1 then
                tally:incr("replayed:" .. me, 1, 0)
            end
            local prev = last[poster]
            if prev and n > prev + 1 then
                tally:incr("gaps:" .. me, n - prev - 1, 0)
            end
            if not prev or n > prev then last[poster] = n end
            tally:incr("got:" .. me, 1, 0)
        end, "storm", "e")
        ev.register(function(n)
            tally:incr("lagged:" .. me, n, 0)
        end, "resty-worker-events", "lagged")
        ev.register(function(data)
            tally:set("marker:" .. me, data)
        end, "storm", "marker")
        assert(ev.configure { shm = "wb", interval = 0.01 })
        tally:set("pid:" .. me, true)
        -- post until told to stop: 20 events, then a 1 ms pause
        local n = 0
        local function poster(premature)
            while not premature and not tally:get("stop") and not ngx.worker.exiting() do
                for _ = 1, 20 do
                    if ev.post("storm", "e", me .. ":" .. (n + 1) .. ":" .. ngx.now()) then n = n + 1 end
                end
                ngx.sleep(0.001)
            end
        end
        assert(ngx.timer.at(0, poster))
    }
_EOC_

our $Check = <<'_EOC_';
    location = /ping {
        content_by_lua_block { ngx.say("ok") }
    }
    location = /check {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local ev = require "resty.worker.events"
            local tally = ngx.shared.tally
            local function wait_for(what, f) return require("wbtest").wait_for(what, f, 20) end
            local function running()
                local st, r = wb.status(), {}
                for _, w in ipairs(st.workers) do
                    if w.state == "running" and w.generation == st.current_generation then r[#r + 1] = w end
                end
                return r
            end
            wait_for("4 running workers", function() return #running() == 4 end)
            tally:set("stop", true)
            -- nothing wedged: a marker posted now reaches every running worker
            local marker = tostring(ngx.now())
            assert(ev.post("storm", "marker", marker))
            wait_for("the marker at every worker", function()
                for _, w in ipairs(running()) do
                    if tally:get("marker:" .. w.pid) ~= marker then return false end
                end
                return true
            end)
            local dropped = 0
            for _, z in ipairs(wb.status().zones) do dropped = dropped + (z.events and z.events.dropped or 0) end
            local receivers, unreported, got, replayed = 0, 0, 0, 0
            for _, key in ipairs(tally:get_keys(0)) do
                local pid = key:match("^pid:(%d+)$")
                if pid then
                    receivers = receivers + 1
                    got = got + (tally:get("got:" .. pid) or 0)
                    replayed = replayed + (tally:get("replayed:" .. pid) or 0)
                    local gaps, lagged = tally:get("gaps:" .. pid) or 0, tally:get("lagged:" .. pid) or 0
                    if gaps > lagged + dropped then
                        unreported = unreported + 1
                        ngx.log(ngx.ERR, "worker ", pid, " missed ", gaps, " events, told of ", lagged,
                                " lagged, ", dropped, " dropped")
                    end
                end
            end
            ngx.log(ngx.NOTICE, "storm: ", receivers, " receivers handled ", got, " events")
            ngx.say("receivers with unreported gaps: ", unreported, ", events handled: ", got > 1000,
                    ", replayed by respawns: ", replayed)
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: kill -9 storm (a random other worker every 0.1-0.3 s for 3 s) while every worker posts: every gap reported, nothing wedged
--- main_config
    workerbus_zone wb 4m;
    workerbus_heartbeat 100ms;
--- http_config eval: $::Config
--- config eval
$::Check . <<'_EOC_';
    location = /storm {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            local kills, t_end = 0, ngx.now() + 3
            while ngx.now() < t_end do
                local others = {}
                for _, w in ipairs(wb.status().workers) do
                    if w.state == "running" and w.pid ~= ngx.worker.pid() then others[#others + 1] = w.pid end
                end
                if #others > 0 then
                    ffi.C.kill(others[math.random(#others)], 9)
                    kills = kills + 1
                end
                ngx.sleep(0.1 + math.random() * 0.2)
            end
            ngx.say("kills: ", kills > 5)
        }
    }
_EOC_
--- request eval
["GET /storm", "GET /check", "GET /ping"]
--- response_body eval
["kills: true\n", "receivers with unreported gaps: 0, events handled: true, replayed by respawns: 0\n", "ok\n"]
--- timeout: 30
--- no_error_log
missed



=== TEST 2: HUP storm (8 reloads, back to back) while every worker of every generation posts: requests between them all succeed, every gap reported, nothing wedged
--- main_config
    workerbus_zone wb 4m;
    workerbus_heartbeat 100ms;
--- http_config eval: $::Config
--- config eval
$::Check . <<'_EOC_';
    location = /hup {
        content_by_lua_block {
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(require("ngx.process").get_master_pid(), 1)
            ngx.sleep(0.2)
            ngx.say("ok")
        }
    }
_EOC_
--- request eval
[("GET /hup", "GET /ping", "GET /ping") x 8, "GET /check", "GET /ping"]
--- response_body eval
[("ok\n") x 24, "receivers with unreported gaps: 0, events handled: true, replayed by respawns: 0\n", "ok\n"]
--- timeout: 30
--- no_error_log
missed
[alert]
