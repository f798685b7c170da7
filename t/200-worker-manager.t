# vim:set ft= ts=4 sw=4 et:
# resty.worker.manager (the lua-resty-worker-manager API) driven by the
# module's lifecycle table: start, reload, stop, crash, hang, serialization,
# bad calls. Every callback logs "<kind> id=.. n_prev=.. n_mine=.. n_next=.."
# at notice.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();
# Multi-request blocks expect lines an earlier request (or a respawn
# between requests) logged.
check_accum_error_log();

# $Logger defines the callbacks; $Manager installs them ("failed" is 1 s, so
# that the hang test stays short).
# Each callback also leaves "<kind>:<id>" in the zone's small value store
# (not in init_by_lua, where it is not available), for the deadline waits of
# package.loaded.t_wait.
our $Logger = <<'_EOC_';
        local function logger(kind, pause)
            return function(id, n_prev, n_mine, n_next)
                ngx.log(ngx.NOTICE, kind, " id=", id, " n_prev=", tostring(n_prev),
                        " n_mine=", tostring(n_mine), " n_next=", tostring(n_next))
                if ngx.get_phase() ~= "init" then
                    assert(require("resty.workerbus").set(kind .. ":" .. tostring(id), tostring(n_mine)))
                end
            end
        end
        package.loaded.mgr_logger = logger
        package.loaded.t_wait = function(what, f)
            local deadline = ngx.now() + 10
            while not f() do
                if ngx.now() > deadline then error("timed out waiting for " .. what) end
                ngx.sleep(0.02)
            end
        end
        -- the running workers, once each has run its worker start
        package.loaded.t_started = function(n)
            local wb = require "resty.workerbus"
            local r
            package.loaded.t_wait(n .. " started workers", function()
                local st = wb.status()
                r = {}
                for _, w in ipairs(st.workers) do
                    if w.state == "running" and w.generation == st.current_generation
                       and wb.get("worker start:" .. w.generation .. "-" .. w.pid) then
                        r[#r + 1] = w
                    end
                end
                return #r == n
            end)
            return r
        end
_EOC_

our $Manager = <<_EOC_;
    init_by_lua_block {
$::Logger
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
        content_by_lua_block { package.loaded.t_started(4) ngx.say("ok") }
    }
--- request
GET /t
--- response_body
ok
--- grep_error_log eval: qr/(master|worker) start id=[\d-]+ n_prev=\w+ n_mine=\d+ n_next=\w+/
--- grep_error_log_out eval
qr/^master start id=1 n_prev=nil n_mine=0 n_next=nil
worker start id=\d+-\d+ n_prev=nil n_mine=1 n_next=nil
worker start id=\d+-\d+ n_prev=nil n_mine=2 n_next=nil
worker start id=\d+-\d+ n_prev=nil n_mine=3 n_next=nil
worker start id=\d+-\d+ n_prev=nil n_mine=4 n_next=nil
$/
--- no_error_log
[error]
[warn]



=== TEST 2: HUP: generation 2's master start sees the 4 old workers; old exits see n_next, count down, and end in master exit 1
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block {
            package.loaded.t_started(4)
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(require("ngx.process").get_master_pid(), 1)
            -- this old worker answers once the new ones started and the other old ones left
            local wb = require "resty.workerbus"
            package.loaded.t_wait("the reload", function()
                local new, gone = 0, 0
                for _, w in ipairs(wb.status().workers) do
                    if w.generation == 2 and w.state == "running" and wb.get("worker start:2-" .. w.pid) then
                        new = new + 1
                    end
                    if w.generation == 1 and w.state == "exited" then gone = gone + 1 end
                end
                return new == 4 and gone == 3 and ngx.worker.exiting()
            end)
            ngx.say("reloading")
        }
    }
--- request
GET /t
--- response_body
reloading
--- wait: 2
--- grep_error_log eval: qr/master (start|exit) id=\d+ n_prev=\w+ n_mine=\d+ n_next=\w+/
--- grep_error_log_out eval
qr/^master start id=1 n_prev=nil n_mine=0 n_next=nil
master start id=2 n_prev=4 n_mine=0 n_next=nil
master exit id=1 n_prev=nil n_mine=0 n_next=[0-4]
$/
--- error_log eval
[qr/worker exit id=\d+-\d+ n_prev=nil n_mine=4 n_next=\d/,
 qr/worker exit id=\d+-\d+ n_prev=nil n_mine=3 n_next=\d/,
 qr/worker exit id=\d+-\d+ n_prev=nil n_mine=2 n_next=\d/,
 qr/worker exit id=\d+-\d+ n_prev=nil n_mine=1 n_next=\d/,
 qr/worker start id=\d+-\d+ n_prev=\d n_mine=1 n_next=nil/,
 qr/worker start id=\d+-\d+ n_prev=\d n_mine=4 n_next=nil/]
--- no_error_log
[error]
running unserialized
--- shutdown_error_log eval
[qr/master exit id=2 n_prev=0 n_mine=0 n_next=nil/]



=== TEST 3: QUIT: each worker exit sees one fewer; the last one runs master exit with n_next nil
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block { package.loaded.t_started(4) ngx.say("ok") }
    }
--- request
GET /t
--- response_body
ok
--- shutdown_error_log eval
[qr/worker exit id=\d+-\d+ n_prev=nil n_mine=4 n_next=nil/,
 qr/worker exit id=\d+-\d+ n_prev=nil n_mine=3 n_next=nil/,
 qr/worker exit id=\d+-\d+ n_prev=nil n_mine=2 n_next=nil/,
 qr/worker exit id=\d+-\d+ n_prev=nil n_mine=1 n_next=nil/,
 qr/master exit id=1 n_prev=nil n_mine=0 n_next=nil/]
--- no_shutdown_error_log
[error]
running unserialized



=== TEST 4: kill -9: the respawn's start sees n_mine = 5, the dead pid is crashed at once, and the dead one does not stop the last exit from running master exit
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local victim
            for _, w in ipairs(package.loaded.t_started(4)) do
                if w.pid ~= ngx.worker.pid() then victim = w break end
            end
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(victim.pid, 9)
            local dead
            package.loaded.t_wait("the respawn's start", function()
                for _, w in ipairs(wb.status().workers) do
                    if w.pid == victim.pid then dead = w end
                end
                return dead.replaced_by and wb.get("worker start:1-" .. dead.replaced_by)
            end)
            ngx.say("dead pid: ", dead.state)
        }
    }
--- request
GET /t
--- response_body
dead pid: crashed
--- grep_error_log eval: qr/worker start id=\d+-\d+ n_prev=\w+ n_mine=\d+ n_next=\w+/
--- grep_error_log_out eval
qr/^(worker start id=\d+-\d+ n_prev=nil n_mine=[1-4] n_next=nil\n){4}worker start id=\d+-\d+ n_prev=nil n_mine=5 n_next=nil\n$/
--- shutdown_error_log eval
[qr/worker exit id=\d+-\d+ n_prev=nil n_mine=4 n_next=nil/,
 qr/worker exit id=\d+-\d+ n_prev=nil n_mine=1 n_next=nil/,
 qr/master exit id=1 n_prev=nil n_mine=0 n_next=nil/]



=== TEST 5: SIGSTOP past "failed": the status marks the worker hung; SIGCONT: running again, both logged
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            local victim
            for _, w in ipairs(package.loaded.t_started(4)) do
                if w.pid ~= ngx.worker.pid() then victim = w break end
            end
            local function state()
                for _, w in ipairs(wb.status().workers) do
                    if w.pid == victim.pid then return w.state end
                end
            end
            ffi.C.kill(victim.pid, 19)  -- SIGSTOP
            package.loaded.t_wait("hung", function() return state() == "hung" end)
            ngx.say("stopped: ", state())
            ffi.C.kill(victim.pid, 18)  -- SIGCONT
            package.loaded.t_wait("running again", function() return state() == "running" end)
            ngx.say("continued: ", state())
        }
    }
--- request
GET /t
--- timeout: 25
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



=== TEST 7: a second call and bad options raise
--- main_config
    workerbus_zone wb 1m;
--- http_config
    lua_shared_dict errs 1m;
    init_by_lua_block {
        local m = require "resty.worker.manager"
        local errs = {}
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { interval = 10 }))
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { shm = "wb", failed = -1 }))
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { shm = "wb", interval = "10" }))
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { shm = "wb" }, "not a function"))
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, "wb"))
        m.on_init_by_lua({ shm = "wb" })
        errs[#errs + 1] = select(2, pcall(m.on_init_by_lua, { shm = "wb" }))
        package.loaded.init_errs = errs
    }
    init_worker_by_lua_block {
        local m = require "resty.worker.manager"
        ngx.shared.errs:set("bad cb", select(2, pcall(m.on_init_worker_by_lua, 42)))
        m.on_init_worker_by_lua()
        local ok, err = pcall(m.on_init_worker_by_lua)
        ngx.shared.errs:set("twice", err)
    }
--- config
    location = /t {
        content_by_lua_block {
            for _, e in ipairs(package.loaded.init_errs) do ngx.say(e) end
            ngx.say(ngx.shared.errs:get("bad cb"))
            ngx.say(ngx.shared.errs:get("twice"))
        }
    }
--- request
GET /t
--- response_body
resty.worker.manager: opts.shm is required (a string)
resty.worker.manager: opts.failed must be a positive number
resty.worker.manager: opts.interval must be a positive number
resty.worker.manager: master_start_cb must be a function, got string
resty.worker.manager: opts must be a table, got string
resty.worker.manager: on_init_by_lua was already called
resty.worker.manager: start_cb must be a function, got number
resty.worker.manager: on_init_worker_by_lua was already called



=== TEST 8: on_init_worker_by_lua without on_init_by_lua first raises
--- main_config
    workerbus_zone wb 1m;
--- http_config
    lua_shared_dict errs 1m;
    init_worker_by_lua_block {
        local ok, err = pcall(require("resty.worker.manager").on_init_worker_by_lua)
        ngx.shared.errs:set("err", err)
    }
--- config
    location = /t {
        content_by_lua_block { ngx.say(ngx.shared.errs:get("err")) }
    }
--- request
GET /t
--- response_body
resty.worker.manager: on_init_by_lua must be called first, in init_by_lua



=== TEST 9: callbacks are serialized across the node: slow callbacks never overlap, at start nor at QUIT
--- main_config
    workerbus_zone wb 1m;
--- http_config
    lua_shared_dict inside 1m;
    init_by_lua_block {
        local function slow(kind)
            return function(id, n_prev, n_mine, n_next)
                local n = ngx.shared.inside:incr("n", 1, 0)
                if n ~= 1 then ngx.log(ngx.ERR, "overlap: ", kind, " sees ", n, " callbacks running") end
                local phase = ngx.get_phase()
                if phase == "init" or phase == "init_worker" then
                    -- no yielding there (as in the original): a busy wait
                    ngx.update_time()
                    local t0 = ngx.now()
                    repeat ngx.update_time() until ngx.now() - t0 >= 0.05
                else
                    ngx.sleep(0.05)
                end
                ngx.log(ngx.NOTICE, kind, " id=", id, " n_mine=", n_mine)
                ngx.shared.inside:incr("done " .. kind, 1, 0)
                ngx.shared.inside:incr("n", -1)
            end
        end
        package.loaded.slow = slow
        require("resty.worker.manager").on_init_by_lua({ shm = "wb" }, slow("master start"), slow("master exit"))
    }
    init_worker_by_lua_block {
        local slow = package.loaded.slow
        require("resty.worker.manager").on_init_worker_by_lua(slow("worker start"), slow("worker exit"))
    }
--- config
    location = /t {
        content_by_lua_block {
            -- until the four (serialized) worker starts are done
            require("wbtest").wait(function()
                return (ngx.shared.inside:get("done worker start") or 0) >= 4
            end, 2)
            ngx.say("ok")
        }
    }
--- request
GET /t
--- response_body
ok
--- grep_error_log eval: qr/(master|worker) start id=[\d-]+ n_mine=\d+/
--- grep_error_log_out eval
qr/^master start id=1 n_mine=0
worker start id=\d+-\d+ n_mine=1
worker start id=\d+-\d+ n_mine=2
worker start id=\d+-\d+ n_mine=3
worker start id=\d+-\d+ n_mine=4
$/
--- no_error_log
overlap
--- shutdown_error_log eval
[qr/worker exit id=\d+-\d+ n_mine=1/,
 qr/master exit id=1 n_mine=0/]
--- no_shutdown_error_log
overlap
[error]



=== TEST 10: QUIT during slow starts (each blocks its worker, serialized): a start always precedes its exit, master exit runs once, after the exits of every worker started by then
--- main_config
    workerbus_zone wb 1m;
--- http_config
    lua_shared_dict tally 1m;
    init_by_lua_block {
        local tally = ngx.shared.tally
        local started = false
        require("resty.worker.manager").on_init_by_lua({ shm = "wb" }, nil,
            function(id, n_prev, n_mine, n_next)
                ngx.log(ngx.NOTICE, "master exit id=", id, " n_mine=", n_mine, " n_next=", tostring(n_next),
                        " starts=", tally:get("starts"), " exits=", tally:get("exits"))
            end)
        package.loaded.cbs = {
            start = function(id, n_prev, n_mine)
                -- init_worker cannot yield: a busy wait
                ngx.update_time()
                local t0 = ngx.now()
                repeat ngx.update_time() until ngx.now() - t0 >= 0.3
                started = true
                tally:incr("starts", 1, 0)
                ngx.log(ngx.NOTICE, "worker start id=", id, " n_mine=", n_mine)
            end,
            exit = function(id, n_prev, n_mine)
                if not started then ngx.log(ngx.ERR, "exit before start in ", id) end
                tally:incr("exits", 1, 0)
                ngx.log(ngx.NOTICE, "worker exit id=", id, " n_mine=", n_mine)
            end,
        }
    }
    init_worker_by_lua_block {
        local cbs = package.loaded.cbs
        require("resty.worker.manager").on_init_worker_by_lua(cbs.start, cbs.exit)
    }
--- config
    location = /t {
        content_by_lua_block { ngx.say("ok") }
    }
--- request
GET /t
--- response_body
ok
--- shutdown_error_log eval
[qr/worker exit id=\d+-\d+ n_mine=1,/,
 qr/master exit id=1 n_mine=0 n_next=nil starts=([1-4]) exits=\1,/]
--- no_shutdown_error_log
[error]
running unserialized



=== TEST 11: the lock of a worker killed while holding it is taken over: the respawn's start runs at once
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::Manager
--- config
    location = /hold {
        content_by_lua_block {
            package.loaded.t_started(4)
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig); int workerbus_lc_lock(void);"
            ngx.say("locked: ", ffi.C.workerbus_lc_lock())
            ngx.eof()
            ngx.timer.at(0.1, function() ffi.C.kill(ngx.worker.pid(), 9) end)
        }
    }
    location = /after {
        content_by_lua_block {
            -- within 10 s: far less than the 30 s a live holder would be waited for
            local wb = require "resty.workerbus"
            package.loaded.t_wait("the respawn's start", function()
                for _, w in ipairs(wb.status().workers) do
                    if w.state == "running" and wb.get("worker start:1-" .. w.pid) == "5" then return true end
                end
            end)
            local T = require "wbtest"
            ngx.say("start logged: ", T.logged("worker start id=%d+%-%d+ n_prev=nil n_mine=5 n_next=nil"))
            ngx.say("crash logged: ", T.logged("workerbus: worker process %d+ %(slot %d, generation 1%) crashed"))
        }
    }
--- request eval
["GET /hold", "GET /after"]
--- timeout: 15
--- response_body eval
["locked: 1\n", "start logged: true\ncrash logged: true\n"]
--- no_error_log
running unserialized



=== TEST 12: master start runs in the master during init_by_lua (workers inherit what it sets), worker start before on_init_worker_by_lua returns, ids as the original's
--- main_config
    workerbus_zone wb 1m;
--- http_config
    init_by_lua_block {
        package.loaded.t_state = "unset"
        require("resty.worker.manager").on_init_by_lua({ shm = "wb" },
            function(id, n_prev, n_mine, n_next)
                package.loaded.t_state = "set by master start " .. id .. " in " .. ngx.get_phase()
                -- the process type, not the pid: with `daemon on` (the real
                -- runner's default) nginx forks after init_by_lua
                package.loaded.t_master_type = require("ngx.process").type()
            end)
    }
    init_worker_by_lua_block {
        local started_id
        require("resty.worker.manager").on_init_worker_by_lua(function(id) started_id = id end)
        package.loaded.t_started_before_return = started_id
    }
--- config
    location = /t {
        content_by_lua_block {
            ngx.say(package.loaded.t_state)
            ngx.say("ran in the master: ", package.loaded.t_master_type == "master")
            local id = package.loaded.t_started_before_return
            ngx.say("worker start ran before return, id: ", id == "1-" .. ngx.worker.pid())
        }
    }
--- request
GET /t
--- response_body
set by master start 1 in init
ran in the master: true
worker start ran before return, id: true
--- no_error_log
[error]
