# vim:set ft= ts=4 sw=4 et:
# resty.events.compat (the worker-events face lua-resty-events ships, which
# Kong and lua-resty-healthcheck load) on the workerbus ring: broadcast and
# local posting, unique events, register/unregister at three levels,
# event_list, bad options, the broker socket's run(), the module layout, and
# a small health checker in lua-resty-healthcheck's style across 4 workers.
#
# Every wait is a deadline loop on an observable (wait_for below), never a
# fixed sleep.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();

our $Helpers = <<'_EOC_';
    lua_shared_dict got 1m;
    init_by_lua_block {
        -- wait_for(f, seconds): true once f() is true, false at the deadline.
        function _G.wait_for(f, secs)
            local deadline = ngx.now() + (secs or 10)
            while true do
                if f() then
                    return true
                end
                ngx.update_time()
                if ngx.now() > deadline then
                    return false
                end
                ngx.sleep(0.005)
            end
        end
        -- The 4 workers have configured their events (each one counts itself).
        function _G.all_ready()
            return wait_for(function() return (ngx.shared.got:get("ready") or 0) >= 4 end)
        end
    }
_EOC_

our $Configure = <<'_EOC_';
    init_worker_by_lua_block {
        local we = require "resty.events.compat"
        assert(we.configure {
            unique_timeout = 5, broker_id = 0,
            listening = "unix:$TEST_NGINX_HTML_DIR/worker_events.sock",
        })
        assert(we.configured())
        ngx.shared.got:incr("ready", 1, 0)
    }
    server {
        listen unix:$TEST_NGINX_HTML_DIR/worker_events.sock;
        access_log off;
        location / {
            content_by_lua_block {
                require("resty.events.compat").run()
            }
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: post reaches every worker's handler once with data, event, source and the poster's worker id; "done"; _VERSION as the original
--- http_config eval
$::Helpers . q{
    init_worker_by_lua_block {
        local we = require "resty.events.compat"
        we.register(function(data, event, source, wid)
            local d = ngx.shared.got
            d:incr("n" .. ngx.worker.id(), 1, 0)
            d:set("args" .. ngx.worker.id(), require("cjson").encode {
                data = data, event = event, source = source, wid = wid })
        end, "t")
        assert(we.configure { listening = "unix:/nonexistent/events.sock" })
        ngx.shared.got:incr("ready", 1, 0)
    }
}
--- config
    location = /t {
        content_by_lua_block {
            local we = require "resty.events.compat"
            assert(all_ready())
            ngx.say("version: ", we._VERSION, ", configured: ", we.configured())
            ngx.say("post: ", we.post("t", "hello", { a = 1, list = { "x", "y" } }))
            local d = ngx.shared.got
            assert(wait_for(function()
                for w = 0, 3 do
                    if not d:get("n" .. w) then return false end
                end
                return true
            end))
            local cjson = require "cjson"
            for w = 0, 3 do
                local a = cjson.decode(d:get("args" .. w))
                ngx.say("worker ", w, ": ", d:get("n" .. w), " call, ",
                        a.source, "/", a.event, " a=", a.data.a, " list=",
                        table.concat(a.data.list, ","), " from the poster: ",
                        a.wid == ngx.worker.id())
            end
        }
    }
--- request
GET /t
--- response_body
version: 0.3.1, configured: true
post: done
worker 0: 1 call, t/hello a=1 list=x,y from the poster: true
worker 1: 1 call, t/hello a=1 list=x,y from the poster: true
worker 2: 1 call, t/hello a=1 list=x,y from the poster: true
worker 3: 1 call, t/hello a=1 list=x,y from the poster: true
--- grep_error_log eval: qr/event published to \d+ workers/
--- grep_error_log_out
event published to 4 workers
--- no_error_log
[error]
[warn]



=== TEST 2: post_local reaches this worker only, data as is, wid nil; poll() delivers what waits before it returns "done"
--- http_config eval
$::Helpers . $::Configure
--- config
    location = /t {
        content_by_lua_block {
            local we = require "resty.events.compat"
            assert(all_ready())
            local seen = {}
            local function h(data, event, source, wid)
                seen[#seen + 1] = source .. "/" .. event .. " same table: "
                                  .. tostring(data == package.loaded.t_data)
                                  .. " wid: " .. tostring(wid)
            end
            we.register(h, "loc")
            package.loaded.t_data = { 1, 2 }
            ngx.say("post_local: ", we.post_local("loc", "e", package.loaded.t_data))
            ngx.say("before poll: ", #seen)
            ngx.say("poll: ", we.poll())
            ngx.say(table.concat(seen, "\n"))
            ngx.say("poll again: ", we.poll(), ", calls: ", #seen)
            we.unregister(h)
        }
    }
--- request
GET /t
--- response_body
post_local: done
before poll: 0
poll: done
loc/e same table: true wid: nil
poll again: done, calls: 1
--- no_error_log
[error]



=== TEST 3: a unique event posted by every worker is handled by exactly one worker; the duplicates are logged as the original logs them
--- http_config eval
$::Helpers . q{
    init_worker_by_lua_block {
        local we = require "resty.events.compat"
        assert(we.configure { listening = "unix:/x.sock", unique_timeout = 30 })
        we.register(function(data)
            ngx.shared.got:incr("handled", 1, 0)
            ngx.shared.got:set("by", ngx.worker.id())
        end, "u", "refresh")
        ngx.shared.got:incr("ready", 1, 0)
        -- every worker posts the same unique event once it is running
        ngx.timer.at(0, function()
            assert(we.post("u", "refresh", "x", "cache-key") == "done")
            ngx.shared.got:incr("posted", 1, 0)
        end)
    }
}
--- config
    location = /t {
        content_by_lua_block {
            local d = ngx.shared.got
            assert(all_ready())
            assert(wait_for(function() return d:get("posted") == 4 end))
            -- the first reader of each record logs it when it is a duplicate
            local function duplicates()
                local f = assert(io.open(ngx.config.prefix() .. "logs/error.log"))
                local n = 0
                for line in f:lines() do
                    if line:find("unique event is duplicate on worker #", 1, true) then n = n + 1 end
                end
                f:close()
                return n
            end
            assert(wait_for(function() return duplicates() == 3 end))
            ngx.say("handled: ", d:get("handled"), " time(s), by one of the 4 workers: ",
                    d:get("by") >= 0 and d:get("by") <= 3)
        }
    }
--- request
GET /t
--- response_body
handled: 1 time(s), by one of the 4 workers: true
--- grep_error_log eval: qr/unique event is duplicate on worker #\d: cache-key/
--- grep_error_log_out eval
qr/^(unique event is duplicate on worker #\d: cache-key\n){3}$/
--- no_error_log
[error]



=== TEST 4: register and unregister at the three levels: all sources, one source, some events of a source
--- http_config eval
$::Helpers . $::Configure
--- config
    location = /t {
        content_by_lua_block {
            local we = require "resty.events.compat"
            assert(all_ready())
            local got = {}
            local function rec(name)
                return function(_, event, source) got[#got + 1] = name .. "<" .. source .. "/" .. event end
            end
            local all, src, evs = rec("all"), rec("src"), rec("evs")
            we.register(all)
            we.register(src, "s1")
            we.register(evs, "s1", "e1", "e2")
            local function round(label)
                got = {}
                we.post_local("s1", "e1")
                we.post_local("s1", "e2")
                we.post_local("s1", "e3")
                we.post_local("s2", "e1")
                we.poll()
                ngx.say(label, ": ", table.concat(got, " "))
            end
            round("registered")
            ngx.say("unregister evs from s1/e1: ", we.unregister(evs, "s1", "e1"))
            round("evs on e2 only")
            ngx.say("unregister src from s2: ", we.unregister(src, "s2"))
            ngx.say("unregister src: ", we.unregister(src))
            round("src gone")
            ngx.say("unregister all, evs: ", we.unregister(all), " ", we.unregister(evs))
            round("none left")
            ngx.say("unregister again: ", we.unregister(all))
            local ok, err = pcall(we.register, "nope", "s1")
            ngx.say("not a function: ", ok, " ", (tostring(err):gsub("^.-:%d+: ", "")))
        }
    }
--- request
GET /t
--- response_body
registered: all<s1/e1 src<s1/e1 evs<s1/e1 all<s1/e2 src<s1/e2 evs<s1/e2 all<s1/e3 src<s1/e3 all<s2/e1
unregister evs from s1/e1: true
evs on e2 only: all<s1/e1 src<s1/e1 all<s1/e2 src<s1/e2 evs<s1/e2 all<s1/e3 src<s1/e3 all<s2/e1
unregister src from s2: false
unregister src: true
src gone: all<s1/e1 all<s1/e2 evs<s1/e2 all<s1/e3 all<s2/e1
unregister all, evs: true true
none left: 
unregister again: false
not a function: false expected function, got: string
--- no_error_log
[error]



=== TEST 5: register_weak works as register (the original keeps a strong reference); handlers of ring events get the poster's wid
--- http_config eval
$::Helpers . $::Configure
--- config
    location = /t {
        content_by_lua_block {
            local we = require "resty.events.compat"
            assert(all_ready())
            local got = {}
            we.register_weak(function(data, event, source, wid)
                got[#got + 1] = source .. "/" .. event .. "=" .. data .. " wid ok: " .. tostring(wid == ngx.worker.id())
            end, "w")
            collectgarbage()
            collectgarbage()
            ngx.say(we.post("w", "e", "d"))
            ngx.say(we.poll())
            ngx.say(table.concat(got, ", "))
        }
    }
--- request
GET /t
--- response_body
done
done
w/e=d wid ok: true
--- no_error_log
[error]



=== TEST 6: event_list: names as fields, _source, and an unknown event raises
--- http_config eval
$::Helpers . $::Configure
--- config
    location = /t {
        content_by_lua_block {
            local we = require "resty.events.compat"
            local list = we.event_list("my-source", "started", "stopped")
            ngx.say(list._source, " ", list.started, " ", list.stopped)
            local ok, err = pcall(function() return list.typo end)
            ngx.say(ok, " ", (tostring(err):gsub("^.-:%d+: ", "")))
        }
    }
--- request
GET /t
--- response_body
my-source started stopped
false event 'typo' is an unknown event
--- no_error_log
[error]



=== TEST 7: configure checks every option as lua-resty-events does, non-finite and fractional numbers too, and raises with its words
--- http_config eval
$::Helpers
--- config
    location = /t {
        content_by_lua_block {
            local we = require "resty.events.compat"
            local L = "unix:/tmp/x.sock"
            local cases = {
                "nil",
                { broker_id = "x", listening = L }, { broker_id = -1, listening = L },
                { broker_id = 4, listening = L }, { broker_id = 0.5, listening = L },
                { broker_id = 0/0, listening = L }, { broker_id = math.huge, listening = L },
                {}, { listening = false }, { listening = 1 }, { listening = "/tmp/x.sock" },
                { listening = L, unique_timeout = "1" }, { listening = L, unique_timeout = 0 },
                { listening = L, unique_timeout = -1 }, { listening = L, unique_timeout = 0/0 },
                { listening = L, unique_timeout = math.huge },
                { listening = L, max_queue_len = "1" }, { listening = L, max_queue_len = 0 },
                { listening = L, max_queue_len = 0/0 }, { listening = L, max_queue_len = math.huge },
                { listening = L, max_payload_len = "1" }, { listening = L, max_payload_len = 0 },
                { listening = L, max_payload_len = 16 * 1024 * 1024 + 1 },
                { listening = L, max_payload_len = 0/0 },
                { listening = L, enable_privileged_agent = 1 },
                { listening = L, testing = "yes" }, { listening = L, zone = 1 },
            }
            for _, opts in ipairs(cases) do
                local ok, err = pcall(we.configure, opts ~= "nil" and opts or nil)
                ngx.say(ok, " ", (tostring(err):gsub("^.-:%d+: ", "")))
            end
            ngx.say("configured after all that: ", we.configured())
            ngx.say("valid: ", we.configure { listening = L, broker_id = 3, unique_timeout = 0.5,
                                              max_queue_len = 1, max_payload_len = 16 * 1024 * 1024,
                                              enable_privileged_agent = false })
        }
    }
--- request
GET /t
--- response_body
false Expected a table, got nil
false "broker_id" option must be a number
false "broker_id" option is invalid
false "broker_id" option is invalid
false "broker_id" option is invalid
false "broker_id" option is invalid
false "broker_id" option is invalid
false "listening" option required to start
false "listening" option required to start
false "listening" option must be a string
false "listening" option must start with unix:
false optional "unique_timeout" option must be a number
false "unique_timeout" must be greater than 0
false "unique_timeout" must be greater than 0
false "unique_timeout" must be greater than 0
false "unique_timeout" must be at most 2147483647
false "max_queue_len" option must be a number
false "max_queue_len" option is invalid
false "max_queue_len" option is invalid
false "max_queue_len" option is invalid
false "max_payload_len" option must be a number
false "max_payload_len" option is invalid
false "max_payload_len" option is invalid
false "max_payload_len" option is invalid
false "enable_privileged_agent" option must be a boolean
false "testing" option must be a boolean
false "zone" option must be a string
configured after all that: false
valid: true
--- no_error_log
[error]



=== TEST 8: max_payload_len given to configure is honoured: post returns nil and the original's error
--- http_config eval
$::Helpers . q{
    init_worker_by_lua_block {
        assert(require("resty.events.compat").configure {
            listening = "unix:/x.sock", max_payload_len = 100 })
    }
}
--- config
    location = /t {
        content_by_lua_block {
            local we = require "resty.events.compat"
            ngx.say(we.post("s", "e", string.rep("x", 101)))
            ngx.say(we.post("s", "e", string.rep("x", 68)))  -- a 100-byte frame (t/106)
            ngx.say(we.post("s", "e", string.rep("x", 101), "unique-key"))
        }
    }
--- request
GET /t
--- response_body
nilfailed to publish event: payload exceeds the limitation (100)
done
nilfailed to publish event: payload exceeds the limitation (100)
--- no_error_log
[error]



=== TEST 9: the broker socket's run() answers at once and closes: no keepalive, nothing read, no connection left open, events unaffected
--- http_config eval
$::Helpers . q{
    init_worker_by_lua_block {
        local we = require "resty.events.compat"
        assert(we.configure { listening = "unix:$TEST_NGINX_HTML_DIR/worker_events.sock" })
        we.register(function() ngx.shared.got:incr("pings", 1, 0) end, "t", "ping")
        ngx.shared.got:incr("ready", 1, 0)
    }
    server {
        listen unix:$TEST_NGINX_HTML_DIR/worker_events.sock;
        location / {
            content_by_lua_block { require("resty.events.compat").run() }
        }
    }
}
--- config
    location = /status { stub_status; }
    location = /t {
        content_by_lua_block {
            local we = require "resty.events.compat"
            assert(all_ready())
            ngx.timer.at(0, function() ngx.shared.got:set("run", tostring(we.run())) end)
            assert(wait_for(function() return ngx.shared.got:get("run") end))
            ngx.say("run outside a request: ", ngx.shared.got:get("run"))
            local function active()
                local r = ngx.location.capture("/status")
                return tonumber(r.body:match("Active connections: (%d+)"))
            end
            local base = active()
            local socks = {}
            for i = 1, 20 do
                local sock = ngx.socket.tcp()
                sock:settimeout(5000)
                assert(sock:connect("unix:$TEST_NGINX_HTML_DIR/worker_events.sock"))
                -- what lua-resty-events' worker sends: an upgrade it expects to keep
                assert(sock:send("GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                                 .. "Upgrade: Kong-Worker-Events/1\r\n\r\n"))
                socks[i] = sock
            end
            local first, closed = nil, 0
            for i = 1, 20 do
                local sock = socks[i]
                local status = sock:receive("*l")
                first = first or status
                local rest, err, partial = sock:receive("*a")
                if rest or err == "closed" then closed = closed + 1 end
                if i == 1 then
                    ngx.say("answer: ", first)
                    ngx.say("connection: ", (rest or partial):match("[Cc]onnection: (%w+)"))
                    ngx.say("body: ", (rest or partial):match("\r\n\r\n(.-)\n?$"))
                end
                sock:close()
            end
            ngx.say("closed by the server: ", closed, " of 20")
            -- a request with a body nobody reads, and a body that never ends
            for _, req in ipairs {
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nhel",
            } do
                local sock = ngx.socket.tcp()
                sock:settimeout(5000)
                assert(sock:connect("unix:$TEST_NGINX_HTML_DIR/worker_events.sock"))
                assert(sock:send(req))
                local status = sock:receive("*l")
                local _, err = sock:receive("*a")
                ngx.say("with a body: ", status, ", then ", err or "closed")
                sock:close()
            end
            -- a client that connects and sends nothing holds nothing of ours either
            local idle = ngx.socket.tcp()
            assert(idle:connect("unix:$TEST_NGINX_HTML_DIR/worker_events.sock"))
            idle:close()
            ngx.say("back to the base count: ", wait_for(function() return active() == base end))
            assert(we.post("t", "ping"))
            ngx.say("events still flow: ",
                    wait_for(function() return ngx.shared.got:get("pings") == 4 end))
        }
    }
--- request
GET /t
--- response_body
run outside a request: true
answer: HTTP/1.1 200 OK
connection: close
body: no event broker here: workerbus carries events in shared memory
closed by the server: 20 of 20
with a body: HTTP/1.1 200 OK, then closed
with a body: HTTP/1.1 200 OK, then closed
back to the base count: true
events still flow: true
--- no_error_log
[error]
[warn]



=== TEST 10: a health checker in lua-resty-healthcheck's style: one worker probes, posts a status change, every worker's view flips
--- http_config eval
$::Helpers . q{
    lua_shared_dict hc 1m;
    server {
        listen unix:$TEST_NGINX_HTML_DIR/upstream.sock;
        location = /health {
            content_by_lua_block {
                ngx.exit(ngx.shared.hc:get("upstream_down") and 503 or 200)
            }
        }
    }
    init_worker_by_lua_block {
        local we = require "resty.events.compat"
        assert(we.configure { listening = "unix:$TEST_NGINX_HTML_DIR/worker_events.sock" })

        -- checker: one per worker, as lua-resty-healthcheck makes one
        local SOURCE = "lua-resty-healthcheck [t]"
        local events = we.event_list(SOURCE, "healthy", "unhealthy")
        local target = "unix:$TEST_NGINX_HTML_DIR/upstream.sock"
        local view = { [target] = "healthy" }   -- this worker's view
        local me = ngx.worker.id()
        local shm = ngx.shared.hc

        local function on_event(data, event)
            view[data.target] = event
            shm:set("view:" .. me, event)
            shm:incr("flips:" .. me, 1, 0)
        end
        we.register_weak(on_event, SOURCE)
        shm:set("view:" .. me, view[target])

        local function probe()
            local sock = ngx.socket.tcp()
            sock:settimeout(1000)
            local ok = sock:connect(target)
            if not ok then return "unhealthy" end
            sock:send("GET /health HTTP/1.0\r\nHost: t\r\n\r\n")
            local line = sock:receive("*l")
            sock:close()
            return line and line:match("^HTTP/1%.%d 200") and "healthy" or "unhealthy"
        end

        -- the lock of lua-resty-healthcheck: one worker holds the probing
        local function check(premature)
            if premature then return end
            if shm:add("lock", me, 5) or shm:get("lock") == me then
                shm:set("lock", me, 5)
                shm:incr("probes:" .. me, 1, 0)
                local status = probe()
                if status ~= (shm:get("status") or "healthy") then
                    shm:set("status", status)
                    assert(we.post(SOURCE, events[status], { target = target }) == "done")
                end
            end
            ngx.timer.at(0.02, check)
        end
        ngx.timer.at(0, check)
        shm:incr("ready", 1, 0)
    }
}
--- config
    location = /t {
        content_by_lua_block {
            local shm = ngx.shared.hc
            assert(wait_for(function() return (shm:get("ready") or 0) >= 4 end))
            local function views()
                local v = {}
                for w = 0, 3 do v[#v + 1] = shm:get("view:" .. w) end
                return table.concat(v, " ")
            end
            ngx.say("start: ", views())
            shm:set("upstream_down", true)
            ngx.say("down seen by all: ", wait_for(function()
                return views() == "unhealthy unhealthy unhealthy unhealthy" end))
            shm:delete("upstream_down")
            ngx.say("up seen by all: ", wait_for(function()
                return views() == "healthy healthy healthy healthy" end))
            local probers, flips = 0, {}
            for w = 0, 3 do
                if shm:get("probes:" .. w) then probers = probers + 1 end
                flips[#flips + 1] = shm:get("flips:" .. w)
            end
            ngx.say("workers that probed: ", probers)
            ngx.say("flips per worker: ", table.concat(flips, " "))
        }
    }
--- request
GET /t
--- response_body
start: healthy healthy healthy healthy
down seen by all: true
up seen by all: true
workers that probed: 1
flips per worker: 2 2 2 2
--- no_error_log
[error]



=== TEST 11: module layout: with only lua-resty-events' "?/init.lua" pattern, resty.events and resty.events.compat load from this tree and work
--- http_config eval
q{
    init_by_lua_block {
        -- keep the system's entries, replace this tree's "?.lua" by "?/init.lua"
        local lib = ("$TEST_NGINX_LUA_PATH"):match("^(.-)/%?%.lua")
        local kept = {}
        for entry in package.path:gmatch("[^;]+") do
            if entry:sub(1, #lib) ~= lib then kept[#kept + 1] = entry end
        end
        package.path = lib .. "/?/init.lua;" .. table.concat(kept, ";")
        package.loaded.t_lib = lib
        package.loaded.t_path_before = package.path
    }
    init_worker_by_lua_block {
        local we = require "resty.events.compat"
        assert(we.configure { listening = "unix:/x.sock" })
    }
}
--- config
    location = /t {
        content_by_lua_block {
            local lib = package.loaded.t_lib
            ngx.say("no ?.lua of this tree at first: ",
                    not package.loaded.t_path_before:find(lib .. "/?.lua", 1, true))
            local function from(name, fn)
                local src = debug.getinfo(package.loaded[name][fn], "S").source
                return src:sub(2, #lib + 1) == lib and src:sub(#lib + 2) or src
            end
            local events = require "resty.events"
            local compat = require "resty.events.compat"
            ngx.say("resty.events from ", from("resty.events", "new"))
            ngx.say("resty.events.compat from ", from("resty.events.compat", "configure"))
            ngx.say("its core from ", from("resty.workerbus.events_core", "poll"))
            ngx.say("same module: ", compat._VERSION == events._VERSION)
            local got
            compat.register(function(data) got = data end, "s")
            compat.post("s", "e", "it works")
            compat.poll()
            ngx.say(got)
        }
    }
--- request
GET /t
--- response_body
no ?.lua of this tree at first: true
resty.events from /resty/events.lua
resty.events.compat from /resty/events/compat.lua
its core from /resty/workerbus/events_core.lua
same module: true
it works
--- no_error_log
[error]
