# vim:set ft= ts=4 sw=4 et:
# The event APIs under load and trouble: volume, a worker lapped by the
# ring, a reload in the middle of a stream of events.

use Workerbus::TestCore 'no_plan';

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



=== TEST 2: overflow=overwrite: a stopped worker lapped by the ring gets "lagged" with the exact number of events it lost
--- main_config
    workerbus_zone ev 256k overflow=overwrite;
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
            local T = require "wbtest"
            T.wait_for('every worker to read the "started" events', function() return T.caught_up(4) end, 3)

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
            -- until every worker has accounted for every event, through both APIs
            T.wait(function()
                for w = 0, 3 do
                    local lost = d:get("lost" .. w) or 0
                    if (d:get("handled" .. w) or 0) + lost ~= n or (d:get("rlost" .. w) or 0) ~= lost then
                        return false
                    end
                end
                return true
            end, 8)

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
qr/workerbus: this worker was lapped by the event ring of workerbus zone "ev" and lost \d+ events/
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
            -- this old worker keeps serving us while new ones start, until
            -- none of its generation but it is left to take /after
            local T = require "wbtest"
            local me = ngx.worker.pid()
            T.wait(function()
                local new = 0
                for _, w in ipairs(T.running()) do
                    if w.generation == 2 then new = new + 1 end
                end
                return new == 4
            end, 5)
            T.wait(function() return ngx.worker.exiting() end, 2)
            T.wait(function()
                for _, w in ipairs(T.running()) do
                    if w.generation == 1 and w.pid ~= me then return false end
                end
                return true
            end, 5)
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
--- timeout: 15
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
            local T = require "wbtest"
            T.wait_for("every poller asleep", function() return T.sleeping() == 4 end, 4)
            local s0 = events()
            local before = {}
            for _, w in ipairs(s0.workers) do before[w.pid] = w.delivered end
            for i = 1, 10 do assert(ev.post("s", "e", i)) end
            assert(ev.post("s", "e", "once", "key-1"))
            -- until every worker has read the 11 (and claimed the unique
            -- one or been refused), and every poller is asleep again
            local s
            T.wait(function()
                s = events()
                if #s.idle_slots ~= 4 then return false end
                for _, w in ipairs(s.workers) do
                    if w.delivered - before[w.pid] < 11 or w.lag ~= 0 then return false end
                end
                return s.unique_claims.won + s.unique_claims.refused
                       - s0.unique_claims.won - s0.unique_claims.refused >= 4
            end, 4)
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
--- timeout: 10
--- response_body
posted 11, head moved 11, workers 4 each delivered 11 with no lag: true
claims won 1, refused 3
wake-ups sent: true, idle again: 4, lost: 0 0
--- no_error_log
[error]



=== TEST 5: the original's settings (a 64m lua_shared_dict, interval = 0.01, no workerbus_zone line): a burst of 100,000 64-byte events from one handler loses none, through both APIs
--- http_config
    lua_shared_dict process_events 64m;
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local id = ngx.worker.id()
        local ev = require "resty.worker.events"
        local n, rn = 0, 0
        ev.register(function() n = n + 1; if n % 5000 == 0 then d:set("n" .. id, n) end end, "burst")
        ev.register(function(lost) d:incr("lost", lost, 0) end, "resty-worker-events", "lagged")
        local rev = require("resty.events").new { listening = "unix:/x.sock" }
        rev:subscribe("burst", "*", function() rn = rn + 1; if rn % 5000 == 0 then d:set("rn" .. id, rn) end end)
        rev:subscribe("resty-events", "lagged", function(lost) d:incr("rlost", lost, 0) end)
        assert(rev:init_worker())
        assert(ev.configure { shm = "process_events", interval = 0.01 })
        package.loaded.t_rev = rev
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local rev = package.loaded.t_rev
            local d = ngx.shared.got
            local data = string.rep("x", 64)
            local failed = 0
            -- one handler, no yield: the poster's own reader cannot move meanwhile
            for i = 1, 50000 do
                if not ev.post("burst", "e", data) then failed = failed + 1 end
                if not rev:publish("all", "burst", "e", data) then failed = failed + 1 end
            end
            ngx.update_time()
            local deadline = ngx.now() + 60
            local done = 0
            -- each API's handlers see every event, those of the other API included
            while ngx.now() < deadline and done < 8 do
                done = 0
                for w = 0, 3 do
                    if d:get("n" .. w) == 100000 then done = done + 1 end
                    if d:get("rn" .. w) == 100000 then done = done + 1 end
                end
                ngx.sleep(0.05)
                ngx.update_time()
            end
            ngx.say("posts refused: ", failed)
            for w = 0, 3 do
                ngx.say("worker ", w, ": ", d:get("n" .. w), " + ", d:get("rn" .. w))
            end
            ngx.say("lost: ", d:get("lost") or 0, " ", d:get("rlost") or 0)
        }
    }
--- request
GET /t
--- timeout: 70
--- response_body
posts refused: 0
worker 0: 100000 + 100000
worker 1: 100000 + 100000
worker 2: 100000 + 100000
worker 3: 100000 + 100000
lost: 0 0
--- no_error_log
[error]
[warn]



=== TEST 6: a burst that outgrows the ring: refused at the call, naming the worker that has not read and how far behind it is; every accepted event reaches every worker
--- main_config
    workerbus_zone ev 256k;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local id = ngx.worker.id()
        d:set("pid" .. id, ngx.worker.pid())
        local ev = require "resty.worker.events"
        ev.register(function() d:incr("n" .. id, 1, 0) end, "flood")
        ev.register(function(lost) d:incr("lost", lost, 0) end, "resty-worker-events", "lagged")
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local d = ngx.shared.got
            local T = require "wbtest"
            T.wait_for("every worker reading", function() return T.caught_up(4) end, 5)
            local data = string.rep("x", 64)
            local accepted, first_err = 0, nil
            -- more than the ring holds, without yielding: this worker's own
            -- reader cannot move, so its records must not be overwritten
            for i = 1, 5000 do
                local ok, err = ev.post("flood", "e", data)
                if ok then
                    accepted = accepted + 1
                elseif not first_err then
                    first_err = err
                end
            end
            ngx.say("some accepted, some refused: ", accepted > 500 and accepted < 5000)
            local pat = '^failed posting event "e" by "flood"; the event ring is full: worker process '
                        .. '(%d+) %(reader %d+%) has not read the last (%d+) events yet and '
                        .. 'this one would overwrite the oldest of them %(workerbus zone "ev", ring of '
                        .. require("resty.workerbus").status().zones[1].events.capacity
                        .. ' bytes: make the zone larger, or let the ring overwrite with '
                        .. 'overflow=overwrite%)$'
            local pid, behind = (first_err or ""):match(pat)
            local known = false
            for w = 0, 3 do known = known or tonumber(pid) == d:get("pid" .. w) end
            behind = tonumber(behind)
            ngx.say("the error names a worker and how far behind it is: ",
                    known and behind ~= nil and behind > 0 and behind <= accepted)
            if not known then ngx.say(first_err) end
            ngx.update_time()
            local deadline = ngx.now() + 10
            while ngx.now() < deadline do
                local all = true
                for w = 0, 3 do all = all and d:get("n" .. w) == accepted end
                if all then break end
                ngx.sleep(0.02)
                ngx.update_time()
            end
            for w = 0, 3 do
                ngx.say("worker ", w, " handled every accepted event: ", d:get("n" .. w) == accepted)
            end
            ngx.say("lost: ", d:get("lost") or 0)
            local st = require("resty.workerbus").status().zones[1].events
            ngx.say("refused counted: ", st.refused == 5000 - accepted, ", overflow: ", st.overflow)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
some accepted, some refused: true
the error names a worker and how far behind it is: true
worker 0 handled every accepted event: true
worker 1 handled every accepted event: true
worker 2 handled every accepted event: true
worker 3 handled every accepted event: true
lost: 0
refused counted: true, overflow: refuse
--- no_error_log
[warn]



=== TEST 7: a hung worker never blocks posting: once it is reported hung it is lapped, and told the exact count when it resumes
--- main_config
    workerbus_zone ev 256k;
    workerbus_heartbeat 100ms;
    workerbus_hang_timeout 500ms;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local id = ngx.worker.id()
        d:set("pid" .. id, ngx.worker.pid())
        local ev = require "resty.worker.events"
        ev.register(function() d:incr("handled" .. id, 1, 0) end, "flood")
        ev.register(function(lost) d:incr("lost" .. id, lost, 0) end, "resty-worker-events", "lagged")
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            local ev = require "resty.worker.events"
            local wb = require "resty.workerbus"
            local d = ngx.shared.got
            local T = require "wbtest"
            local wait = T.wait
            T.wait_for("every worker reading", function() return T.caught_up(4) end, 5)
            local victim = (ngx.worker.id() + 1) % 4
            local vpid = d:get("pid" .. victim)
            ffi.C.kill(vpid, 19)   -- SIGSTOP
            ngx.say("reported hung: ", wait(function()
                for _, w in ipairs(wb.status().workers) do
                    if w.pid == vpid then return w.state == "hung" end
                end
            end))
            local data = string.rep("x", 200)
            local n, target = 0, 3000     -- several times what the ring holds
            local named = 0
            -- (a responsive worker that falls behind on this loaded machine
            -- may refuse a post: then retry; the hung one must never be why)
            while n < target do
                local ok, err = ev.post("flood", "e", data)
                if ok then
                    n = n + 1
                    if n % 50 == 0 then ngx.sleep(0.001) end
                else
                    if err:find("worker process " .. vpid .. " ", 1, true) then named = named + 1 end
                    ngx.sleep(0.001)
                end
            end
            ngx.say("posts refused because of the hung worker: ", named)
            ffi.C.kill(vpid, 18)   -- SIGCONT
            ngx.say("every worker accounted for every event: ", wait(function()
                for w = 0, 3 do
                    if (d:get("handled" .. w) or 0) + (d:get("lost" .. w) or 0) ~= n then return false end
                end
                return true
            end))
            ngx.say("the hung worker was told it lost events: ", (d:get("lost" .. victim) or 0) > 0)
            local others = 0
            for w = 0, 3 do
                if w ~= victim then others = others + (d:get("lost" .. w) or 0) end
            end
            ngx.say("the others lost: ", others)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
reported hung: true
posts refused because of the hung worker: 0
every worker accounted for every event: true
the hung worker was told it lost events: true
the others lost: 0



=== TEST 8: overflow=overwrite: the ring overwrites its oldest records, and a lapped worker gets one "lagged" per gap with the whole count; the log line is rate-limited
--- main_config
    workerbus_zone ev 256k overflow=overwrite;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local id = ngx.worker.id()
        d:set("pid" .. id, ngx.worker.pid())
        local ev = require "resty.worker.events"
        local last = "none"
        ev.register(function(data, event, source)
            if source == "flood" then
                d:incr("handled" .. id, 1, 0)
                last = "event"
            elseif event == "lagged" then
                d:incr("lost" .. id, data, 0)
                d:incr("notices" .. id, 1, 0)
                if last == "lagged" then
                    d:incr("twice" .. id, 1, 0)   -- two notices with no event between: one gap split
                end
                last = "lagged"
            end
        end)
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            local ev = require "resty.worker.events"
            local d = ngx.shared.got
            local T = require "wbtest"
            T.wait_for("every worker reading", function() return T.caught_up(4) end, 5)
            local victim = (ngx.worker.id() + 1) % 4
            local vpid = d:get("pid" .. victim)
            ffi.C.kill(vpid, 19)   -- SIGSTOP
            local data = string.rep("x", 300)
            local n = 0
            for i = 1, 2000 do
                assert(ev.post("flood", "e", data))
                n = n + 1
                if i % 50 == 0 then ngx.sleep(0.001) end
            end
            ffi.C.kill(vpid, 18)   -- SIGCONT
            -- keep lapping it while it catches up
            for i = 1, 4000 do
                assert(ev.post("flood", "e", data))
                n = n + 1
                if i % 20 == 0 then ngx.sleep(0) end
            end
            ngx.update_time()
            local deadline = ngx.now() + 10
            local function settled()
                for w = 0, 3 do
                    if (d:get("handled" .. w) or 0) + (d:get("lost" .. w) or 0) ~= n then return false end
                end
                return true
            end
            while not settled() and ngx.now() < deadline do
                ngx.sleep(0.02)
                ngx.update_time()
            end
            ngx.say("handled + lost = posted at every worker: ", settled())
            ngx.say("the stopped worker lost events: ", (d:get("lost" .. victim) or 0) > 0)
            local split = 0
            for w = 0, 3 do split = split + (d:get("twice" .. w) or 0) end
            ngx.say("gaps reported in pieces: ", split)
            local st = require("resty.workerbus").status().zones[1].events
            ngx.say("overflow: ", st.overflow, ", refused: ", st.refused)
            local missed = 0
            for _, w in ipairs(st.workers) do
                if w.pid == vpid then missed = w.missed end
            end
            ngx.say("status agrees: ", missed == d:get("lost" .. victim))
            -- the log: at most one "lapped" line per worker within 10 s
            local per, lines = {}, 0
            for line in io.lines(ngx.config.prefix() .. "logs/error.log") do
                local pid = line:match("%[warn%] (%d+)#%d+: .-workerbus: this worker was lapped")
                if pid then
                    per[pid] = (per[pid] or 0) + 1
                    lines = lines + 1
                end
            end
            local most = 0
            for _, n in pairs(per) do most = math.max(most, n) end
            ngx.say("lapped lines: some: ", lines > 0, ", at most one per worker: ", most == 1)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
handled + lost = posted at every worker: true
the stopped worker lost events: true
gaps reported in pieces: 0
overflow: overwrite, refused: 0
status agrees: true
lapped lines: some: true, at most one per worker: true
--- no_error_log
worker-events: this worker was lapped



=== TEST 9: a writer killed in the middle of a post: logged once as a warning with its pid; the others go on
--- main_config
    workerbus_zone ev 1m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local ev = require "resty.worker.events"
        ev.register(function() d:incr("n", 1, 0) end, "after")
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /die {
        content_by_lua_block {
            local ffi = require "ffi"
            local wb = require "resty.workerbus"
            -- never the worker serving /t: its death would end the test's own request
            if ngx.shared.got:get("asker") == ngx.worker.pid() then
                return ngx.exit(409)
            end
            -- a test hook: only in the module `make test` builds (feature test-hooks)
            pcall(ffi.cdef, "int workerbus_test_die_mid_post(int zone);")
            if not pcall(function() return ffi.C.workerbus_test_die_mid_post end) then
                ngx.log(ngx.ERR, "this module has no test hooks: build it with ",
                        "cargo's --features test-hooks (make test loads build/test-hooks/)")
                return ngx.exit(500)
            end
            ngx.shared.got:set("victim", ngx.worker.pid())
            ffi.C.workerbus_test_die_mid_post(wb.zone("ev"))
        }
    }
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local d = ngx.shared.got
            d:set("asker", ngx.worker.pid())
            ngx.update_time()
            local deadline = ngx.now() + 10
            repeat   -- until another worker took /die (it answers 409 in this one)
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", ngx.var.server_port))
                assert(sock:send("GET /die HTTP/1.0\r\nHost: x\r\n\r\n"))
                local reply = sock:receive("*a")   -- the connection closes when the worker dies
                sock:close()
                ngx.update_time()
            until not (reply or ""):find("409", 1, true) or ngx.now() > deadline
            local function gone()
                local st = require("resty.workerbus").status().zones[1].events
                return st.dropped == 1
            end
            local ok
            repeat
                ok = ev.post("after", "e", "x")
                ngx.sleep(0.05)
                ngx.update_time()
            until (ok and gone()) or ngx.now() > deadline
            ngx.say("posting works after the death: ", ok and true, ", counted: ", gone())
            ngx.sleep(2.5)   -- two heartbeats: the warning is not repeated
            ngx.say("victim was another worker: ", d:get("victim") ~= ngx.worker.pid())
        }
    }
--- request
GET /t
--- timeout: 20
--- grep_error_log eval: qr/workerbus: zone "ev": a writer \(pid \d+\) died mid-post; its event was not published/
--- grep_error_log_out eval
qr/\Aworkerbus: zone "ev": a writer \(pid \d+\) died mid-post; its event was not published\n\z/
--- response_body
posting works after the death: true, counted: true
victim was another worker: true



=== TEST 10: a reload's old worker still serving a request reads no more events, so it never holds up the new workers' posts
--- main_config
    workerbus_zone ev 256k;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local gen = require("resty.workerbus").generation()
        local ev = require "resty.worker.events"
        ev.register(function() d:incr("handled:" .. gen .. ":" .. ngx.worker.id(), 1, 0) end, "flood")
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /flood {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local data = string.rep("x", 200)
            local named = 0
            for i = 1, 3000 do      -- several times what the ring holds
                local ok, err = ev.post("flood", "e", data)
                if not ok and err:find("worker process " .. ngx.var.arg_old .. " ", 1, true) then
                    named = named + 1
                end
                if i % 20 == 0 then ngx.sleep(0.001) end
            end
            ngx.say("refused_for_old=", named)
        }
    }
    location = /t {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            local wb = require "resty.workerbus"
            local d = ngx.shared.got
            local T = require "wbtest"
            T.wait_for("4 running workers", function() return #T.running() == 4 end, 5)
            local n = #wb.status().workers
            ffi.C.kill(require("ngx.process").get_master_pid(), 1)   -- HUP
            ngx.update_time()
            local deadline = ngx.now() + 10
            local new
            repeat
                new = 0
                for _, w in ipairs(wb.status().workers) do
                    if w.generation == 2 and w.state == "running" then new = new + 1 end
                end
                ngx.sleep(0.02)
                ngx.update_time()
            until new == n or ngx.now() > deadline
            -- this old worker no longer listens: a new one serves the flood
            local sock = ngx.socket.tcp()
            sock:settimeout(30000)
            assert(sock:connect("127.0.0.1", ngx.var.server_port))
            assert(sock:send("GET /flood?old=" .. ngx.worker.pid() .. " HTTP/1.0\r\nHost: x\r\n\r\n"))
            local body = sock:receive("*a") or ""
            sock:close()
            ngx.say("old worker still here: ", ngx.worker.exiting())
            ngx.say(body:match("refused_for_old=[^\r\n]*"))
        }
    }
--- request
GET /t
--- timeout: 60
--- response_body
old worker still here: true
refused_for_old=0



=== TEST 11: a dead worker never blocks posting: its reader is lapped at once, before any heartbeat notices the death
--- main_config
    workerbus_zone ev 256k;
    workerbus_heartbeat 1h;
    workerbus_hang_timeout 1h;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local id = ngx.worker.id()
        d:set("pid" .. id, ngx.worker.pid())
        local ev = require "resty.worker.events"
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            local ev = require "resty.worker.events"
            local d = ngx.shared.got
            local T = require "wbtest"
            T.wait_for("every worker reading", function() return T.caught_up(4) end, 5)
            local victim = d:get("pid" .. (ngx.worker.id() + 1) % 4)
            ffi.C.kill(victim, 19)   -- SIGSTOP: it stops reading, its heartbeat cannot tell (1h)
            local data = string.rep("x", 200)
            local function flood()
                local named = 0
                for i = 1, 2000 do
                    local ok, err = ev.post("flood", "e", data)
                    if not ok and err:find("worker process " .. victim .. " ", 1, true) then
                        named = named + 1
                    end
                    if i % 20 == 0 then ngx.sleep(0.001) end
                end
                return named
            end
            ngx.say("a stopped (alive, heartbeat not overdue) worker blocks: ", flood() > 0)
            ffi.C.kill(victim, 9)
            ngx.update_time()
            local deadline = ngx.now() + 10
            while ffi.C.kill(victim, 0) == 0 and ngx.now() < deadline do   -- until the master reaps it
                ngx.sleep(0.01)
                ngx.update_time()
            end
            ngx.say("once dead, posts refused because of it: ", flood())
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
a stopped (alive, heartbeat not overdue) worker blocks: true
once dead, posts refused because of it: 0



=== TEST 12: interval = 0 after a poller ran (manual poll() from then on): the worker no longer holds up posts; a full ring laps it and tells it
--- main_config
    workerbus_zone ev 256k;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local ev = require "resty.worker.events"
        ev.register(function(n) d:incr("lost" .. ngx.worker.id(), n, 0) end, "resty-worker-events", "lagged")
        assert(ev.configure { shm = "ev", interval = 0.01 })
        assert(ngx.timer.at(0.2, function()
            assert(ev.configure { interval = 0 })
            d:incr("manual", 1, 0)
        end))
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local d = ngx.shared.got
            ngx.update_time()
            local deadline = ngx.now() + 10
            local function pollers()
                local n = 0
                for _, w in ipairs(require("resty.workerbus").status().zones[1].events.workers) do
                    if w.poller then n = n + 1 end
                end
                return n
            end
            -- every worker switched, and its poller stopped
            while ((d:get("manual") or 0) < 4 or pollers() > 0) and ngx.now() < deadline do
                ngx.sleep(0.02)
                ngx.update_time()
            end
            ngx.say("pollers left: ", pollers())
            local data = string.rep("x", 200)
            local refused = 0
            for i = 1, 2000 do
                if not ev.post("flood", "e", data) then refused = refused + 1 end
            end
            ngx.say("refused: ", refused)
            ev.poll()
            ngx.say("this worker was told it lost events: ", (d:get("lost" .. ngx.worker.id()) or 0) > 0)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
pollers left: 0
refused: 0
this worker was told it lost events: true
--- no_error_log
[error]



=== TEST 13: a worker's own post wakes its own sleeping poller in place, through its semaphore, without a datagram (local_wakeups): wakeups_sent counts the other workers' only, each woken through its slot's eventfd
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(data)
            ngx.shared.got:set("got:" .. ngx.worker.pid(), data)
        end, "own")
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest"
            local wb = require "resty.workerbus"
            local ev = require "resty.worker.events"
            local got = ngx.shared.got
            local me = ngx.worker.pid()
            local function events() return wb.status().zones[1].events end
            local function mine(s)
                for _, w in ipairs(s.workers) do
                    if w.pid == me then return w end
                end
            end
            local function handled()
                local s = events()
                for _, w in ipairs(s.workers) do
                    if got:get("got:" .. w.pid) ~= "hello" then return false end
                end
                return #s.idle_slots == 4
            end
            T.wait_for("4 sleeping pollers", function()
                local s = events()
                return #s.workers == 4 and #s.idle_slots == 4
            end)
            local st0 = wb.status()
            local s0, local0 = events(), st0.local_wakeups
            assert(ev.post("own", "e", "hello"))
            T.wait_for("every worker's handler, then every poller asleep again", handled)
            local s, st = events(), wb.status()
            ngx.say("own handler got: ", got:get("got:" .. me))
            ngx.say("wake-ups sent: ", s.wakeups_sent - s0.wakeups_sent,
                    ", by eventfd: ", st.wakeups_by_eventfd - st0.wakeups_by_eventfd,
                    ", by datagram: ", st.wakeups_by_datagram - st0.wakeups_by_datagram)
            ngx.say("own poller woken: ", mine(s).wakeups - mine(s0).wakeups,
                    ", in place: ", wb.status().local_wakeups - local0)
        }
    }
--- request
GET /t
--- response_body
own handler got: hello
wake-ups sent: 3, by eventfd: 3, by datagram: 0
own poller woken: 1, in place: 1
--- no_error_log
[error]



=== TEST 14: a post that wakes its own poller holds the other workers' wake-ups until its first handler returned, unless the last one took more than 50 us of CPU time (own_handler_us): then they go out at once
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ffi = require "ffi"
        pcall(ffi.cdef, [[
            typedef struct { long tv_sec; long tv_nsec; } t102_ts;
            int clock_gettime(int clk, t102_ts *ts);
        ]])
        local ts = ffi.new("t102_ts")
        local function now_us()   -- CLOCK_MONOTONIC: one clock for every process
            ffi.C.clock_gettime(1, ts)
            return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
        end
        package.loaded.t102_now_us = now_us
        local function cpu_us()   -- CLOCK_THREAD_CPUTIME_ID: what the module times
            ffi.C.clock_gettime(3, ts)
            return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
        end
        local ev = require "resty.worker.events"
        ev.register(function(data)
            local got = ngx.shared.got
            if ngx.worker.pid() == got:get("poster") then
                got:set("own_start:" .. data.round, now_us())
                -- busy for busy_ms of CPU time, however long a loaded
                -- machine makes that take
                local stop = cpu_us() + data.busy_ms * 1000
                while cpu_us() < stop do end
                got:set("own_end:" .. data.round, now_us())
            else
                got:set("other:" .. data.round .. ":" .. ngx.worker.pid(), now_us())
            end
        end, "hold")
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local T = require "wbtest"
            local wb = require "resty.workerbus"
            local ev = require "resty.worker.events"
            local got = ngx.shared.got
            local me = ngx.worker.pid()
            got:set("poster", me)
            local function events() return wb.status().zones[1].events end
            local function asleep()
                local s = events()
                return #s.workers == 4 and #s.idle_slots == 4
            end
            -- The other workers' handlers of a round: how many started
            -- after the own handler ended, and how many before.
            local function round(r, busy_ms)
                T.wait_for("4 sleeping pollers", asleep)
                assert(ev.post("hold", "e", { round = r, busy_ms = busy_ms }))
                local others = {}
                T.wait_for("round " .. r .. " handled everywhere", function()
                    others = {}
                    for _, w in ipairs(events().workers) do
                        if w.pid ~= me then
                            others[#others + 1] = got:get("other:" .. r .. ":" .. w.pid)
                        end
                    end
                    return #others == 3 and got:get("own_end:" .. r) ~= nil
                end)
                local after, before = 0, 0
                for _, t in ipairs(others) do
                    if t > got:get("own_end:" .. r) then after = after + 1 else before = before + 1 end
                end
                return after, before
            end
            local r = 0
            -- Fast rounds until one is timed at 50 us or less (a loaded
            -- machine may stretch one past it).
            local function fast()
                for _ = 1, 100 do
                    r = r + 1
                    round(r, 0)
                    if wb.status().own_handler_us <= 50 then return true end
                end
                return false
            end
            local function slow()
                r = r + 1
                return round(r, 300)
            end
            ngx.say("a fast own handler timed: ", fast())
            ngx.say("slow, after a fast one: started after the own handler: ", (slow()))
            ngx.say("own_handler_us at least 300000: ", wb.status().own_handler_us >= 300000)
            local _, before = slow()
            ngx.say("slow, after a slow one: started before the own handler ended: ", before)
            ngx.say("a fast own handler timed again: ", fast())
            ngx.say("slow, after it: started after the own handler: ", (slow()))
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
a fast own handler timed: true
slow, after a fast one: started after the own handler: 3
own_handler_us at least 300000: true
slow, after a slow one: started before the own handler ended: 3
a fast own handler timed again: true
slow, after it: started after the own handler: 3
--- no_error_log
[error]



=== TEST 15: workers of one generation wake each other through their slots' eventfds, a respawned worker too (it inherits its slot's); an old generation's worker wakes the new one's by datagram
--- main_config
    workerbus_zone ev 4m;
    workerbus_heartbeat 1h;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        local g = require("resty.workerbus").generation()
        ev.register(function(data)
            ngx.shared.got:set(data .. ":" .. g .. ":" .. ngx.worker.pid(), true)
        end, "efd")
        assert(ev.configure { shm = "ev", interval = 0.01 })
    }
--- config
    location = /post {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            if ngx.worker.pid() == tonumber(ngx.var.arg_not) then
                return ngx.say("again")
            end
            local T = require "wbtest"
            local g = wb.generation()
            -- every poller of this generation asleep (the reload's and the
            -- respawn's own events are handled by then)
            T.wait_for("4 sleeping pollers", function() return T.sleeping(g) == 4 end)
            local st0 = wb.status()
            assert(require("resty.worker.events").post("efd", "e", ngx.var.arg_i))
            T.wait_for("every worker of this generation", function()
                for _, w in ipairs(T.running()) do
                    if w.generation == g and not ngx.shared.got:get(ngx.var.arg_i .. ":" .. g .. ":" .. w.pid) then
                        return false
                    end
                end
                return true
            end)
            local st = wb.status()
            ngx.say("generation ", g, ": by eventfd ", st.wakeups_by_eventfd - st0.wakeups_by_eventfd,
                    ", by datagram ", st.wakeups_by_datagram - st0.wakeups_by_datagram)
        }
    }
    location = /t {
        content_by_lua_block {
            local T = require "wbtest"
            local wb = require "resty.workerbus"
            local me = ngx.worker.pid()
            local get = require("wbtest").get
            local function idle(g, n)
                return function() return T.sleeping(g) == n end
            end
            T.wait_for("4 sleeping pollers", idle(1, 4))
            ngx.print(get("/post?i=1"))
            -- a worker of another slot killed: the master forks its successor,
            -- which inherits the generation's eventfds
            local victim
            for _, w in ipairs(T.running()) do
                if w.pid ~= me then victim = w.pid break end
            end
            T.kill(victim, 9)
            T.wait_for("the respawned worker", function()
                local r = T.running()
                if #r ~= 4 then return false end
                for _, w in ipairs(r) do
                    if w.pid == victim then return false end
                end
                return true
            end)
            T.wait_for("4 sleeping pollers again", idle(1, 4))
            ngx.print(get("/post?i=2&not=" .. victim))
            -- a reload: this worker (generation 1) keeps serving this request
            T.kill(require("ngx.process").get_master_pid(), 1)
            T.wait_for("the new generation asleep", idle(2, 4))
            T.wait_for("this worker told to quit", function() return ngx.worker.exiting() end)
            T.wait_for("the old generation's other workers gone", function()
                for _, w in ipairs(T.running()) do
                    if w.generation == 1 and w.pid ~= me then return false end
                end
                return true
            end)
            local body
            repeat body = get("/post?i=3&not=" .. me) until body ~= "again\n"
            ngx.print(body)
            -- this old worker posts: the new generation's 4 are woken by datagram
            T.wait_for("the new generation asleep again", idle(2, 4))
            local st0 = wb.status()
            assert(require("resty.worker.events").post("efd", "e", "4"))
            T.wait_for("the new generation's handlers", function()
                local k = 0
                for _, w in ipairs(T.running()) do
                    if w.generation == 2 and ngx.shared.got:get("4:2:" .. w.pid) then k = k + 1 end
                end
                return k == 4
            end)
            local st = wb.status()
            ngx.say("old generation 1: by eventfd ", st.wakeups_by_eventfd - st0.wakeups_by_eventfd,
                    ", by datagram ", st.wakeups_by_datagram - st0.wakeups_by_datagram)
        }
    }
--- request
GET /t
--- timeout: 60
--- response_body
generation 1: by eventfd 3, by datagram 0
generation 1: by eventfd 3, by datagram 0
generation 2: by eventfd 3, by datagram 0
old generation 1: by eventfd 0, by datagram 4
--- error_log
crashed: gone without exiting
--- no_error_log
[crit]
[emerg]
open socket
