# vim:set ft= ts=4 sw=4 et:
# The hot FFI paths are compiled by LuaJIT, as lua-resty-core's suites check
# theirs. Each path runs 300 times in a loop with jit.v logging to a file
# (traces flushed first, so everything is recorded anew under the log);
# the log must show a trace started by the loop or inside the path's files,
# and no aborted trace ("TRACE ---") and no "NYI" in those files. Four abort
# reasons are LuaJIT choosing how to trace, not code it cannot compile,
# and are allowed: "inner loop in root trace" and "leaving loop in
# root trace" (a function that got hot first meets a loop; the loop then
# gets its own trace), "loop unroll limit reached" (a side trace of the
# dispatch loop meets that loop again and LuaJIT declines to unroll it),
# and "persistent type instability" (a loop over a payload whose values
# differ in type, string.buffer's check of a table: LuaJIT gives up one
# loop trace for a side trace per type).
# Every test runs at the info level, as nginx's users log, and the loops
# carry no data that needs a C function to decode: a C function that
# LuaJIT cannot compile (ngx.log for the debug line, cjson.decode) has the
# traces around it stitched, and where the root trace starts varies from
# run to run (LuaJIT's hot counters are shared by bytecode addresses), so
# a chain of stitched traces sometimes ends in "NYI: return to lower
# frame" (1 run in 70 to 150 with two busy loops beside it).
# Nothing here depends on timing: the loops run inside one request,
# and the log is read once logging is off.

use Workerbus::TestCore 'no_plan';

workers(1);
log_level('info');
no_long_string();

our $Helpers = <<'_EOC_';
    init_by_lua_block {
        local J = {}
        local LOOP_ABORTS = { ["inner loop in root trace"] = true,
                              ["leaving loop in root trace"] = true,
                              ["loop unroll limit reached"] = true,
                              ["persistent type instability"] = true }
        local path

        -- Starts logging traces of whatever runs from now on.
        function J.start(name)
            path = ngx.config.prefix() .. "logs/jit-" .. name .. ".log"
            os.remove(path)
            jit.on()
            jit.flush()
            require("jit.v").on(path)
        end

        -- Stops logging; says whether a trace was recorded from the loop
        -- (its chunk) or in `files`, and each line that aborted or hit NYI
        -- in `files` (every line of the log when one is found).
        function J.check(files)
            require("jit.v").off()
            local f = assert(io.open(path))
            local log = f:read("*a")
            f:close()
            local function ours(line)
                for _, file in ipairs(files) do
                    if line:find(file, 1, true) then
                        return true
                    end
                end
                return false
            end
            local traced, bad = false, {}
            for line in log:gmatch("[^\n]+") do
                -- a side trace names its parent first: "[TRACE 2 (1/stitch) file:line ..."
                local start = line:match("^%[TRACE%s+%d+ %(%d+/[%w]+%) (%S+)")
                                or line:match("^%[TRACE%s+%d+ (%S+)")
                if start and (start:find("content_by_lua", 1, true) or ours(start)) then
                    traced = true
                end
                if ours(line) then
                    local reason = line:match("^%[TRACE %-%-%- .- %-%- (.-) at ")
                                   or line:match("^%[TRACE %-%-%- .- %-%- (.-)%]$")
                    if line:find("NYI", 1, true) or (reason and not LOOP_ABORTS[reason]) then
                        bad[#bad + 1] = line
                    end
                end
            end
            ngx.say("trace recorded: ", traced)
            ngx.say("aborts and NYI in ", table.concat(files, ", "), ": ", #bad)
            if #bad > 0 or not traced then
                ngx.log(ngx.ERR, "jit log:\n", log)
            end
        end
        -- After check: the traces of `files` stitched around a C function
        -- (ngx.log is one: a debug line built per event cuts the loop's
        -- trace); jit.v names it "C:<address>". LuaJIT's own functions
        -- that it does not compile (coroutine.running, once per poll) are
        -- named, and not counted.
        function J.stitched(files)
            local f = assert(io.open(path))
            local n = 0
            for line in f:read("*a"):gmatch("[^\n]+") do
                for _, file in ipairs(files) do
                    if line:find(file, 1, true) and line:find("stitch C:", 1, true) then
                        n = n + 1
                        ngx.log(ngx.ERR, "stitched: ", line)
                        break
                    end
                end
            end
            f:close()
            ngx.say("stitched traces in ", table.concat(files, ", "), ": ", n)
        end
        package.loaded.J = J
    }
_EOC_

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value("http_config", $Helpers . ($block->http_config // ""));
});

run_tests();

__DATA__

=== TEST 1: resty.worker.events post: the path to workerbus_ev_post is compiled
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local J = package.loaded.J
            J.start("post")
            local ok = 0
            for i = 1, 300 do
                if ev.post("jit", "e", "data") then
                    ok = ok + 1
                end
            end
            J.check { "worker/events.lua", "events_core.lua", "record.lua", "workerbus.lua" }
            ngx.say("posted: ", ok)
        }
    }
--- request
GET /t
--- response_body
trace recorded: true
aborts and NYI in worker/events.lua, events_core.lua, record.lua, workerbus.lua: 0
posted: 300
--- no_error_log
[error]



=== TEST 2: the poll and dispatch loop (ring read, decoding, both APIs' handler lists) is compiled
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local n = 0
            ev.register(function() n = n + 1 end, "jit")
            ev.register_weak(function() n = n + 1 end, "jit", "e")
            ev.poll()   -- what the workers posted at start
            for i = 1, 300 do
                assert(ev.post("jit", "e", i % 2 == 0 and "data" or { i = i }))
            end
            local J = package.loaded.J
            J.start("poll")
            ev.poll()   -- no yield since the posts: the 300 events wait for this worker
            J.check { "events_core.lua", "sinks.lua", "record.lua", "handlers.lua", "worker/events.lua" }
            ngx.say("handled: ", n)
        }
    }
--- request
GET /t
--- response_body
trace recorded: true
aborts and NYI in events_core.lua, sinks.lua, record.lua, handlers.lua, worker/events.lua: 0
handled: 600
--- no_error_log
[error]



=== TEST 5: error_log above debug: the dispatch loop builds no debug line, so no trace is stitched around ngx.log, and none is logged
--- log_level: info
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local n = 0
            ev.register(function() n = n + 1 end, "jit")
            ev.poll()
            for i = 1, 300 do
                assert(ev.post("jit", "e", "data"))
            end
            local J = package.loaded.J
            J.start("poll-info")
            ev.poll()
            J.check { "events_core.lua", "sinks.lua", "record.lua", "handlers.lua", "worker/events.lua" }
            J.stitched { "events_core.lua", "sinks.lua", "handlers.lua" }
            ngx.say("debug lines: ", require("resty.workerbus.debug_log")())
            ngx.say("handled: ", n)
        }
    }
--- request
GET /t
--- response_body
trace recorded: true
aborts and NYI in events_core.lua, sinks.lua, record.lua, handlers.lua, worker/events.lua: 0
stitched traces in events_core.lua, sinks.lua, handlers.lua: 0
debug lines: false
handled: 300
--- no_error_log
[error]



=== TEST 3: resty.events publish and its dispatch are compiled
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local events = require "resty.events"
        local ev = events.new { listening = "unix:/x.sock" }
        assert(ev:init_worker())
        package.loaded.t_ev = ev
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = package.loaded.t_ev
            local core = require "resty.workerbus.events_core"
            local n = 0
            ev:subscribe("jit", "*", function() n = n + 1 end)
            core.poll()
            local J = package.loaded.J
            J.start("events")
            for i = 1, 300 do
                assert(ev:publish("all", "jit", "e", "data"))
            end
            core.poll()
            J.check { "resty/events.lua", "events_core.lua", "sinks.lua", "record.lua", "handlers.lua" }
            ngx.say("handled: ", n)
        }
    }
--- request
GET /t
--- response_body
trace recorded: true
aborts and NYI in resty/events.lua, events_core.lua, sinks.lua, record.lua, handlers.lua: 0
handled: 300
--- no_error_log
[error]



=== TEST 4: resty.sync get_data: the read of the task's sequence word is compiled
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local s = assert(sync.new(3600, "ev"))
        local version = 1
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then
                return version
            end
            return { v = version }
        end, "t"))
        assert(s:start())   -- the one worker runs it here, at once
        package.loaded.t_sync = s
    }
--- config
    location = /t {
        content_by_lua_block {
            local s = package.loaded.t_sync
            local J = package.loaded.J
            J.start("sync")
            local same = 0
            local first = s:get_data("t")
            for i = 1, 300 do
                if s:get_data("t") == first then
                    same = same + 1
                end
            end
            J.check { "sync.lua", "sync_value.lua", "workerbus.lua" }
            ngx.say("same table: ", same)
        }
    }
--- request
GET /t
--- response_body
trace recorded: true
aborts and NYI in sync.lua, sync_value.lua, workerbus.lua: 0
same table: 300
--- no_error_log
[error]



=== TEST 6: resty.worker.events post of a table that cjson gives back unchanged: the check and string.buffer's encoding are compiled
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local record = require "resty.workerbus.record"
            local J = package.loaded.J
            J.start("post-table")
            local ok = 0
            for i = 1, 300 do
                local data = { target = "10.0.0.1:8080", healthy = i % 2 == 0, n = i, tags = { "a", "b" } }
                if ev.post("jit", "e", data) and record.json_exact(data) then
                    ok = ok + 1
                end
            end
            J.check { "worker/events.lua", "events_core.lua", "record.lua", "workerbus.lua" }
            ngx.say("posted by string.buffer: ", ok)
        }
    }
--- request
GET /t
--- response_body
trace recorded: true
aborts and NYI in worker/events.lua, events_core.lua, record.lua, workerbus.lua: 0
posted by string.buffer: 300
--- no_error_log
[error]
