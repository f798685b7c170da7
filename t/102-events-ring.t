# vim:set ft= ts=4 sw=4 et:
# The event APIs under load and trouble: volume, a worker lapped by the
# ring, a reload in the middle of a stream of events.

use Test::Nginx::Socket::Lua 'no_plan';

workers(4);
master_on();
no_long_string();
run_tests();

__DATA__

=== TEST 1: 100,000 broadcast events are each delivered exactly once, in order, to every worker
--- main_config
    workerbus_zone ev 64m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local d = ngx.shared.got
        local id = ngx.worker.id()
        local n, expect, bad = 0, 1, 0
        ev.register(function(data)
            local i = tonumber(data)
            if i ~= expect then
                bad = bad + 1
            end
            expect = i + 1
            n = n + 1
            if n % 10000 == 0 then
                d:set("n" .. id, n)
                d:set("bad" .. id, bad)
            end
        end, "bulk")
        ev.register(function(lost)
            d:incr("lost", lost, 0)
        end, "resty-worker-events", "lagged")
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local d = ngx.shared.got
            ngx.update_time()
            local t0 = ngx.now()
            for i = 1, 100000 do
                local ok, err = ev.post("bulk", "e", tostring(i))
                if not ok then
                    ngx.say("post ", i, " failed: ", err)
                    return
                end
                if i % 5000 == 0 then
                    ngx.sleep(0.001)   -- lets this worker's own poller run too
                end
            end
            local deadline = ngx.now() + 30
            while ngx.now() < deadline do
                local done = 0
                for w = 0, 3 do
                    if d:get("n" .. w) == 100000 then done = done + 1 end
                end
                if done == 4 then break end
                ngx.sleep(0.05)
            end
            ngx.sleep(0.2)   -- anything delivered twice would show now
            for w = 0, 3 do
                ngx.say("worker ", w, ": ", d:get("n" .. w), " events, ",
                        d:get("bad" .. w), " out of order, repeated or missing")
            end
            ngx.say("lost: ", d:get("lost") or 0)
            ngx.update_time()
            ngx.log(ngx.NOTICE, "100000 events to 4 workers in ", ngx.now() - t0, " s")
        }
    }
--- request
GET /t
--- timeout: 40
--- response_body
worker 0: 100000 events, 0 out of order, repeated or missing
worker 1: 100000 events, 0 out of order, repeated or missing
worker 2: 100000 events, 0 out of order, repeated or missing
worker 3: 100000 events, 0 out of order, repeated or missing
lost: 0
--- no_error_log
[error]
[warn]



=== TEST 2: a stopped worker lapped by the ring gets "lagged" with the exact number of events it lost
--- main_config
    workerbus_zone ev 256k;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local id = ngx.worker.id()
        d:set("pid" .. id, ngx.worker.pid())
        local ev = require "resty.worker.events"
        ev.register(function(data, event, source)
            if source == "flood" then
                d:incr("handled" .. id, 1, 0)
            elseif source == "resty-worker-events" and event == "lagged" then
                d:incr("lost" .. id, data, 0)
            end
        end)
        local rev = require("resty.events").new { listening = "unix:/x.sock" }
        rev:subscribe("resty-events", "lagged", function(n)
            d:incr("rlost" .. id, n, 0)
        end)
        assert(rev:init_worker())
        assert(ev.configure { shm = "ev" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            local ev = require "resty.worker.events"
            local wb = require "resty.workerbus"
            local d = ngx.shared.got
            ngx.sleep(0.3)   -- every worker has read the "started" events

            local victim = (ngx.worker.id() + 1) % 4
            local vpid = d:get("pid" .. victim)
            ffi.C.kill(vpid, 19)   -- SIGSTOP

            local capacity = wb.status().zones[1].events.capacity
            local data = string.rep("x", 1000)
            local n = math.ceil(capacity * 3 / #data)   -- three times what the ring holds
            for i = 1, n do
                assert(ev.post("flood", "e", data))
                if i % 20 == 0 then
                    ngx.sleep(0.001)
                end
            end
            ffi.C.kill(vpid, 18)   -- SIGCONT
            ngx.sleep(1)

            for w = 0, 3 do
                local handled, lost = d:get("handled" .. w) or 0, d:get("lost" .. w) or 0
                ngx.say("worker ", w, ": handled + lost = posted: ", handled + lost == n,
                        ", both APIs told the same loss: ", (d:get("rlost" .. w) or 0) == lost)
            end
            ngx.say("the stopped worker lost events: ", (d:get("lost" .. victim) or 0) > 0)
        }
    }
--- request
GET /t
--- timeout: 15
--- response_body
worker 0: handled + lost = posted: true, both APIs told the same loss: true
worker 1: handled + lost = posted: true, both APIs told the same loss: true
worker 2: handled + lost = posted: true, both APIs told the same loss: true
worker 3: handled + lost = posted: true, both APIs told the same loss: true
the stopped worker lost events: true
--- error_log eval
qr/worker-events: this worker was lapped by the event ring of workerbus zone "ev" and lost \d+ events/
--- no_error_log
[error]



=== TEST 3: a reload in the middle of a stream of posts: no crash, no event handled twice or out of order in a worker
--- main_config
    workerbus_zone ev 16m;
--- http_config
    lua_shared_dict got 4m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local d = ngx.shared.got
        local seen, last = {}, {}
        ev.register(function(data)
            if seen[data] then
                d:incr("dups", 1, 0)
            end
            seen[data] = true
            local poster, i = data:match("^(%d+):(%d+)$")
            i = tonumber(i)
            if last[poster] and i <= last[poster] then
                d:incr("reordered", 1, 0)
            end
            last[poster] = i
            d:incr("handled", 1, 0)
        end, "hup")
        assert(ev.configure { shm = "ev" })

        -- every worker posts every 2 ms until it exits
        local pid = ngx.worker.pid()
        assert(ngx.timer.at(0, function()
            local i = 0
            while not ngx.worker.exiting() do
                i = i + 1
                if not ev.post("hup", "tick", pid .. ":" .. i) then
                    d:incr("post_errors", 1, 0)
                end
                ngx.sleep(0.002)
            end
        end))
    }
--- config
    location = /hup {
        content_by_lua_block {
            ngx.sleep(0.3)
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            ngx.say("HUP sent: ", ffi.C.kill(require("ngx.process").get_master_pid(), 1) == 0)
            ngx.sleep(1.5)  -- this old worker keeps serving us while new ones start
        }
    }
    location = /after {
        content_by_lua_block {
            ngx.sleep(0.5)
            local d = ngx.shared.got
            ngx.say("generation: ", require("resty.workerbus").generation())
            ngx.say("handled: ", d:get("handled") > 1000, ", twice: ", d:get("dups") or 0,
                    ", out of order: ", d:get("reordered") or 0,
                    ", failed posts: ", d:get("post_errors") or 0)
        }
    }
--- request eval
["GET /hup", "GET /after"]
--- response_body eval
["HUP sent: true\n", "generation: 2\nhandled: true, twice: 0, out of order: 0, failed posts: 0\n"]
--- no_error_log
[error]
[alert]
exited on signal



=== TEST 4: the status document counts posts, deliveries per worker, claims and wake-ups
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "ev", interval = 10 })
    }
--- config
    location = /status { workerbus_status; }
    location = /t {
        content_by_lua_block {
            local cjson = require "cjson"
            local ev = require "resty.worker.events"
            local function events()
                return cjson.decode(ngx.location.capture("/status").body).zones[1].events
            end
            ngx.sleep(0.3)
            local s0 = events()
            local before = {}
            for _, w in ipairs(s0.workers) do before[w.pid] = w.delivered end
            for i = 1, 10 do assert(ev.post("s", "e", i)) end
            assert(ev.post("s", "e", "once", "key-1"))
            ngx.sleep(0.3)
            local s = events()
            local all = true
            for _, w in ipairs(s.workers) do
                all = all and w.delivered - before[w.pid] == 11 and w.lag == 0
            end
            ngx.say("posted ", s.posted - s0.posted, ", head moved ", s.head_seq - s0.head_seq,
                    ", workers ", #s.workers, " each delivered 11 with no lag: ", all)
            ngx.say("claims won ", s.unique_claims.won - s0.unique_claims.won,
                    ", refused ", s.unique_claims.refused - s0.unique_claims.refused)
            ngx.say("wake-ups sent: ", s.wakeups_sent > s0.wakeups_sent,
                    ", idle again: ", #s.idle_slots, ", lost: ", s.lagged_missed, " ", s.dropped)
        }
    }
--- request
GET /t
--- response_body
posted 11, head moved 11, workers 4 each delivered 11 with no lag: true
claims won 1, refused 3
wake-ups sent: true, idle again: 4, lost: 0 0
--- no_error_log
[error]
