# vim:set ft= ts=4 sw=4 et:
# The lifecycle table: workers of a generation, reloads, crashes, exits.
# Signals are sent in-band from Lua (see t/README.md).

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
# the real runner: each error_log check sees the whole block's log (see
# Workerbus::TestCore)
check_accum_error_log();
no_long_string();
run_tests();

__DATA__

=== TEST 1: four live workers of generation 1 appear in the status
--- main_config
    workerbus_zone wb 1m;
--- config
    location = /status { workerbus_status; }
    location = /t {
        content_by_lua_block {
            local cjson = require "cjson"
            local st
            local wait_for = require("wbtest").wait_for
            wait_for("4 running workers", function()
                st = cjson.decode(ngx.location.capture("/status").body)
                local n = 0
                for _, w in ipairs(st.workers) do n = n + (w.state == "running" and 1 or 0) end
                return n == 4
            end)
            local live, slots = 0, {}
            for _, w in ipairs(st.workers) do
                if w.state == "running" and w.generation == 1 then
                    live = live + 1
                    slots[#slots + 1] = w.slot
                end
            end
            table.sort(slots)
            ngx.say("generation ", st.generation, ", ", live, " running in slots ",
                    table.concat(slots, ","))
            local g = st.generations[1]
            ngx.say("generation record: ", g.generation, " ", g.worker_processes, " workers, ",
                    g.live_workers, " live, master ", g.master_pid == require("ngx.process").get_master_pid())
            ngx.say("node id has host and master pid: ",
                    st.node.id == st.node.host .. "/" .. st.node.master_pid .. "/" .. math.floor(st.node.started * 1000 + 0.5))
        }
    }
--- request
GET /t
--- response_body
generation 1, 4 running in slots 0,1,2,3
generation record: 1 4 workers, 4 live, master true
node id has host and master pid: true
--- grep_error_log eval: qr/workerbus: generation \d+ begins: master pid \d+, \d+ worker processes, zones "wb" 1024k/
--- grep_error_log_out eval
qr/workerbus: generation 1 begins: master pid \d+, 4 worker processes, zones "wb" 1024k\n/
--- no_error_log
[error]



=== TEST 2: HUP keeps the zone: a value written before is read after, the generation goes up by one
--- main_config
    workerbus_zone wb 1m;
--- config
    location = /before {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            assert(wb.set("marker", "written by " .. ngx.worker.pid()))
            ngx.say("generation ", wb.generation(), " set ", wb.get("marker") ~= nil)
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(require("ngx.process").get_master_pid(), 1)  -- SIGHUP
            local wait_for = require("wbtest").wait_for
            -- this old worker keeps serving us until the new ones run and the
            -- other old ones left, so that the next request reaches a new one
            wait_for("4 workers of generation 2, 3 of generation 1 exited", function()
                local new, gone = 0, 0
                for _, w in ipairs(wb.status().workers) do
                    if w.generation == 2 and w.state == "running" then new = new + 1 end
                    if w.generation == 1 and w.state == "exited" then gone = gone + 1 end
                end
                return new == 4 and gone == 3 and ngx.worker.exiting()
            end)
        }
    }
    location = /after {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local wait_for = require("wbtest").wait_for
            local st, old_exited
            wait_for("the old workers to exit", function()
                st, old_exited = wb.status(), 0
                for _, w in ipairs(st.workers) do
                    if w.generation == 1 and w.state == "exited" then old_exited = old_exited + 1 end
                end
                return old_exited == 4
            end)
            ngx.say("generation ", wb.generation(), ", newest ", st.current_generation,
                    ", marker survived: ", (wb.get("marker") or ""):match("^written by %d+$") ~= nil,
                    ", old workers exited: ", old_exited)
        }
    }
--- request eval
["GET /before", "GET /after"]
--- response_body eval
["generation 1 set true\n", "generation 2, newest 2, marker survived: true, old workers exited: 4\n"]
--- error_log
workerbus: generation 2 begins
--- no_error_log
[error]
crashed



=== TEST 3: kill -9 of a worker: the respawned one takes its slot and the dead pid is marked crashed at once
--- main_config
    workerbus_zone wb 1m;
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local wait_for = require("wbtest").wait_for
            local function live()
                local n = 0
                for _, w in ipairs(wb.status().workers) do n = n + (w.state == "running" and 1 or 0) end
                return n
            end
            wait_for("4 running workers", function() return live() == 4 end)
            local victim
            for _, w in ipairs(wb.status().workers) do
                if w.state == "running" and w.pid ~= ngx.worker.pid() then victim = w break end
            end
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(victim.pid, 9)
            local dead, heir
            wait_for("the respawn", function()
                for _, w in ipairs(wb.status().workers) do
                    if w.pid == victim.pid then dead = w end
                end
                return dead.replaced_by and live() == 4
            end)
            local live = live()
            for _, w in ipairs(wb.status().workers) do
                if w.pid == dead.replaced_by then heir = w end
            end
            ngx.say("dead pid: ", dead.state, ", replaced in the same slot: ",
                    heir ~= nil and heir.slot == victim.slot and heir.state == "running",
                    ", live: ", live)
        }
    }
--- request
GET /t
--- response_body
dead pid: crashed, replaced in the same slot: true, live: 4
--- error_log eval
qr/workerbus: worker process \d+ \(slot \d, generation 1\) crashed: gone without exiting/



=== TEST 4: QUIT: every worker marks itself exited, the last one sees 0 live
--- main_config
    workerbus_zone wb 1m;
    workerbus_heartbeat 200ms;
--- config
    location = /t {
        content_by_lua_block {
            local wait_for = require("wbtest").wait_for
            wait_for("4 workers", function() return #require("resty.workerbus").status().workers == 4 end)
            ngx.say(#require("resty.workerbus").status().workers, " workers")
        }
    }
--- request
GET /t
--- response_body
4 workers
--- shutdown_error_log eval
[qr/workerbus: worker process \d+ exited from slot \d, generation 1 \(3 live\)/,
 qr/workerbus: worker process \d+ exited from slot \d, generation 1 \(2 live\)/,
 qr/workerbus: worker process \d+ exited from slot \d, generation 1 \(1 live\)/,
 qr/workerbus: worker process \d+ exited from slot \d, generation 1 \(0 live\)/]



=== TEST 5: a respawn whose dead predecessor a sibling's heartbeat marked first does not replay its generation's events
--- main_config
    workerbus_zone wb 1m;
    workerbus_heartbeat 100ms;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local got = ngx.shared.got
        if got:get("killed") then
            -- the respawn: a slow start, so that a sibling's heartbeat
            -- marks its predecessor crashed before it registers itself
            local t0 = ngx.now()
            repeat ngx.update_time() until ngx.now() - t0 >= 1
        end
        local ev = require "resty.worker.events"
        local me = ngx.worker.pid()
        ev.register(function(data, event)
            got:incr(event .. ":" .. me, 1, 0)
        end, "t")
        assert(ev.configure { shm = "wb" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local ev = require "resty.worker.events"
            local got = ngx.shared.got
            local wait_for = require("wbtest").wait_for
            local running = require("wbtest").running
            wait_for("4 running workers", function() return #running() == 4 end)
            local before = running()
            assert(ev.post("t", "before", "x"))
            wait_for("every worker to handle 'before'", function()
                for _, w in ipairs(before) do
                    if not got:get("before:" .. w.pid) then return false end
                end
                return true
            end)
            local victim
            for _, w in ipairs(before) do
                if w.pid ~= ngx.worker.pid() then victim = w break end
            end
            got:set("killed", true)
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(victim.pid, 9)
            local heir
            wait_for("the respawn", function()
                for _, w in ipairs(running()) do
                    if w.slot == victim.slot and w.pid ~= victim.pid then heir = w.pid end
                end
                return heir ~= nil
            end)
            assert(ev.post("t", "after", "x"))
            wait_for("the respawn to handle 'after'", function() return got:get("after:" .. heir) end)
            local dead
            for _, w in ipairs(wb.status().workers) do
                if w.pid == victim.pid then dead = w end
            end
            ngx.say("dead: ", dead.state, ", replaced by the respawn: ", dead.replaced_by == heir)
            ngx.say("respawn handled 'before': ", got:get("before:" .. heir) or 0,
                    ", 'after': ", got:get("after:" .. heir))
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
dead: crashed, replaced by the respawn: true
respawn handled 'before': 0, 'after': 1
--- error_log eval
qr/workerbus: worker process \d+ \(slot \d, generation 1\) crashed: gone without exiting/
