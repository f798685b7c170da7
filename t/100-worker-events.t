# vim:set ft= ts=4 sw=4 et:
# resty.worker.events (the lua-resty-worker-events 2.0.1 API) on the
# workerbus event ring: delivery, order, unique events, local events,
# polling, the module's own events, handler management and bad input.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();
run_tests();

__DATA__

=== TEST 1: a posted event reaches every worker's handler once, with data, event, source and the poster's pid
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(data, event, source, pid)
            local d = ngx.shared.got
            d:incr("n" .. ngx.worker.id(), 1, 0)
            d:set("args" .. ngx.worker.id(), require("cjson").encode {
                data = data, event = event, source = source, pid = pid })
        end, "t")
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            ngx.say("post: ", ev.post("t", "hello", { a = 1, list = { "x", "y" } }))
            local T = require "wbtest"
            -- until every worker's handler has run, and every worker has read all
            T.wait(function()
                for w = 0, 3 do
                    if not ngx.shared.got:get("args" .. w) then return false end
                end
                return T.caught_up(4)
            end, 2)
            local cjson = require "cjson"
            for w = 0, 3 do
                local a = cjson.decode(ngx.shared.got:get("args" .. w))
                ngx.say("worker ", w, ": ", ngx.shared.got:get("n" .. w), " call, ",
                        a.source, "/", a.event, " a=", a.data.a, " list=",
                        table.concat(a.data.list, ","), " from the poster: ",
                        a.pid == ngx.worker.pid())
            end
        }
    }
--- request
GET /t
--- response_body
post: true
worker 0: 1 call, t/hello a=1 list=x,y from the poster: true
worker 1: 1 call, t/hello a=1 list=x,y from the poster: true
worker 2: 1 call, t/hello a=1 list=x,y from the poster: true
worker 3: 1 call, t/hello a=1 list=x,y from the poster: true
--- no_error_log
[error]
[warn]



=== TEST 2: strings arrive as they were posted, other data through JSON, nil as nil
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local seen = {}
        package.loaded.t_seen = seen
        ev.register(function(data, event)
            seen[#seen + 1] = { event = event, data = data }
        end, "t")
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local cjson = require "cjson"
            local seen = package.loaded.t_seen
            local values = { "text", "", "with\0nul", 42, 1.5, true, false,
                             { 1, 2, 3 }, { k = { nested = "v" } } }
            for i = 1, #values do
                assert(ev.post("t", "v" .. i, values[i]))
            end
            assert(ev.post("t", "nil", nil))
            ngx.say("poll: ", ev.poll())
            for _, s in ipairs(seen) do
                ngx.say(s.event, " ", type(s.data), " ",
                        type(s.data) == "string" and string.format("%q", s.data)
                        or cjson.encode(s.data))
            end
        }
    }
--- request
GET /t
--- response_body
poll: done
v1 string "text"
v2 string ""
v3 string "with\0nul"
v4 number 42
v5 number 1.5
v6 boolean true
v7 boolean false
v8 table [1,2,3]
v9 table {"k":{"nested":"v"}}
nil nil null
--- no_error_log
[error]



=== TEST 3: events posted by four workers at once are handled in one order by all four
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local d = ngx.shared.got
        local id = ngx.worker.id()
        local hash, n, prev, switches = "", 0, nil, 0
        ev.register(function(data)
            n = n + 1
            hash = ngx.md5(hash .. data)
            local poster = data:match("^(%d+):")
            if prev and poster ~= prev then
                switches = switches + 1
            end
            prev = poster
            if n == 2000 then
                d:set("hash" .. id, hash)
                d:set("switches" .. id, switches)
            end
        end, "order")
        assert(ev.configure { shm = "ev" })

        -- every worker starts posting at the same moment
        d:add("start", ngx.now() + 0.3)
        local start = d:get("start")
        assert(ngx.timer.at(0, function()
            while ngx.now() < start do
                ngx.sleep(0.005)
            end
            for i = 1, 500 do
                assert(ev.post("order", "e", id .. ":" .. i))
                if i % 10 == 0 then
                    ngx.sleep(0.001)
                end
            end
        end))
    }
--- config
    location = /t {
        content_by_lua_block {
            local d = ngx.shared.got
            local deadline = ngx.now() + 8
            while ngx.now() < deadline do
                if d:get("hash0") and d:get("hash1") and d:get("hash2") and d:get("hash3") then
                    break
                end
                ngx.sleep(0.05)
            end
            local h = d:get("hash0")
            ngx.say("every worker handled 2000 events: ",
                    h ~= nil and d:get("hash1") ~= nil and d:get("hash2") ~= nil and d:get("hash3") ~= nil)
            ngx.say("in the same order: ",
                    h == d:get("hash1") and h == d:get("hash2") and h == d:get("hash3"))
            ngx.say("the posters' events are interleaved: ", (d:get("switches0") or 0) > 3)
        }
    }
--- request
GET /t
--- timeout: 12
--- response_body
every worker handled 2000 events: true
in the same order: true
the posters' events are interleaved: true
--- no_error_log
[error]
[warn]



=== TEST 4: a unique event posted by every worker is handled by exactly one worker
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(data)
            ngx.shared.got:incr(data, 1, 0)
        end, "cache", "refresh")
        assert(ev.configure { shm = "ev" })
        -- all four post the same unique key; worker 0 also posts another one
        assert(ev.post("cache", "refresh", "key-a", "key-a"))
        if ngx.worker.id() == 0 then
            assert(ev.post("cache", "refresh", "key-b", "key-b"))
        end
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest"
            -- until both keys are handled, and every worker has read every
            -- copy (so that a second handling would show)
            T.wait(function()
                return ngx.shared.got:get("key-a") and ngx.shared.got:get("key-b") and T.caught_up(4)
            end, 2)
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



=== TEST 5: a unique key is claimed for "timeout" seconds, then it can be handled again
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(data)
            ngx.shared.got:incr("handled", 1, 0)
        end, "cache")
        assert(ev.configure { shm = "ev", timeout = 1 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest"
            local ev = require "resty.worker.events"
            local got = ngx.shared.got
            -- every worker has read both posts, well within the timeout
            assert(ev.post("cache", "refresh", nil, "k1"))
            assert(ev.post("cache", "refresh", nil, "k1"))
            T.wait(function() return got:get("handled") and T.caught_up(4) end, 0.8)
            ngx.say("within the timeout: ", got:get("handled"))
            -- the claim, made before the wait ended, has expired
            ngx.sleep(1.1)
            assert(ev.post("cache", "refresh", nil, "k1"))
            T.wait(function() return (got:get("handled") or 0) >= 2 and T.caught_up(4) end, 0.8)
            ngx.say("after the timeout: ", got:get("handled"))
        }
    }
--- request
GET /t
--- response_body
within the timeout: 1
after the timeout: 2
--- no_error_log
[error]



=== TEST 6: events posted in init_worker reach every worker
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local from = {}
        ev.register(function(data)
            from[#from + 1] = data
            table.sort(from)
            ngx.shared.got:set("from" .. ngx.worker.id(), table.concat(from, ","))
        end, "boot", "hello")
        assert(ev.configure { shm = "ev" })
        assert(ev.post("boot", "hello", tostring(ngx.worker.id())))
    }
--- config eval
$::HelloFromEveryWorker
--- request
GET /t
--- response_body eval
$::HelloFromEveryWorkerBody
--- no_error_log
[error]



=== TEST 7: a worker that configures late still gets the events posted before it did
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local id = ngx.worker.id()
        local function configure()
            local from = {}
            ev.register(function(data)
                from[#from + 1] = data
                table.sort(from)
                ngx.shared.got:set("from" .. id, table.concat(from, ","))
            end, "boot", "hello")
            assert(ev.configure { shm = "ev" })
            assert(ev.post("boot", "hello", tostring(id)))
        end
        if id == 3 then
            assert(ngx.timer.at(0.3, configure))   -- the others have posted long before
        else
            configure()
        end
    }
--- config eval
$::HelloFromEveryWorker
--- request
GET /t
--- response_body eval
$::HelloFromEveryWorkerBody
--- no_error_log
[error]



=== TEST 8: post_local: only this worker, on the next poll, before the ring's events waiting (as the original), data as is, pid nil
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local seen = {}
        package.loaded.t_seen = seen
        ev.register(function(data, event, source, pid)
            seen[#seen + 1] = { event = event, data = data, pid = pid }
            ngx.shared.got:incr("saw_" .. event, 1, 0)
        end, "t")
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local seen = package.loaded.t_seen
            local payload = { 1 }
            assert(ev.post("t", "a", "ring 1"))
            ngx.say("post_local: ", ev.post_local("t", "b", payload))
            assert(ev.post("t", "c", "ring 2"))
            ngx.say("handled before poll: ", #seen)
            ngx.say("poll: ", ev.poll())
            for _, s in ipairs(seen) do
                ngx.say(s.event, ": pid ", s.pid == ngx.worker.pid() and "of the poster" or tostring(s.pid),
                        ", same table: ", s.data == payload)
            end
            local d = ngx.shared.got
            local T = require "wbtest"
            -- until a and c reached every worker, and every worker has read all
            T.wait(function()
                return (d:get("saw_a") or 0) >= 4 and (d:get("saw_c") or 0) >= 4 and T.caught_up(4)
            end, 2)
            ngx.say("workers that saw a, b, c: ", d:get("saw_a"), " ", d:get("saw_b"), " ", d:get("saw_c"))
        }
    }
--- request
GET /t
--- response_body
post_local: true
handled before poll: 0
poll: done
b: pid nil, same table: true
a: pid of the poster, same table: false
c: pid of the poster, same table: false
workers that saw a, b, c: 4 1 4
--- no_error_log
[error]



=== TEST 9: poll returns "done", and "recursive" when a handler calls it
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function()
            package.loaded.t_inner = { ev.poll() }
        end, "t")
        assert(ev.configure { shm = "ev", interval = 0 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            assert(ev.post("t", "x"))
            local outer = ev.poll()
            ngx.say("outer: ", outer, ", inner: ", unpack(package.loaded.t_inner))
            ngx.say("again: ", ev.poll())
        }
    }
--- request
GET /t
--- response_body
outer: done, inner: recursive
again: done
--- no_error_log
[error]



=== TEST 10: a poll abandoned inside a yielding handler (its thread was killed) does not block later polls
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function() ngx.sleep(10) end, "slow")
        assert(ev.configure { shm = "ev", interval = 0 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            assert(ev.post("slow", "x"))
            local t = ngx.thread.spawn(function() ev.poll() end)
            ngx.sleep(0.05)   -- the handler sleeps inside that poll
            ngx.say("while the handler sleeps: ", ev.poll())
            ngx.thread.kill(t)
            t = nil
            collectgarbage()
            collectgarbage()
            ngx.say("after its thread was killed: ", ev.poll())
        }
    }
--- request
GET /t
--- response_body
while the handler sleeps: recursive
after its thread was killed: done
--- error_log
workerbus: a poll was abandoned inside a handler (its request or timer ended); polling resumes
--- no_error_log
[error]



=== TEST 11: interval = 0: no background poller, an event waits for poll()
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        package.loaded.t_count = { n = 0 }
        ev.register(function()
            package.loaded.t_count.n = package.loaded.t_count.n + 1
        end, "t")
        assert(ev.configure { shm = "ev", interval = 0 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            assert(ev.post("t", "x"))
            ngx.sleep(0.3)
            ngx.say("handled before poll: ", package.loaded.t_count.n)
            ngx.say("poll: ", ev.poll())
            ngx.say("handled after poll: ", package.loaded.t_count.n)
        }
    }
--- request
GET /t
--- response_body
handled before poll: 0
poll: done
handled after poll: 1
--- no_error_log
[error]



=== TEST 12: every worker gets the "started" event of every worker's configure
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local pids, n = {}, 0
        ev.register(function(data, event, source, pid)
            n = n + 1
            pids[pid] = true
            local distinct = 0
            for _ in pairs(pids) do distinct = distinct + 1 end
            ngx.shared.got:set("started" .. ngx.worker.id(),
                               n .. " from " .. distinct .. " pids, data " .. tostring(data))
        end, ev.events._source, ev.events.started)
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            -- until every worker's handler has counted 4 "started" events
            require("wbtest").wait(function()
                for w = 0, 3 do
                    local n = (ngx.shared.got:get("started" .. w) or ""):match("^%d+")
                    if not n or tonumber(n) < 4 then return false end
                end
                return true
            end, 2)
            for w = 0, 3 do
                ngx.say("worker ", w, ": ", ngx.shared.got:get("started" .. w))
            end
        }
    }
--- request
GET /t
--- response_body
worker 0: 4 from 4 pids, data nil
worker 1: 4 from 4 pids, data nil
worker 2: 4 from 4 pids, data nil
worker 3: 4 from 4 pids, data nil
--- no_error_log
[error]



=== TEST 13: an exiting worker posts "stopping" and handles its own (HUP retires all four)
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(data, event, source, pid)
            if pid == ngx.worker.pid() then
                ngx.shared.got:incr("own_stopping", 1, 0)
            end
        end, "resty-worker-events", "stopping")
        assert(ev.configure { shm = "ev", interval = 10 })
    }
--- config
    location = /hup {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            ngx.say("HUP sent: ", ffi.C.kill(require("ngx.process").get_master_pid(), 1) == 0)
        }
    }
    location = /after {
        content_by_lua_block {
            -- until the four old workers have handled their own "stopping"
            require("wbtest").wait(function()
                return (ngx.shared.got:get("own_stopping") or 0) >= 4
            end, 10)
            ngx.say("old workers that handled their own stopping event: ",
                    ngx.shared.got:get("own_stopping"))
        }
    }
--- request eval
["GET /hup", "GET /after"]
--- timeout: 15
--- response_body eval
["HUP sent: true\n", "old workers that handled their own stopping event: 4\n"]
--- no_error_log
[error]



=== TEST 14: post before configure fails with "not configured"
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            ngx.say("configured: ", ev.configured())
            ngx.say("post: ", ev.post("t", "x", "data"))
            ngx.say("post unique: ", ev.post("t", "x", nil, "u"))
        }
    }
--- request
GET /t
--- response_body
configured: false
post: nilnot configured
post unique: nilnot configured
--- no_error_log
[error]



=== TEST 15: bad source, event or unique: nil and a clear error, nothing posted
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
            local core = require "resty.workerbus.events_core"
            -- until every worker has posted its "started" event
            require("wbtest").wait(function()
                return require("resty.workerbus").status().zones[1].events.posted >= 4
            end, 2)
            local _, head = core.position()
            local cases = {
                { "post", nil, "e" }, { "post", "", "e" }, { "post", 1, "e" },
                { "post", "s", nil }, { "post", "s", "" }, { "post", "s", {} },
                { "post", "s", "e", "d", {} }, { "post", "s", "e", "d", "" },
                { "post_local", nil, "e" }, { "post_local", "s", false },
            }
            for _, c in ipairs(cases) do
                local ok, err = ev[c[1]](c[2], c[3], c[4], c[5])
                ngx.say(c[1], "(", tostring(c[2]) == c[2] and string.format("%q", c[2]) or type(c[2]),
                        ", ", type(c[3]) == "string" and string.format("%q", c[3]) or type(c[3]),
                        c[5] ~= nil and ", unique " .. (type(c[5]) == "string" and string.format("%q", c[5]) or type(c[5])) or "",
                        "): ", tostring(ok), ", ", err)
            end
            local _, head2 = core.position()
            ngx.say("events posted: ", head2 - head)
        }
    }
--- request
GET /t
--- response_body
post(nil, "e"): nil, source is required
post("", "e"): nil, source is required
post(number, "e"): nil, source must be a string, got number
post("s", nil): nil, event is required
post("s", ""): nil, event is required
post("s", table): nil, event must be a string, got table
post("s", "e", unique table): nil, unique must be a string, got table
post("s", "e", unique ""): nil, unique must not be empty
post_local(nil, "e"): nil, source is required
post_local("s", boolean): nil, event must be a string, got boolean
events posted: 0
--- no_error_log
[error]



=== TEST 16: an event larger than the ring takes is refused, with the sizes (by Lua and by the module)
--- main_config
    workerbus_zone ev 1m;
--- http_config
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local core = require "resty.workerbus.events_core"
            local wb = require "resty.workerbus"
            local ffi = require "ffi"
            local max = core.max_payload()
            ngx.say("max payload below the zone size: ", max > 1000 and max < 1024 * 1024)
            local fits = string.rep("x", max - 4)      -- "t" + "big" + data = max
            ngx.say("largest event: ", ev.post("t", "big", fits))
            local data = fits .. "y"
            local ok, err = ev.post("t", "big", data)
            ngx.say(ok, ", ", err == 'failed posting event "big" by "t"; event of ' .. (max + 1)
                    .. ' bytes (source 1 + event 3 + unique 0 + data ' .. (#data)
                    .. ') is larger than the maximum of ' .. max .. ' bytes of workerbus zone "ev"')
            local z = wb.zone("ev")
            local seq = ffi.C.workerbus_ev_post(z, "t", 1, "big", 3, nil, 0, data, #data, 0)
            ngx.say("module: ", tonumber(seq), ", ", wb.last_error() ==
                    "event of " .. (max + 1) .. " bytes is larger than the ring's maximum of " .. max)
        }
    }
--- request
GET /t
--- response_body
max payload below the zone size: true
largest event: true
nil, true
module: -1, true
--- error_log
workerbus: failed posting event "big" by "t"; event of
--- no_error_log
worker-events: failed



=== TEST 17: data that JSON cannot carry is refused: nil and the encoder's reason
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
            ngx.say(ev.post("t", "f", print))
            ngx.say(ev.post("t", "nested", { ok = 1, cb = { print } }))
            ngx.say(ev.post("t", "sparse", { [1] = 1, [1000] = 2 }))
        }
    }
--- request
GET /t
--- response_body
nilfailed posting event "f" by "t"; cannot encode data as JSON: Cannot serialise function: type not supported
nilfailed posting event "nested" by "t"; cannot encode data as JSON: Cannot serialise function: type not supported
nilfailed posting event "sparse" by "t"; cannot encode data as JSON: Cannot serialise table: excessively sparse array
--- error_log
workerbus: failed posting event "f" by "t"; cannot encode data as JSON



=== TEST 18: register, register_weak and unregister raise for a callback that is not a function
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            ngx.say(pcall(ev.register, "not a function"))
            ngx.say(pcall(ev.register_weak, nil, "src"))
            ngx.say(pcall(ev.unregister, 42))
        }
    }
--- request
GET /t
--- response_body
falseexpected function, got: string
falseexpected function, got: nil
falseexpected function, got: number
--- no_error_log
[error]



=== TEST 19: event_list: named events and _source; an unknown event raises
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local events = ev.event_list("my-source", "started", "event2")
            ngx.say(events._source, " ", events.started, " ", events.event2)
            local ok, err = pcall(function() return events.stoppping end)
            ngx.say(ok, " ", (err:gsub("^.-:%d+: ", "")))
            ngx.say("own events: ", ev.events._source, " ", ev.events.started, " ",
                    ev.events.stopping, " ", ev.events.lagged)
        }
    }
--- request
GET /t
--- response_body
my-source started event2
false event 'stoppping' is an unknown event
own events: resty-worker-events started stopping lagged
--- no_error_log
[error]



=== TEST 20: a failing handler is logged with source and event (not the data); the others still run
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        package.loaded.t_after = { n = 0 }
        ev.register(function() error("handler broke") end, "t")
        ev.register(function() package.loaded.t_after.n = package.loaded.t_after.n + 1 end, "t")
        assert(ev.configure { shm = "ev", interval = 0 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            ngx.say("post: ", ev.post("t", "boom", "secret-payload"))
            ngx.say("poll: ", ev.poll())
            ngx.say("second handler ran: ", package.loaded.t_after.n)
        }
    }
--- request
GET /t
--- response_body
post: true
poll: done
second handler ran: 1
--- error_log eval
qr/worker-events: event callback failed; source=t, event=boom, pid=\d+ error='[^\n]*handler broke/
--- no_error_log
secret-payload



=== TEST 21: register_weak: a collected handler is no longer called, a referenced one is
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local calls = { weak_dropped = 0, weak_kept = 0, strong = 0 }
        package.loaded.t_calls = calls
        local kept = function() calls.weak_kept = calls.weak_kept + 1 end
        package.loaded.t_kept = kept
        ev.register_weak(kept, "t")
        ev.register_weak(function() calls.weak_dropped = calls.weak_dropped + 1 end, "t")
        ev.register(function() calls.strong = calls.strong + 1 end, "t")
        assert(ev.configure { shm = "ev", interval = 0 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            collectgarbage("collect")
            collectgarbage("collect")
            assert(ev.post("t", "x"))
            ngx.say("poll: ", ev.poll())
            local c = package.loaded.t_calls
            ngx.say("weak, collected: ", c.weak_dropped, "; weak, referenced: ", c.weak_kept,
                    "; strong: ", c.strong)
        }
    }
--- request
GET /t
--- response_body
poll: done
weak, collected: 0; weak, referenced: 1; strong: 1
--- no_error_log
[error]



=== TEST 22: handlers match all events, one source, or a source and a list of events; unregister
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local got = {}
        package.loaded.t_got = got
        local function rec(name)
            return function(_, event, source)
                if source ~= "resty-worker-events" then
                    got[#got + 1] = name .. "<" .. source .. "/" .. event
                end
            end
        end
        package.loaded.t_h = { all = rec("all"), src = rec("src"), evs = rec("evs") }
        ev.register(package.loaded.t_h.all)
        ev.register(package.loaded.t_h.src, "s1")
        ev.register(package.loaded.t_h.evs, "s1", "e1", "e2")
        assert(ev.configure { shm = "ev", interval = 0 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local got, h = package.loaded.t_got, package.loaded.t_h
            local function round()
                ev.poll()
                for k in pairs(got) do got[k] = nil end
                for _, e in ipairs { { "s1", "e1" }, { "s1", "e3" }, { "s2", "e1" } } do
                    assert(ev.post(e[1], e[2]))
                end
                ev.poll()
                ngx.say(table.concat(got, " "))
            end
            round()
            ngx.say("unregister evs e2: ", ev.unregister(h.evs, "s1", "e2"))
            ngx.say("unregister evs e1: ", ev.unregister(h.evs, "s1", "e1"))
            ngx.say("unregister src from s2: ", ev.unregister(h.src, "s2"))
            ngx.say("unregister all: ", ev.unregister(h.all))
            round()
        }
    }
--- request
GET /t
--- response_body
all<s1/e1 src<s1/e1 evs<s1/e1 all<s1/e3 src<s1/e3 all<s2/e1
unregister evs e2: true
unregister evs e1: true
unregister src from s2: false
unregister all: true
src<s1/e1 src<s1/e3
--- no_error_log
[error]



=== TEST 23: configure checks its options as the original does
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local cases = {
                {}, { shm = "nope" }, { shm = "ev", timeout = "1" }, { shm = "ev", timeout = 0 },
                { shm = "ev", interval = -1 }, { shm = "ev", wait_interval = "x" },
                { shm = "ev", wait_max = -1 }, { shm = "ev", shm_retries = -1 },
                { shm = "ev", shm_retries = "many" },
                { shm = "ev", timeout = math.huge }, { shm = "ev", timeout = 0/0 },
                { shm = "ev", interval = 0/0 }, { shm = "ev", interval = math.huge },
                { shm = "ev", wait_max = -math.huge }, { shm = "ev", timeout = 1e12 },
                { shm = "ev", interval = 31536001 }, { shm = "ev", shm_retries = 1.5 },
            }
            for _, opts in ipairs(cases) do
                ngx.say(ev.configure(opts))
            end
            ngx.say("configured: ", ev.configured())
            local ok, err = pcall(ev.configure, nil)
            ngx.say(ok, " ", (err:gsub("^.-:%d+: ", "")))
            ngx.say(ev.configure { shm = "ev", timeout = 1, interval = 0.5, wait_interval = 0.02,
                                   wait_max = 1, shm_retries = 10 })
            ngx.say("configured: ", ev.configured())
            ngx.say("again, same shm: ", ev.configure { shm = "ev", interval = 2 })
            ngx.say("again, other shm: ", ev.configure { shm = "other" })
            ngx.say("again, no shm: ", ev.configure { timeout = 3 })
        }
    }
--- request
GET /t
--- response_body
nil"shm" option required to start
nilshm "nope" not found: it is neither a workerbus_zone nor a lua_shared_dict
niloptional "timeout" option must be a number
nil"timeout" must be greater than 0
nil"interval" must be greater than or equal to 0
niloptional "wait_interval" option must be a number
nil"wait_max" must be greater than or equal to 0
nil"shm_retries" must be 0 or greater
niloptional "shm_retries" option must be a number
nil"timeout" must be a finite number, got inf
nil"timeout" must be a finite number, got nan
nil"interval" must be a finite number, got nan
nil"interval" must be a finite number, got inf
nil"wait_max" must be a finite number, got -inf
nil"timeout" must be at most 31536000 seconds (a year), got 1000000000000
nil"interval" must be at most 31536000 seconds (a year), got 31536001
nil"shm_retries" must be a whole number, got 1.5
configured: false
false Expected a table, got nil
true
configured: true
again, same shm: true
again, other shm: nilAlready started, cannot change shm
again, no shm: true
--- no_error_log
[error]



=== TEST 24: shm naming a lua_shared_dict: the primary workerbus zone carries the events, a notice says so once
--- main_config
    workerbus_zone main 4m;
    workerbus_zone other 1m;
--- http_config
    lua_shared_dict process_events 1m;
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function() ngx.shared.got:incr("n", 1, 0) end, "t")
        assert(ev.configure { shm = "process_events" })
        assert(ev.configure { interval = 2 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            assert(ev.post("t", "x"))
            local T = require "wbtest"
            -- until every worker's handler has run, and every worker has read all
            T.wait(function() return (ngx.shared.got:get("n") or 0) >= 4 and T.caught_up(4) end, 2)
            ngx.say("handled by ", ngx.shared.got:get("n"), " workers")
            ngx.say("zone: ", require("resty.workerbus.events_core").zone_name())
            ngx.say("keys in the dict: ", #ngx.shared.process_events:get_keys(0))
        }
    }
--- request
GET /t
--- response_body
handled by 4 workers
zone: main
keys in the dict: 0
--- grep_error_log eval: qr/\w+(?:-\w+)?: shm "process_events" is a lua_shared_dict.*? the dict is not used/
--- grep_error_log_out
workerbus: shm "process_events" is a lua_shared_dict, not a workerbus zone; events go through the event ring of workerbus zone "main" and the dict is not used
--- no_error_log
[error]



=== TEST 25: with interval = 3600 an event reaches the other workers' idle pollers: wake-ups, not polling
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function()
            ngx.update_time()
            ngx.shared.got:set("at" .. ngx.worker.id(), ngx.now())
        end, "lat")
        assert(ev.configure { shm = "ev", interval = 3600 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local T = require "wbtest"
            T.wait_for("every poller asleep", function() return T.sleeping() == 4 end, 4)
            assert(ev.post("lat", "ping"))
            local me, n = ngx.worker.id(), 0
            ngx.update_time()
            local deadline = ngx.now() + 10
            repeat
                n = 0
                for w = 0, 3 do
                    if w ~= me and ngx.shared.got:get("at" .. w) then n = n + 1 end
                end
                ngx.sleep(0.02)
                ngx.update_time()
            until n == 3 or ngx.now() > deadline
            ngx.say("other workers that handled it: ", n)
        }
    }
--- request
GET /t
--- timeout: 15
--- response_body
other workers that handled it: 3
--- no_error_log
[error]



=== TEST 26: a worker respawned after kill -9 handles what it posts in init_worker, its own "started" included
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local me = ngx.worker.pid()
        ev.register(function(data, event, source, pid)
            if pid == me then
                ngx.shared.got:set(event .. ":" .. me, true)
            end
        end)
        assert(ev.configure { shm = "ev" })
        assert(ev.post("boot", "hello", "x"))
    }
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local wait_for = require("wbtest").wait_for
            local running = require("wbtest").running
            wait_for("4 running workers", function() return #running() == 4 end)
            local victim
            for _, w in ipairs(running()) do
                if w.pid ~= ngx.worker.pid() then victim = w break end
            end
            local ffi = require "ffi"
            ffi.cdef "int kill(int pid, int sig);"
            ffi.C.kill(victim.pid, 9)
            local heir
            wait_for("the respawn to handle its own hello", function()
                for _, w in ipairs(wb.status().workers) do
                    if w.pid == victim.pid and w.replaced_by then heir = w.replaced_by end
                end
                return heir and ngx.shared.got:get("hello:" .. heir)
            end)
            ngx.say("respawned saw its own started: ", ngx.shared.got:get("started:" .. heir),
                    ", its own hello: ", ngx.shared.got:get("hello:" .. heir))
        }
    }
--- request
GET /t
--- response_body
respawned saw its own started: true, its own hello: true



=== TEST 27: no idle polling, even with interval = 0.01: with no events, the poller does not wake up
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local core = require "resty.workerbus.events_core"
            local T = require "wbtest"
            T.wait_for("every poller asleep", function() return T.sleeping() == 4 end, 2)
            local w0 = core.poller_wakes()
            ngx.sleep(3.5)
            ngx.say("idle wake-ups in 3.5 s: ", core.poller_wakes() - w0)
            require("resty.worker.events").post("x", "y", "z")
            T.wait(function() return core.poller_wakes() - w0 >= 1 end, 1)
            ngx.say("after one event: ", core.poller_wakes() - w0 >= 1)
        }
    }
--- request
GET /t
--- timeout: 8
--- response_body
idle wake-ups in 3.5 s: 0
after one event: true
--- no_error_log
[error]



=== TEST 28: shm naming a lua_shared_dict larger than the ring: said once, at notice level, with the ring's capacity and the line to add
--- http_config
    lua_shared_dict process_events 64m;
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "process_events", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            -- until every worker has configured (and read the others'
            -- "started" events): a second notice would be logged by then
            local T = require "wbtest"
            T.wait(function() return T.caught_up(4) end, 2)
            ngx.say(require("resty.worker.events").configured())
        }
    }
--- request
GET /t
--- response_body
true
--- grep_error_log eval: qr/\[notice\].*?shm "process_events" is a lua_shared_dict.*?main context/
--- grep_error_log_out eval
qr/\A\[notice\] \d+#\d+: \*?\d* ?\[lua\] events.lua:\d+: \w+\(\): workerbus: shm "process_events" is a lua_shared_dict of 67108864 bytes, larger than the event ring of workerbus zone "workerbus": 16777216 bytes, about 149796 events of 64 bytes; events go through the ring and the dict is not used; for a ring as large as the dict, put "workerbus_zone workerbus 128m;" in nginx.conf's main context\n\z/
--- no_error_log
[error]
[warn]



=== TEST 29: wake-ups across a reload: an old-generation worker still serving a request never takes a new worker's wake-up (no heartbeat, no poll to hide it)
--- main_config
    workerbus_heartbeat 1h;
--- http_config
    lua_shared_dict got 1m;
    lua_shared_dict process_events 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local tag = require("resty.workerbus").generation() .. ":" .. ngx.worker.id()
        ev.register(function(data)
            ngx.shared.got:set("seen:" .. tag .. ":" .. data, true)
        end, "wake")
        assert(ev.configure { shm = "process_events", interval = 3600 })
    }
--- config
    location = /post {
        content_by_lua_block {
            -- posted by a new worker of another slot: the one of the old
            -- worker's slot must be woken, while the old one sleeps too
            if ngx.worker.id() == tonumber(ngx.var.arg_not) then
                return ngx.say("again")
            end
            ngx.say(require("resty.worker.events").post("wake", "e", ngx.var.arg_i))
        }
    }
    location = /t {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            local wb = require "resty.workerbus"
            local d = ngx.shared.got
            local me = ngx.worker.id()
            local get = require("wbtest").get
            local wait = require("wbtest").wait
            wait(function() return #require("wbtest").running() == 4 end, 10)
            local n = #wb.status().workers
            ffi.C.kill(require("ngx.process").get_master_pid(), 1)   -- HUP
            -- this worker (generation 1) keeps serving us; wait for the new ones
            local new = {}
            assert(wait(function()
                new = {}
                for _, w in ipairs(wb.status().workers) do
                    if w.generation == 2 and w.state == "running" then new[#new + 1] = w.pid end
                end
                return #new == n
            end, 10), "no new workers")
            -- the master tells the old workers to quit 100 ms after it
            -- started the new ones: the wake-ups below go out while this
            -- worker shuts down, as in a real reload
            wait(function() return ngx.worker.exiting() end, 10)
            local function new_idle()
                return require("wbtest").sleeping(2) == n
            end
            local delivered = 0
            for i = 1, 20 do
                wait(new_idle, 2)
                local tries = 0
                repeat   -- this worker no longer listens: a new one serves it
                    tries = tries + 1
                until get("/post?not=" .. me .. "&i=" .. i):find("true", 1, true) or tries > 200
                if wait(function() return d:get("seen:2:" .. me .. ":" .. i) end, 3) then
                    delivered = delivered + 1
                end
            end
            ngx.say("old worker still here: ", ngx.worker.exiting())
            ngx.say("delivered to the new worker of this slot by wake-ups: ", delivered, " of 20")
        }
    }
--- request
GET /t
--- timeout: 120
--- response_body
old worker still here: true
delivered to the new worker of this slot by wake-ups: 20 of 20
--- no_error_log
[error]



=== TEST 30: the module's own log lines do not start with "worker-events: ", the handler trace does
--- main_config
    workerbus_zone ev 1m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function() error("boom") end, "t")
        -- Runs after the failing handler (handlers run in order), once its
        -- error is in the log.
        package.loaded.t30 = { done = false }
        ev.register(function() package.loaded.t30.done = true end, "t")
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            assert(ev.post("t", "e", "x"))
            ngx.say(ev.post("t", "big", string.rep("x", 1024 * 1024)))
            require("wbtest").wait(function() return package.loaded.t30.done end)
        }
    }
--- request
GET /t
--- response_body_like
^nil\s*failed posting event "big" by "t"; event of \d+ bytes.*
--- grep_error_log eval: qr/(?:worker-events|workerbus): (?:event callback failed|failed posting)/
--- grep_error_log_out eval
qr/\A(?=.*^workerbus: failed posting$)(?=.*^worker-events: event callback failed$)(?:(?:worker-events: event callback failed|workerbus: failed posting)\n)+\z/ms



=== TEST 31: a graceful QUIT does not wait for the idle poller (no heartbeat, no interval to end its wait): every worker exits through nginx
--- main_config
    workerbus_heartbeat 1h;
--- http_config
    lua_shared_dict process_events 1m;
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "process_events", interval = 3600 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local wb = require "resty.workerbus"
            ngx.update_time()
            local deadline = ngx.now() + 10
            local idle
            repeat   -- every poller asleep on its semaphore
                idle = 0
                for _, w in ipairs(wb.status().zones[1].events.workers) do
                    if w.idle == true then idle = idle + 1 end
                end
                ngx.sleep(0.02)
                ngx.update_time()
            until idle == 4 or ngx.now() > deadline
            ngx.say("idle pollers: ", idle)
        }
    }
--- request
GET /t
--- response_body
idle pollers: 4
--- shutdown_error_log eval
qr/workerbus: worker process \d+ exited from slot \d, generation 1 \(0 live\)/



=== TEST 32: the semaphore a wake-up posts stays alive while registered: the poller dies in its wait and the module is loaded anew, the registered semaphore survives collection, the new poller's replaces it and is the one woken
--- http_config
    lua_shared_dict process_events 1m;
    init_worker_by_lua_block {
        -- every semaphore made in this worker, held weakly: collection shows
        local semaphore = require "ngx.semaphore"
        local made = setmetatable({}, { __mode = "k" })
        local new = semaphore.new
        semaphore.new = function(...)
            local s, err = new(...)
            if s then made[s] = true end
            return s, err
        end
        package.loaded.test_made = made
        assert(require("resty.worker.events").configure { shm = "process_events", interval = 3600 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local semaphore = require "ngx.semaphore"
            local made = package.loaded.test_made
            local function made_count()
                collectgarbage("collect")
                collectgarbage("collect")
                local n = 0
                for _ in pairs(made) do n = n + 1 end
                return n
            end
            local wait_for = require("wbtest").wait
            ngx.say("first poller's semaphore: ", wait_for(function() return made_count() == 1 end))

            -- the poller's coroutine dies in its next wait, with its
            -- semaphore registered
            local wait, died = semaphore.wait, false
            semaphore.wait = function()
                semaphore.wait, died = wait, true
                error("poller killed by the test")
            end
            assert(require("resty.worker.events").post("test", "nudge"))
            ngx.say("poller died: ", wait_for(function() return died end))

            -- nothing of the first module is left but what it registered
            for _, m in ipairs { "resty.worker.events", "resty.events", "resty.workerbus.events_core" } do
                package.loaded[m] = nil
            end
            ngx.say("registered semaphore alive after collection: ",
                    made_count() == 1 and debug.getregistry()[
                        "resty.workerbus.events_core: registered semaphore"] ~= nil)

            -- a new copy's poller registers its own; posts wake it (it
            -- waits an hour otherwise)
            local ev = require "resty.worker.events"
            local got = 0
            ev.register(function() got = got + 1 end, "test", "again")
            assert(ev.configure { shm = "process_events", interval = 3600 })
            ngx.say("second poller's semaphore: ", wait_for(function() return made_count() == 2 end))
            ngx.sleep(0.05)
            for _ = 1, 3 do
                assert(ev.post("test", "again"))
                assert(wait_for(function() return got > 0 end))
                ngx.sleep(0.05)
            end
            ngx.say("handled by the new copy, woken: ", wait_for(function() return got == 3 end))
        }
    }
--- request
GET /t
--- response_body
first poller's semaphore: true
poller died: true
registered semaphore alive after collection: true
second poller's semaphore: true
handled by the new copy, woken: true
--- error_log
poller killed by the test
--- no_error_log
[alert]
[crit]
exited on signal



=== TEST 33: a table reaches the handlers exactly as a cjson round trip gives it back, whether it travels as JSON or (when cjson would give it back unchanged) by string.buffer
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local seen = {}
        package.loaded.t_seen = seen
        ev.register(function(data, event)
            seen[tonumber(event)] = data
        end, "t")
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local cjson = require "cjson.safe"
            local record = require "resty.workerbus.record"
            -- a canonical form that tells key types and every bit of a number apart
            local function canon(v)
                local t = type(v)
                if t == "number" then return string.format("n%.17g", v) end
                if t ~= "table" then return t:sub(1, 1) .. tostring(v) end
                local parts = {}
                for k, x in pairs(v) do parts[#parts + 1] = canon(k) .. "=" .. canon(x) end
                table.sort(parts)
                return "{" .. table.concat(parts, ",") .. "}"
            end
            local deep = { "bottom" }
            for _ = 1, 9 do deep = { deep } end
            local values = {
                -- cjson gives these back unchanged
                { name = "upstream-a", port = 8080, healthy = true, weight = 0 },
                { 1, 2, { 3, { 4 } } }, {}, { k = {} }, { n = 99999999999999, m = -99999999999999 },
                { ["1"] = "a string key", s = "with\0nul and \"quotes\" / \\ \226\130\172", bad = "\255\254 not UTF-8" },
                42, true,
                -- cjson changes these: a mixed table's integer keys become
                -- strings, a sparse array gets nulls, numbers keep 14 digits
                { 1, x = 2 }, { [1] = "a", [3] = "c" }, { f = 0.1 + 0.2 }, { big = 123456789012345678 },
                { n = 100000000000000 }, { z = -0.0 }, { [1.5] = true }, { n = cjson.null },
                setmetatable({ k = 1 }, {}), deep, 1.5, { a = { ok = true, b = { 1, 0.5 } } },
            }
            for i = 1, #values do
                assert(ev.post("t", tostring(i), values[i]))
            end
            assert(ev.poll() == "done")
            local seen = package.loaded.t_seen
            for i = 1, #values do
                local want = cjson.decode(cjson.encode(values[i]))
                ngx.say(i, " ", record.json_exact(values[i]) and "exact" or "json", " ",
                        canon(seen[i]) == canon(want) and "same" or ("DIFFERENT: " .. canon(seen[i]) .. " vs " .. canon(want)))
            end
        }
    }
--- request
GET /t
--- response_body
1 exact same
2 exact same
3 exact same
4 exact same
5 exact same
6 exact same
7 exact same
8 exact same
9 json same
10 json same
11 json same
12 json same
13 json same
14 json same
15 json same
16 json same
17 json same
18 json same
19 json same
20 json same
--- no_error_log
[error]



=== TEST 34: at the debug level every worker logs each event it hands to its handlers, with source, event and the poster's pid
--- main_config
    workerbus_zone ev 1m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function() ngx.shared.got:incr("n", 1, 0) end, "dbg")
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            assert(ev.post("dbg", "e", "x"))
            ngx.update_time()
            local deadline = ngx.now() + 10
            while (ngx.shared.got:get("n") or 0) < 4 and ngx.now() < deadline do
                ngx.sleep(0.01)
                ngx.update_time()
            end
            ngx.say("handled: ", ngx.shared.got:get("n"), ", poster ", ngx.worker.pid())
        }
    }
--- request
GET /t
--- response_body_like
^handled: 4, poster \d+$
--- grep_error_log eval: qr/worker-events: handling event; source=dbg, event=e, pid=\d+/
--- grep_error_log_out eval
qr/\A(?:worker-events: handling event; source=dbg, event=e, pid=\d+\n){4}\z/



=== TEST 35: records read back to back keep their own source and event names: same lengths with other bytes, names that grow and shrink, and names too long to be kept for the next record
--- main_config
    workerbus_zone ev 1m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(data, event, source)
            if ngx.worker.id() == 0 and source ~= "resty-worker-events" then
                ngx.shared.got:rpush("seen", source .. " " .. event .. " " .. data)
            end
        end)
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local long = string.rep("s", 200)
            local longer = string.rep("e", 100)
            local posts = {
                { "s1", "e1" }, { "s2", "e1" }, { "s1", "e2" }, { "s2", "e2" }, { "s2", "e2" },
                { "s1x", "e" }, { "s1", "xe" }, { long, longer }, { long, longer },
                { long, "e" }, { "s", "e" }, { long .. "t", longer }, { "s", "e" },
            }
            for i, p in ipairs(posts) do
                assert(ev.post(p[1], p[2], tostring(i)))
            end
            local T = require "wbtest"
            T.wait(function() return ngx.shared.got:llen("seen") == #posts end, 5)
            for i, p in ipairs(posts) do
                local got = ngx.shared.got:lpop("seen")
                local want = p[1] .. " " .. p[2] .. " " .. i
                ngx.say(i, ": ", got == want and "ok" or ("got " .. tostring(got)))
            end
        }
    }
--- request
GET /t
--- response_body
1: ok
2: ok
3: ok
4: ok
5: ok
6: ok
7: ok
8: ok
9: ok
10: ok
11: ok
12: ok
13: ok
