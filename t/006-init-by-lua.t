# vim:set ft= ts=4 sw=4 et:
# Calls made in init_by_lua (the master, before any worker and, on a first
# start, before the zones are ready) work there or fail with a clear error,
# and never leave the workers without their lifecycle record, reader or
# wake-ups. configure() there works, and an event posted there reaches every
# worker of the generation once.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();
run_tests();

__DATA__

=== TEST 1: without lua_shared_dict (init_by_lua runs before any zone is ready): status/get fail clearly, configure and post work, every worker is tracked and gets the event once
--- main_config
    workerbus_zone wb 1m;
--- http_config
    init_by_lua_block {
        local wb = require "resty.workerbus"
        local ev = require "resty.worker.events"
        local st, err = wb.status()
        package.loaded.t_init = { status = tostring(st) .. ", " .. err, get = select(2, wb.get("k")) }
        assert(ev.configure { shm = "wb" })
        assert(ev.post("boot", "hello", "from init_by_lua"))
    }
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local wb = require "resty.workerbus"
        local got = {}
        local function note(s)
            got[#got + 1] = s
            assert(wb.set("got" .. ngx.worker.id(), table.concat(got, ",")))
        end
        ev.register(function(data, event) note(event .. ":" .. data) end, "boot")
        ev.register(function(data, event) note(event) end, "t")
    }
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local ev = require "resty.worker.events"
            local wait_for = require("wbtest").wait_for
            local init = package.loaded.t_init
            ngx.say("status in init_by_lua: ", init.status)
            ngx.say("get in init_by_lua: ", init.get)
            wait_for("4 running workers", function()
                local n = 0
                for _, w in ipairs(wb.status().workers) do n = n + (w.state == "running" and 1 or 0) end
                return n == 4
            end)
            ngx.say("configured in this worker: ", ev.configured())
            assert(ev.post("t", "ping", "x"))
            wait_for("every worker's handlers", function()
                for w = 0, 3 do
                    if wb.get("got" .. w) ~= "hello:from init_by_lua,ping" then return false end
                end
                return true
            end)
            for w = 0, 3 do ngx.say("worker ", w, " got: ", wb.get("got" .. w)) end
        }
    }
--- request
GET /t
--- response_body
status in init_by_lua: nil, resty.workerbus: status() not available in init_by_lua: the zones are not ready and no worker runs yet (configure and post work there; call this from init_worker_by_lua or later)
get in init_by_lua: not available in init_by_lua: the zones are not ready and no worker runs yet (configure and post work there; call this from init_worker_by_lua or later)
configured in this worker: true
worker 0 got: hello:from init_by_lua,ping
worker 1 got: hello:from init_by_lua,ping
worker 2 got: hello:from init_by_lua,ping
worker 3 got: hello:from init_by_lua,ping
--- no_error_log
[error]
not tracked



=== TEST 2: with a lua_shared_dict named in configure (as the original's users write it) and the default zone: every worker gets the event once; a respawn does not replay it
--- http_config
    lua_shared_dict process_events 1m;
    lua_shared_dict got 1m;
    init_by_lua_block {
        local ev = require "resty.worker.events"
        assert(ev.configure { shm = "process_events", interval = 0.01 })
        assert(ev.post("boot", "hello", "x"))
    }
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local me = ngx.worker.pid()
        ev.register(function(data, event) ngx.shared.got:incr(event .. ":" .. me, 1, 0) end, "boot")
        ev.register(function(data, event) ngx.shared.got:incr(event .. ":" .. me, 1, 0) end, "t")
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
            wait_for("hello at every worker", function()
                for _, w in ipairs(running()) do
                    if not got:get("hello:" .. w.pid) then return false end
                end
                return true
            end)
            local victim
            for _, w in ipairs(running()) do
                if w.pid ~= ngx.worker.pid() then victim = w break end
            end
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
            local all
            wait_for("'after' at every worker", function()
                all = running()
                for _, w in ipairs(all) do
                    if not got:get("after:" .. w.pid) then return false end
                end
                return #all == 4
            end)
            local hellos = 0
            for _, w in ipairs(all) do hellos = hellos + (got:get("hello:" .. w.pid) or 0) end
            ngx.say("hello handled by the 3 first workers once each: ", hellos,
                    ", by the respawn: ", got:get("hello:" .. heir) or 0)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
hello handled by the 3 first workers once each: 3, by the respawn: 0
--- no_error_log
not tracked
not delivered
failed in this worker



=== TEST 3: after such calls on a first start, a HUP gives a fully tracked generation 2 that gets its own init_by_lua event, and a QUIT ends every worker
--- main_config
    workerbus_zone wb 1m;
--- http_config
    init_by_lua_block {
        local wb = require "resty.workerbus"
        pcall(wb.status)
        local ev = require "resty.worker.events"
        assert(ev.configure { shm = "wb" })
        assert(ev.post("boot", "hello", "x"))
    }
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local wb = require "resty.workerbus"
        ev.register(function()
            assert(wb.set("hello:" .. wb.generation() .. ":" .. ngx.worker.id(), "1"))
        end, "boot")
    }
--- config
    location = /hup {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local wait_for = require("wbtest").wait_for
            wait_for("hello at every worker of generation 1", function()
                for w = 0, 3 do if not wb.get("hello:1:" .. w) then return false end end
                return true
            end)
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(require("ngx.process").get_master_pid(), 1)
            -- this old worker serves us until the new ones run and the other old ones left
            wait_for("4 workers of generation 2, 3 of generation 1 exited", function()
                local new, gone = 0, 0
                for _, w in ipairs(wb.status().workers) do
                    if w.generation == 2 and w.state == "running" then new = new + 1 end
                    if w.generation == 1 and w.state == "exited" then gone = gone + 1 end
                end
                return new == 4 and gone == 3 and ngx.worker.exiting()
            end)
            ngx.say("reloaded")
        }
    }
    location = /after {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local wait_for = require("wbtest").wait_for
            wait_for("hello at every worker of generation 2", function()
                for w = 0, 3 do if not wb.get("hello:2:" .. w) then return false end end
                return true
            end)
            local tracked = 0
            for _, w in ipairs(wb.status().workers) do
                if w.generation == 2 and w.state == "running" then tracked = tracked + 1 end
            end
            ngx.say("generation ", wb.generation(), ": ", tracked, " tracked, each got its hello")
        }
    }
--- request eval
["GET /hup", "GET /after"]
--- response_body eval
["reloaded\n", "generation 2: 4 tracked, each got its hello\n"]
--- timeout: 15
--- no_error_log
not tracked
not delivered
--- shutdown_error_log eval
[qr/workerbus: worker process \d+ exited from slot \d, generation 2 \(0 live\)/]
