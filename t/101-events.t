# vim:set ft= ts=4 sw=4 et:
# resty.events (the lua-resty-events API) on the workerbus event ring: no
# broker; publish to all, current or one worker; subscribe / unsubscribe;
# options; both event APIs in one worker.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();
run_tests();

__DATA__

=== TEST 1: publish "all" reaches every worker's subscriber once, with data, event, source and the poster's worker id
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_by_lua_block {
        _G.ev = require("resty.events").new { listening = "unix:$TEST_NGINX_HTML_DIR/events.sock" }
    }
    init_worker_by_lua_block {
        local ev = _G.ev
        ev:subscribe("t", "*", function(data, event, source, wid)
            local d = ngx.shared.got
            d:incr("n" .. ngx.worker.id(), 1, 0)
            d:set("args" .. ngx.worker.id(), require("cjson").encode {
                data = data, event = event, source = source, wid = wid })
        end)
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            local wait_for = require("wbtest").wait
            ngx.say("publish: ", _G.ev:publish("all", "t", "hello", { a = 1, list = { "x", "y" } }))
            wait_for(function()
                for w = 0, 3 do
                    if not ngx.shared.got:get("args" .. w) then return false end
                end
                return true
            end)
            local cjson = require "cjson"
            for w = 0, 3 do
                local a = cjson.decode(ngx.shared.got:get("args" .. w))
                ngx.say("worker ", w, ": ", ngx.shared.got:get("n" .. w), " call, ",
                        a.source, "/", a.event, " a=", a.data.a, " list=",
                        table.concat(a.data.list, ","), " from the poster: ",
                        a.wid == ngx.worker.id())
            end
        }
    }
--- request
GET /t
--- response_body
publish: true
worker 0: 1 call, t/hello a=1 list=x,y from the poster: true
worker 1: 1 call, t/hello a=1 list=x,y from the poster: true
worker 2: 1 call, t/hello a=1 list=x,y from the poster: true
worker 3: 1 call, t/hello a=1 list=x,y from the poster: true
--- no_error_log
[error]
[warn]



=== TEST 2: subscribe matches "*"/"*", source/"*", source/event and "*"/event; unsubscribe stops a callback
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock" }
        package.loaded.t_ev = ev
        local got = {}
        package.loaded.t_got = got
        local function rec(name)
            return function(_, event, source)
                got[#got + 1] = name .. "<" .. source .. "/" .. event
            end
        end
        package.loaded.t_ids = {
            any = ev:subscribe("*", "*", rec("any")),
            src = ev:subscribe("s1", "*", rec("src")),
            one = ev:subscribe("s1", "e1", rec("one")),
            evt = ev:subscribe("*", "e1", rec("evt")),
        }
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev, got, ids = package.loaded.t_ev, package.loaded.t_got, package.loaded.t_ids
            local wait_for = require("wbtest").wait
            local function round(expect)
                for k in pairs(got) do got[k] = nil end
                for _, e in ipairs { { "s1", "e1" }, { "s1", "e2" }, { "s2", "e1" } } do
                    assert(ev:publish("current", e[1], e[2]))
                end
                wait_for(function() return #got >= expect end)
                ngx.say(table.concat(got, " "))
            end
            ngx.say("ids: ", ids.any, " ", ids.src, " ", ids.one, " ", ids.evt)
            round(8)
            ngx.say("unsubscribe: ", ev:unsubscribe(ids.any), " ", ev:unsubscribe(ids.one))
            round(4)
        }
    }
--- request
GET /t
--- response_body
ids: 1 2 3 4
any<s1/e1 evt<s1/e1 src<s1/e1 one<s1/e1 any<s1/e2 src<s1/e2 any<s2/e1 evt<s2/e1
unsubscribe: true true
evt<s1/e1 src<s1/e1 src<s1/e2 evt<s2/e1
--- no_error_log
[error]



=== TEST 3: publish "current": this worker only, asynchronously, data as is, wid nil
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock" }
        package.loaded.t_ev = ev
        local seen = {}
        package.loaded.t_seen = seen
        ev:subscribe("t", "*", function(data, event, source, wid)
            seen[#seen + 1] = { data = data, wid = wid }
            ngx.shared.got:incr("workers", 1, 0)
        end)
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev, seen = package.loaded.t_ev, package.loaded.t_seen
            local payload = { f = print }   -- could not be serialized
            ngx.say("publish: ", ev:publish("current", "t", "local", payload))
            ngx.say("handled at once: ", #seen)
            local wait_for = require("wbtest").wait
            wait_for(function() return #seen >= 1 end)
            ngx.say("handled: ", #seen, ", same table: ", seen[1].data == payload,
                    ", wid: ", tostring(seen[1].wid))
            ngx.say("workers that saw it: ", ngx.shared.got:get("workers"))
        }
    }
--- request
GET /t
--- response_body
publish: true
handled at once: 0
handled: 1, same table: true, wid: nil
workers that saw it: 1
--- no_error_log
[error]



=== TEST 4: a unique target is handled by exactly one worker, even when every worker publishes it
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock", unique_timeout = 2 }
        ev:subscribe("cache", "refresh", function(data)
            ngx.shared.got:incr(data, 1, 0)
        end)
        assert(ev:init_worker())
        assert(ev:publish("refresh-key-a", "cache", "refresh", "key-a"))
        if ngx.worker.id() == 0 then
            assert(ev:publish("refresh-key-b", "cache", "refresh", "key-b"))
        end
    }
--- config
    location = /t {
        content_by_lua_block {
            local wait_for = require("wbtest").wait
            wait_for(function()
                return ngx.shared.got:get("key-a") and ngx.shared.got:get("key-b")
            end)
            for _, k in ipairs { "key-a", "key-b" } do
                ngx.say(k, " handled ", ngx.shared.got:get(k), " time(s)")
            end
        }
    }
--- request
GET /t
--- response_body
key-a handled 1 time(s)
key-b handled 1 time(s)
--- no_error_log
[error]



=== TEST 5: the broker server of an existing config still loads; run() answers its client and returns
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_by_lua_block {
        _G.ev = require("resty.events").new {
            listening = "unix:$TEST_NGINX_HTML_DIR/events.sock", broker_id = 1 }
    }
    init_worker_by_lua_block {
        _G.ev:subscribe("t", "ping", function() ngx.shared.got:incr("n", 1, 0) end)
        assert(_G.ev:init_worker())
    }
    server {
        listen unix:$TEST_NGINX_HTML_DIR/events.sock;
        location / {
            content_by_lua_block {
                require("resty.events").run()
            }
        }
    }
--- config
    location = /t {
        content_by_lua_block {
            -- outside the broker location (here a timer) run() only returns
            ngx.timer.at(0, function()
                ngx.shared.got:set("run", tostring(require("resty.events").run()) .. " " .. tostring(_G.ev:run()))
            end)
            local wait = require("wbtest").wait
            wait(function() return ngx.shared.got:get("run") end)
            ngx.say("run: ", ngx.shared.got:get("run"))
            local sock = ngx.socket.tcp()
            assert(sock:connect("unix:$TEST_NGINX_HTML_DIR/events.sock"))
            assert(sock:send("GET / HTTP/1.0\r\nHost: x\r\n\r\n"))
            local status = sock:receive("*l")
            sock:close()
            ngx.say("broker location answers: ", status)
            assert(_G.ev:publish("all", "t", "ping"))
            wait(function() return ngx.shared.got:get("n") == 4 end)
            ngx.say("handled by ", ngx.shared.got:get("n"), " workers")
        }
    }
--- request
GET /t
--- response_body
run: true true
broker location answers: HTTP/1.1 200 OK
handled by 4 workers
--- no_error_log
[error]



=== TEST 6: is_ready is false before and during init_worker, and true once the worker's poller has run
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock" }
        local before = ev:is_ready()
        assert(ev:init_worker())
        package.loaded.t_ev = ev
        package.loaded.t_ready = { before, ev:is_ready() }
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = package.loaded.t_ev
            local deadline = ngx.now() + 10
            while not ev:is_ready() and ngx.now() < deadline do
                ngx.sleep(0.005)
                ngx.update_time()
            end
            ngx.say("before: ", package.loaded.t_ready[1], ", in init_worker: ",
                    package.loaded.t_ready[2], ", later: ", ev:is_ready(),
                    ", poller running: ", require("resty.workerbus.events_core").poller_running())
        }
    }
--- request
GET /t
--- response_body
before: false, in init_worker: false, later: true, poller running: true
--- no_error_log
[error]



=== TEST 7: new() checks its options as lua-resty-events does, non-finite and fractional numbers too, and raises with its words
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local events = require "resty.events"
            local L = "unix:/tmp/x.sock"
            local cases = {
                "nil", "string",
                { broker_id = "x", listening = L }, { broker_id = 4, listening = L },
                { broker_id = -1, listening = L }, { broker_id = 0.5, listening = L },
                { broker_id = 0/0, listening = L },
                {}, { listening = 1 }, { listening = "/tmp/x.sock" },
                { listening = L, unique_timeout = "1" }, { listening = L, unique_timeout = 0 },
                { listening = L, unique_timeout = 0/0 }, { listening = L, unique_timeout = math.huge },
                { listening = L, unique_timeout = 2^31 },
                { listening = L, max_queue_len = "1" }, { listening = L, max_queue_len = 0 },
                { listening = L, max_queue_len = 0/0 },
                { listening = L, max_payload_len = "1" }, { listening = L, max_payload_len = 0 },
                { listening = L, max_payload_len = 16 * 1024 * 1024 + 1 },
                { listening = L, max_payload_len = 0/0 },
                { listening = L, enable_privileged_agent = 1 },
                { listening = L, testing = "yes" }, { listening = L, zone = 1 },
            }
            for _, opts in ipairs(cases) do
                local arg = opts
                if opts == "nil" then arg = nil end
                local ok, err = pcall(events.new, arg)
                ngx.say(ok, " ", (tostring(err):gsub("^.-:%d+: ", "")))
            end
            local ev = events.new { listening = L, broker_id = 3,
                                    unique_timeout = 1, max_queue_len = 10,
                                    max_payload_len = 1000, enable_privileged_agent = false }
            ngx.say("valid options: ", type(ev), " ", ev.opts.unique_timeout)
            ev = events.new { listening = L }
            ngx.say("defaults: broker_id ", ev.opts.broker_id, ", unique_timeout ", ev.opts.unique_timeout,
                    ", max_queue_len ", ev.opts.max_queue_len, ", max_payload_len ", ev.opts.max_payload_len,
                    ", testing ", ev.opts.testing)
        }
    }
--- request
GET /t
--- response_body
false Expected a table, got nil
false Expected a table, got string
false "broker_id" option must be a number
false "broker_id" option is invalid
false "broker_id" option is invalid
false "broker_id" option is invalid
false "broker_id" option is invalid
false "listening" option required to start
false "listening" option must be a string
false "listening" option must start with unix:
false optional "unique_timeout" option must be a number
false "unique_timeout" must be greater than 0
false "unique_timeout" must be greater than 0
false "unique_timeout" must be at most 2147483647
false "unique_timeout" must be at most 2147483647
false "max_queue_len" option must be a number
false "max_queue_len" option is invalid
false "max_queue_len" option is invalid
false "max_payload_len" option must be a number
false "max_payload_len" option is invalid
false "max_payload_len" option is invalid
false "max_payload_len" option is invalid
false "enable_privileged_agent" option must be a boolean
false "testing" option must be a boolean
false "zone" option must be a string
valid options: table 1
defaults: broker_id 0, unique_timeout 5, max_queue_len 10240, max_payload_len 65536, testing false
--- no_error_log
[error]



=== TEST 8: publish: missing arguments raise; unserializable or too large data gives nil and the reason
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock", max_payload_len = 100 }
        package.loaded.t_ev = ev
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = package.loaded.t_ev
            for _, args in ipairs { { nil, "s", "e" }, { "all", "", "e" }, { "all", "s", 1 } } do
                local ok, err = pcall(ev.publish, ev, args[1], args[2], args[3])
                ngx.say(ok, " ", (tostring(err):gsub("^.-:%d+: ", "")))
            end
            ngx.say(ev:publish("all", "s", "e", { cb = print }))
            ngx.say(ev:publish("all", "s", "e", string.rep("x", 101)))
            ngx.say(ev:publish("all", "s", "e", string.rep("x", 68)))  -- a 100-byte frame (t/106)
            local ok, err = pcall(ev.subscribe, ev, "s", "e", "nope")
            ngx.say(ok, " ", (tostring(err):gsub("^.-:%d+: ", "")))
            ok, err = pcall(ev.unsubscribe, ev, nil)
            ngx.say(ok, " ", (tostring(err):gsub("^.-:%d+: ", "")))
        }
    }
--- request
GET /t
--- response_body
false target is required
false source is required
false event is required
nilfailed to publish event: cannot serialize data: cannot serialize 'function'
nilfailed to publish event: payload exceeds the limitation (100)
true
false expected function, got: string
false id is required
--- no_error_log
[error]



=== TEST 9: testing = true: publish calls this worker's callbacks at once and touches no ring
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local core = require "resty.workerbus.events_core"
            local wb = require "resty.workerbus"
            local head = tonumber(core and require("ffi").C.workerbus_ev_head(wb.zone()))
            local ev = require("resty.events").new { listening = "unix:", testing = true }
            local got = {}
            ev:subscribe("*", "*", function(data, event, source, wid)
                got[#got + 1] = source .. "/" .. event .. "=" .. tostring(data) .. " wid " .. tostring(wid)
            end)
            ngx.say("init_worker: ", ev:init_worker(), ", ready: ", ev:is_ready())
            ngx.say("publish: ", ev:publish("all", "s", "e", "d"))
            local deadline = ngx.now() + 10
            while not ev:is_ready() and ngx.now() < deadline do
                ngx.sleep(0.005)
                ngx.update_time()
            end
            ngx.say("ready later: ", ev:is_ready())
            ngx.say("handled at once: ", table.concat(got, ", "))
            ngx.say("ring untouched: ", tonumber(require("ffi").C.workerbus_ev_head(wb.zone())) == head)
        }
    }
--- request
GET /t
--- response_body
init_worker: true, ready: false
publish: true
ready later: true
handled at once: s/e=d wid nil
ring untouched: true
--- no_error_log
[error]



=== TEST 10: both APIs in one worker: each one's handlers get every event, whichever API posted it
--- main_config
    workerbus_zone main 4m;
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local id = ngx.worker.id()
        local ev = require("resty.events").new { listening = "unix:/x.sock" }
        package.loaded.t_ev = ev
        ev:subscribe("t", "*", function(data, event)
            d:set("new" .. id, (d:get("new" .. id) or "") .. event)
        end)
        assert(ev:init_worker())   -- no zone chosen: follows the other API
        local we = require "resty.worker.events"
        we.register(function(data, event)
            d:set("old" .. id, (d:get("old" .. id) or "") .. event)
        end, "t")
        assert(we.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local we = require "resty.worker.events"
            assert(we.post("t", "a"))
            assert(package.loaded.t_ev:publish("all", "t", "b"))
            assert(we.post("t", "c"))
            local d = ngx.shared.got
            local wait_for = require("wbtest").wait
            wait_for(function()
                for w = 0, 3 do
                    if d:get("old" .. w) ~= "abc" or d:get("new" .. w) ~= "abc" then return false end
                end
                return true
            end)
            for w = 0, 3 do
                ngx.say("worker ", w, ": resty.worker.events got ", d:get("old" .. w),
                        ", resty.events got ", d:get("new" .. w))
            end
            ngx.say("zone: ", require("resty.workerbus.events_core").zone_name())
        }
    }
--- request
GET /t
--- response_body
worker 0: resty.worker.events got abc, resty.events got abc
worker 1: resty.worker.events got abc, resty.events got abc
worker 2: resty.worker.events got abc, resty.events got abc
worker 3: resty.worker.events got abc, resty.events got abc
zone: ev
--- no_error_log
[error]



=== TEST 11: tables keep non-string keys and nesting (LuaJIT serializer)
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock" }
        package.loaded.t_ev = ev
        ev:subscribe("t", "*", function(data)
            package.loaded.t_data = data
        end)
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = package.loaded.t_ev
            assert(ev:publish("all", "t", "x", { [1] = "a", [3] = "c", [true] = 1, [2.5] = "f",
                                                nested = { x = { 1, 2 } } }))
            local wait_for = require("wbtest").wait
            wait_for(function() return package.loaded.t_data end)
            local d = package.loaded.t_data
            ngx.say(d[1], " ", tostring(d[2]), " ", d[3], " ", d[true], " ", d[2.5], " ",
                    d.nested.x[1], d.nested.x[2])
        }
    }
--- request
GET /t
--- response_body
a nil c 1 f 12
--- no_error_log
[error]



=== TEST 12: a failing callback is logged with source, event and wid (not the data); the others still run
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock" }
        package.loaded.t_ev = ev
        package.loaded.t_after = { n = 0 }
        ev:subscribe("t", "*", function() error("callback broke") end)
        ev:subscribe("t", "*", function() package.loaded.t_after.n = package.loaded.t_after.n + 1 end)
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("publish: ", package.loaded.t_ev:publish("current", "t", "boom", "secret-payload"))
            local wait_for = require("wbtest").wait
            wait_for(function() return package.loaded.t_after.n >= 1 end)
            ngx.say("second callback ran: ", package.loaded.t_after.n)
        }
    }
--- request
GET /t
--- response_body
publish: true
second callback ran: 1
--- error_log eval
qr/worker-events: event callback failed; source=t, event=boom, wid=nil error='[^\n]*callback broke/
--- no_error_log
secret-payload



=== TEST 13: a zone chosen explicitly by one API is not silently changed by the other
--- main_config
    workerbus_zone main 4m;
    workerbus_zone other 1m;
--- http_config
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock", zone = "other" }
        assert(ev:init_worker())
        package.loaded.t_res = { require("resty.worker.events").configure { shm = "main" } }
    }
--- config
    location = /t {
        content_by_lua_block {
            ngx.say(unpack(package.loaded.t_res))
            ngx.say("zone: ", require("resty.workerbus.events_core").zone_name())
        }
    }
--- request
GET /t
--- response_body
nilevents of this worker already go through workerbus zone "other", not "main"
zone: other
--- no_error_log
[error]
