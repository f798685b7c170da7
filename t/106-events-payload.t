# vim:set ft= ts=4 sw=4 et:
# resty.events' max_payload_len (issue 19): measured, as lua-resty-events
# measures it, on the frame its worker would send to its broker (the event
# {source, event, data, wid} serialized, then serialized again inside
# {spec = {unique}, data}; docs/events.md). The expected lengths below were
# computed by running lua-resty-events 0.3.1's own worker.lua publish on
# this LuaJIT (2.1-20230119, string.buffer), not by this implementation.

use Workerbus::TestCore 'no_plan';

workers(2);
master_on();
no_long_string();
run_tests();

__DATA__

=== TEST 1: the issue's example: "all", content_by_lua/request1, 200 bytes of data, max_payload_len 200 is refused
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local ev = require("resty.events").new { listening = "unix:/x.sock", max_payload_len = 200 }
            ngx.say(ev:publish("all", "content_by_lua", "request1", string.rep("a", 200)))
            -- frames of 199 and 201 bytes (no data length makes 200: the
            -- event string's length prefix grows from 1 to 2 bytes at 192)
            ngx.say(ev:publish("all", "content_by_lua", "request1", string.rep("a", 147)))
            ngx.say(ev:publish("all", "content_by_lua", "request1", string.rep("a", 148)))
        }
    }
--- request
GET /t
--- response_body
nilfailed to publish event: payload exceeds the limitation (200)
true
nilfailed to publish event: payload exceeds the limitation (200)
--- no_error_log
[error]



=== TEST 2: the measured frame length matches the original's for strings, nil and tables (dictionary keys in data included), "all" and unique
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local len = require("resty.events")._frame_len
            local R = string.rep
            local cases = {
                { "all", "s", "e", nil, 29 },
                { "k", "s", "e", nil, 34 },
                { "all", "content_by_lua", "request1", nil, 49 },
                { "all", "s", "e", {}, 32 },
                { "all", "s", "e", { a = 1 }, 44 },
                { "all", "s", "e", { data = 1 }, 44 },
                { "all", "s", "e", { x = R("a", 100), list = { 1, 2, 3 }, ok = true }, 174 },
                { "k", "s", "e", { x = R("a", 100), list = { 1, 2, 3 }, ok = true }, 179 },
                { "unique-key", "content_by_lua", "request1", { source = R("b", 150) }, 221 },
                { "all", "s", "e", 'a/"b', 36 },
            }
            for _, n in ipairs { 0, 68, 69, 100, 134, 135, 147, 148, 191, 192 } do
                local s = R("a", n)
                cases[#cases + 1] = { "all", "s", "e", s, nil, n }
                cases[#cases + 1] = { "all", "content_by_lua", "request1", s, nil, n }
                cases[#cases + 1] = { "unique-key", "content_by_lua", "request1", s, nil, n }
            end
            for _, c in ipairs(cases) do
                local unique = c[1] ~= "all" and c[1] or nil
                local got = len(c[2], c[3], c[4], unique)
                if c[5] then
                    ngx.say(c[1], " ", c[2], "/", c[3], " ", type(c[4]), ": ", got,
                            got == c[5] and "" or " (expected " .. c[5] .. ")")
                else
                    ngx.print(got, c[1] == "unique-key" and "\n" or " ")
                end
            end
        }
    }
--- request
GET /t
--- response_body
all s/e nil: 29
k s/e nil: 34
all content_by_lua/request1 nil: 49
all s/e table: 32
all s/e table: 44
all s/e table: 44
all s/e table: 174
k s/e table: 179
unique-key content_by_lua/request1 table: 221
all s/e string: 36
32 52 66
100 120 134
101 121 135
132 152 166
166 186 200
167 187 201
179 199 213
180 201 215
224 244 258
226 246 260
--- no_error_log
[error]



=== TEST 3: string data, one byte below, at and above the limit, for "all" and a unique target, small and default limits
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local events = require "resty.events"
            local objs = {}
            local function ev(max)
                objs[max] = objs[max] or events.new { listening = "unix:/x.sock", max_payload_len = max }
                return objs[max]
            end
            -- max, target, source, event, data lengths (frame max-1, max, max+1)
            local cases = {
                { 100, "all", "s", "e", { 67, 68, 69 } },
                { 199, "all", "content_by_lua", "request1", { 146, 147, 148 } },
                { 200, "unique-key", "content_by_lua", "request1", { 133, 134, 135 } },
                { 65536, "all", "s", "e", { 65495, 65496, 65497 } },
                { 65536, "k", "source", "event", { 65481, 65482, 65483 } },
                { nil, "all", "s", "e", { 65495, 65496, 65497 } },  -- the default: 65536
            }
            for _, c in ipairs(cases) do
                local o = c[1] and ev(c[1]) or events.new { listening = "unix:/x.sock" }
                for i, n in ipairs(c[5]) do
                    local target = c[2]
                    local ok, err = o:publish(target, c[3], c[4], string.rep("x", n))
                    ngx.say(o.opts.max_payload_len, " ", c[2], " ", c[3], "/", c[4], " ",
                            n, " bytes (frame ", events._frame_len(c[3], c[4], string.rep("x", n),
                            c[2] ~= "all" and target or nil), "): ", tostring(ok), " ", tostring(err))
                end
            end
        }
    }
--- request
GET /t
--- response_body
100 all s/e 67 bytes (frame 99): true nil
100 all s/e 68 bytes (frame 100): true nil
100 all s/e 69 bytes (frame 101): nil failed to publish event: payload exceeds the limitation (100)
199 all content_by_lua/request1 146 bytes (frame 198): true nil
199 all content_by_lua/request1 147 bytes (frame 199): true nil
199 all content_by_lua/request1 148 bytes (frame 201): nil failed to publish event: payload exceeds the limitation (199)
200 unique-key content_by_lua/request1 133 bytes (frame 199): true nil
200 unique-key content_by_lua/request1 134 bytes (frame 200): true nil
200 unique-key content_by_lua/request1 135 bytes (frame 201): nil failed to publish event: payload exceeds the limitation (200)
65536 all s/e 65495 bytes (frame 65535): true nil
65536 all s/e 65496 bytes (frame 65536): true nil
65536 all s/e 65497 bytes (frame 65537): nil failed to publish event: payload exceeds the limitation (65536)
65536 k source/event 65481 bytes (frame 65535): true nil
65536 k source/event 65482 bytes (frame 65536): true nil
65536 k source/event 65483 bytes (frame 65537): nil failed to publish event: payload exceeds the limitation (65536)
65536 all s/e 65495 bytes (frame 65535): true nil
65536 all s/e 65496 bytes (frame 65536): true nil
65536 all s/e 65497 bytes (frame 65537): nil failed to publish event: payload exceeds the limitation (65536)
--- no_error_log
[error]



=== TEST 4: nil and table data at, and one byte over, the limit (a limit one below the frame refuses it); dictionary keys inside data count as the original counts them
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local events = require "resty.events"
            local R = string.rep
            -- target, source, event, data, the original's frame length
            local cases = {
                { "all", "s", "e", nil, 29 },
                { "k", "s", "e", nil, 34 },
                { "all", "s", "e", { x = R("a", 100), list = { 1, 2, 3 }, ok = true }, 174 },
                { "k", "s", "e", { x = R("a", 100), list = { 1, 2, 3 }, ok = true }, 179 },
                { "unique-key", "content_by_lua", "request1", { source = R("b", 150) }, 221 },
            }
            for _, c in ipairs(cases) do
                for _, max in ipairs { c[5] + 1, c[5], c[5] - 1 } do
                    local ev = events.new { listening = "unix:/x.sock", max_payload_len = max }
                    ngx.say(c[1], " ", type(c[4]), " max ", max, ": ",
                            tostring(ev:publish(c[1], c[2], c[3], c[4])))
                end
            end
            local ev = events.new { listening = "unix:/x.sock", max_payload_len = 100.5 }
            ngx.say(ev:publish("all", "s", "e", R("a", 68)))
            ngx.say(ev:publish("all", "s", "e", R("a", 69)))
        }
    }
--- request
GET /t
--- response_body
all nil max 30: true
all nil max 29: true
all nil max 28: nil
k nil max 35: true
k nil max 34: true
k nil max 33: nil
all table max 175: true
all table max 174: true
all table max 173: nil
k table max 180: true
k table max 179: true
k table max 178: nil
unique-key table max 222: true
unique-key table max 221: true
unique-key table max 220: nil
true
nilfailed to publish event: payload exceeds the limitation (100.5)
--- no_error_log
[error]



=== TEST 5: "current" is never measured (the original queues it as is); nor is anything with testing = true
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_worker_by_lua_block {
        local events = require "resty.events"
        local ev = events.new { listening = "unix:/x.sock", max_payload_len = 10 }
        local t = events.new { listening = "unix:/x.sock", max_payload_len = 10, testing = true }
        package.loaded.t_got = {}
        for _, o in ipairs { ev, t } do
            o:subscribe("s", "*", function(data, event)
                table.insert(package.loaded.t_got, event .. " " .. #data)
            end)
        end
        assert(ev:init_worker())
        assert(t:init_worker())
        package.loaded.t_ev, package.loaded.t_t = ev, t
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev, t = package.loaded.t_ev, package.loaded.t_t
            ngx.say("all: ", ev:publish("all", "s", "big", string.rep("a", 1000)))
            ngx.say("current: ", ev:publish("current", "s", "current", string.rep("a", 1000)))
            ngx.say("testing: ", t:publish("all", "s", "testing", string.rep("a", 1000)))
            local deadline = ngx.now() + 10
            while #package.loaded.t_got < 2 and ngx.now() < deadline do
                ngx.sleep(0.005)
                ngx.update_time()
            end
            table.sort(package.loaded.t_got)
            ngx.say(table.concat(package.loaded.t_got, ", "))
        }
    }
--- request
GET /t
--- response_body
all: nilfailed to publish event: payload exceeds the limitation (10)
current: true
testing: true
current 1000, testing 1000
--- no_error_log
[error]



=== TEST 6: events at the limit are delivered intact to every worker ("all") and to one (unique)
--- main_config
    workerbus_zone ev 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require("resty.events").new { listening = "unix:/x.sock" }
        ev:subscribe("s", "*", function(data, event)
            local ok = type(data) == "string" and data == string.rep("x", #data)
                       or type(data) == "table" and data.source == string.rep("b", 150)
            ngx.shared.got:incr(event .. " " .. (type(data) == "string" and #data or "table")
                                .. " " .. tostring(ok), 1, 0)
        end)
        assert(ev:init_worker())
        package.loaded.t_ev = ev
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = package.loaded.t_ev
            ngx.say(ev:publish("all", "s", "all", string.rep("x", 65494)))  -- frame 65536
            ngx.say(ev:publish("all", "s", "all", string.rep("x", 65495)))  -- frame 65537
            ngx.say(ev:publish("one", "s", "one", string.rep("x", 65487)))  -- frame 65536
            ngx.say(ev:publish("one", "s", "one", string.rep("x", 65488)))  -- frame 65537
            ngx.say(ev:publish("tbl", "s", "tbl", { source = string.rep("b", 150) }))
            local got = ngx.shared.got
            local deadline = ngx.now() + 10
            while ((got:get("all 65494 true") or 0) < 2
                   or not got:get("one 65487 true") or not got:get("tbl table true"))
                  and ngx.now() < deadline do
                ngx.sleep(0.005)
                ngx.update_time()
            end
            ngx.sleep(0.1)  -- nothing more arrives (a second copy of a unique event)
            local keys = got:get_keys()
            table.sort(keys)
            for _, k in ipairs(keys) do
                ngx.say(k, ": ", got:get(k))
            end
        }
    }
--- request
GET /t
--- response_body
true
nilfailed to publish event: payload exceeds the limitation (65536)
true
nilfailed to publish event: payload exceeds the limitation (65536)
true
all 65494 true: 2
one 65487 true: 1
tbl table true: 1
--- no_error_log
[error]



=== TEST 7: the frame's own bound (2^24 - 1, its 3-byte length) comes first: "payload too big", even with max_payload_len at its 16 MiB maximum; below it, the ring's limit
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local events = require "resty.events"
            local ev = events.new { listening = "unix:/x.sock", max_payload_len = 16 * 1024 * 1024 }
            ngx.say(events._frame_len("s", "e", string.rep("a", 16777175)))
            ngx.say(ev:publish("all", "s", "e", string.rep("a", 16777176)))
            ngx.say(ev:publish("k", "s", "e", string.rep("a", 16777176)))
            ngx.say(ev:publish("all", "s", "e", string.rep("a", 17 * 1024 * 1024)))
            local ok, err = ev:publish("all", "s", "e", string.rep("a", 16777175))
            ngx.say(ok, " ", (err:gsub("maximum of %d+ bytes", "maximum of M bytes")))
            ev = events.new { listening = "unix:/x.sock", max_payload_len = 16777214 }
            ngx.say(ev:publish("all", "s", "e", string.rep("a", 16777175)))
        }
    }
--- request
GET /t
--- response_body
16777215
nilfailed to publish event: payload too big
nilfailed to publish event: payload too big
nilfailed to publish event: payload too big
nil failed to publish event: event of 16777177 bytes (source 1 + event 1 + unique 0 + data 16777175) is larger than the maximum of M bytes of workerbus zone "ev"
nilfailed to publish event: payload exceeds the limitation (16777214)
--- no_error_log
[error]



=== TEST 8: the option: its default, its 16 MiB maximum, and the original's errors (raised by new)
--- main_config
    workerbus_zone ev 4m;
--- config
    location = /t {
        content_by_lua_block {
            local events = require "resty.events"
            local L = "unix:/x.sock"
            for _, m in ipairs { "1", true, 0, -1, 16 * 1024 * 1024 + 1, 2^24 + 0.5, 1/0, -1/0, 0/0 } do
                local ok, err = pcall(events.new, { listening = L, max_payload_len = m })
                ngx.say(tostring(m), ": ", ok, " ", (tostring(err):gsub("^.-:%d+: ", "")))
            end
            for _, m in ipairs { 16 * 1024 * 1024, 1, 0.5 } do
                ngx.say(tostring(m), ": ", events.new({ listening = L, max_payload_len = m }).opts.max_payload_len)
            end
            ngx.say("nil: ", events.new({ listening = L }).opts.max_payload_len)
            ngx.say("false: ", events.new({ listening = L, max_payload_len = false }).opts.max_payload_len)
        }
    }
--- request
GET /t
--- response_body
1: false "max_payload_len" option must be a number
true: false "max_payload_len" option must be a number
0: false "max_payload_len" option is invalid
-1: false "max_payload_len" option is invalid
16777217: false "max_payload_len" option is invalid
16777216.5: false "max_payload_len" option is invalid
inf: false "max_payload_len" option is invalid
-inf: false "max_payload_len" option is invalid
nan: false "max_payload_len" option is invalid
16777216: 16777216
1: 1
0.5: 0.5
nil: 65536
false: 65536
--- no_error_log
[error]



=== TEST 9: where LuaJIT lacks string.buffer the original's codec is cjson.safe: the frame is measured as its JSON of JSON
--- main_config
    workerbus_zone ev 4m;
--- http_config
    init_by_lua_block {
        package.loaded["string.buffer"] = nil
        package.preload["string.buffer"] = function() error("hidden by the test") end
        require "resty.events"
    }
--- config
    location = /t {
        content_by_lua_block {
            local events = require "resty.events"
            local len = events._frame_len
            ngx.say(len("s", "e", nil), " ", len("s", "e", nil, "k"), " ", len("s", "e", { a = 1 }),
                    " ", len("s", "e", { data = 1 }), " ", len("s", "e", string.rep("a", 68)),
                    " ", len("content_by_lua", "request1", string.rep("a", 147)),
                    " ", len("s", "e", 'a/"b'))
            local ev = events.new { listening = "unix:/x.sock", max_payload_len = 147 }
            ngx.say(ev:publish("all", "s", "e", string.rep("a", 68)))
            ngx.say(ev:publish("all", "s", "e", string.rep("a", 69)))
            ngx.say(ev:publish("all", "s", "e", { f = print }))
        }
    }
--- request
GET /t
--- response_body
65 77 84 87 147 246 89
true
nilfailed to publish event: payload exceeds the limitation (147)
nilfailed to publish event: cannot encode data as JSON: Cannot serialise function: type not supported
--- no_error_log
[error]
