# vim:set ft= ts=4 sw=4 et:
# The lifecycle table: workers of a generation, reloads, crashes, exits.
# Signals are sent in-band from Lua (see t/README.md).

use Test::Nginx::Socket::Lua 'no_plan';

workers(4);
master_on();
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
            ngx.sleep(0.3)  -- let every worker finish init_process
            local cjson = require "cjson"
            local st = cjson.decode(ngx.location.capture("/status").body)
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
            ngx.sleep(1.5)  -- this old worker keeps serving us while new ones start
        }
    }
    location = /after {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local st = wb.status()
            local old_exited = 0
            for _, w in ipairs(st.workers) do
                if w.generation == 1 and w.state == "exited" then old_exited = old_exited + 1 end
            end
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
            local victim
            for _, w in ipairs(wb.status().workers) do
                if w.state == "running" and w.pid ~= ngx.worker.pid() then victim = w break end
            end
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(victim.pid, 9)
            ngx.sleep(0.5)  -- less than the 1s heartbeat: seen through the respawn
            local dead, live, heir = nil, 0, nil
            for _, w in ipairs(wb.status().workers) do
                if w.pid == victim.pid then dead = w end
                if w.state == "running" then live = live + 1 end
            end
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
            ngx.sleep(0.3)
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
