# vim:set ft= ts=4 sw=4 et:
# resty.worker.manager (the lua-resty-worker-manager API) driven by the
# module's lifecycle table: start, reload, stop, crash, hang, bad calls.
# Every callback logs "<kind> n_prev=.. n_mine=.. n_next=.." at notice.

use Test::Nginx::Socket::Lua 'no_plan';

workers(4);
master_on();
no_long_string();

our $Manager = <<'_EOC_';
    init_by_lua_block {
        local function logger(kind)
            return function(id, n_prev, n_mine, n_next)
                ngx.log(ngx.NOTICE, kind, " id=", id, " n_prev=", tostring(n_prev),
                        " n_mine=", tostring(n_mine), " n_next=", tostring(n_next))
            end
        end
        package.loaded.mgr_logger = logger
        require("resty.worker.manager").on_init_by_lua({ shm = "wb", failed = 1 },
            logger("master start"), logger("master exit"))
    }
    init_worker_by_lua_block {
        local logger = package.loaded.mgr_logger
        require("resty.worker.manager").on_init_worker_by_lua(logger("worker start"),
                                                              logger("worker exit"))
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: start: master start with n_prev nil, then four worker starts seeing n_mine 1..4
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block { ngx.sleep(0.5) ngx.say("ok") }
    }
--- request
GET /t
--- response_body
ok
--- grep_error_log eval: qr/(master|worker) start id=\d+ n_prev=\w+ n_mine=\d+ n_next=\w+/
--- grep_error_log_out eval
qr/^master start id=1 n_prev=nil n_mine=0 n_next=nil
worker start id=\d+ n_prev=nil n_mine=1 n_next=nil
worker start id=\d+ n_prev=nil n_mine=2 n_next=nil
worker start id=\d+ n_prev=nil n_mine=3 n_next=nil
worker start id=\d+ n_prev=nil n_mine=4 n_next=nil
$/
--- no_error_log
[error]



=== TEST 2: HUP: master start of generation 2 sees the 4 old workers; their exits see the new generation
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block {
            ngx.sleep(0.5)
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(require("ngx.process").get_master_pid(), 1)
            ngx.say("reloading")
        }
    }
--- request
GET /t
--- response_body
reloading
--- wait: 2
--- error_log eval
[qr/master start id=2 n_prev=4 n_mine=0 n_next=nil/,
 qr/worker exit id=\d+ n_prev=nil n_mine=4 n_next=\d/,
 qr/worker exit id=\d+ n_prev=nil n_mine=1 n_next=\d/,
 qr/master exit id=1 n_prev=nil n_mine=0 n_next=\d/]
--- no_error_log
[error]
master exit id=1 n_prev=nil n_mine=0 n_next=nil



=== TEST 3: QUIT: each worker exit sees one fewer; the last one runs master exit with n_next nil
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block { ngx.sleep(0.5) ngx.say("ok") }
    }
--- request
GET /t
--- response_body
ok
--- shutdown_error_log eval
[qr/worker exit id=\d+ n_prev=nil n_mine=4 n_next=nil/,
 qr/worker exit id=\d+ n_prev=nil n_mine=3 n_next=nil/,
 qr/worker exit id=\d+ n_prev=nil n_mine=2 n_next=nil/,
 qr/worker exit id=\d+ n_prev=nil n_mine=1 n_next=nil/,
 qr/master exit id=1 n_prev=nil n_mine=0 n_next=nil/]



=== TEST 4: kill -9: the respawned worker's start sees n_mine = 5 and the dead pid is crashed at once
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block {
            ngx.sleep(0.5)
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            local victim
            for _, w in ipairs(require("resty.workerbus").status().workers) do
                if w.state == "running" and w.pid ~= ngx.worker.pid() then victim = w break end
            end
            ffi.C.kill(victim.pid, 9)
            ngx.sleep(0.3)
            for _, w in ipairs(require("resty.workerbus").status().workers) do
                if w.pid == victim.pid then ngx.say("dead pid: ", w.state) end
            end
        }
    }
--- request
GET /t
--- response_body
dead pid: crashed
--- error_log eval
qr/worker start id=\d+ n_prev=nil n_mine=5 n_next=nil/



=== TEST 5: SIGSTOP past "failed": the status marks the worker hung; SIGCONT: running again, both logged
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block {
            ngx.sleep(0.5)
            local wb = require "resty.workerbus"
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            local victim
            for _, w in ipairs(wb.status().workers) do
                if w.state == "running" and w.pid ~= ngx.worker.pid() then victim = w break end
            end
            local function state()
                for _, w in ipairs(wb.status().workers) do
                    if w.pid == victim.pid then return w.state end
                end
            end
            ffi.C.kill(victim.pid, 19)  -- SIGSTOP
            ngx.sleep(3)
            ngx.say("stopped: ", state())
            ffi.C.kill(victim.pid, 18)  -- SIGCONT
            ngx.sleep(1.5)
            ngx.say("continued: ", state())
        }
    }
--- request
GET /t
--- timeout: 8
--- response_body
stopped: hung
continued: running
--- error_log eval
[qr/workerbus: worker process \d+ \(slot \d, generation 1\) hung: no heartbeat for \d+ ms/,
 qr/workerbus: worker process \d+ \(slot \d, generation 1\) recovered: heartbeat resumed/]



=== TEST 6: calls in the wrong phase raise and say which phase is needed
--- main_config
    workerbus_zone wb 1m;
--- config
    location = /t {
        content_by_lua_block {
            local m = require "resty.worker.manager"
            local ok, err = pcall(m.on_init_by_lua, { shm = "wb" })
            ngx.say(err)
            ok, err = pcall(m.on_init_worker_by_lua, function() end)
            ngx.say(err)
        }
    }
--- request
GET /t
--- response_body
resty.worker.manager: on_init_by_lua must be called in init_by_lua, not in content
resty.worker.manager: on_init_worker_by_lua must be called in init_worker_by_lua, not in content



=== TEST 7: a second call, a missing first call, and bad options raise
--- main_config
    workerbus_zone wb 1m;
--- http_config
    lua_shared_dict errs 1m;
    init_by_lua_block {
        local m = require "resty.worker.manager"
        local errs = {}
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { interval = 10 }))
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { shm = "wb", failed = -1 }))
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { shm = "wb" }, "not a function"))
        m.on_init_by_lua({ shm = "wb" })
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { shm = "wb" }))
        package.loaded.init_errs = errs
    }
    init_worker_by_lua_block {
        local m = require "resty.worker.manager"
        m.on_init_worker_by_lua()
        local ok, err = pcall(m.on_init_worker_by_lua)
        ngx.shared.errs:set("worker", err)
    }
--- config
    location = /t {
        content_by_lua_block {
            for _, e in ipairs(package.loaded.init_errs) do ngx.say(e) end
            ngx.say(ngx.shared.errs:get("worker"))
        }
    }
--- request
GET /t
--- response_body
resty.worker.manager: opts.shm is required (a string)
resty.worker.manager: opts.failed must be a positive number
resty.worker.manager: master_start_cb must be a function, got string
resty.worker.manager: on_init_by_lua was already called
resty.worker.manager: on_init_worker_by_lua was already called
