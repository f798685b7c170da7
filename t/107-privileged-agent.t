# vim:set ft= ts=4 sw=4 et:
# OpenResty's privileged agent as a reader of resty.events (lua-resty-events'
# enable_privileged_agent): tracked by the lifecycle table as the agent,
# it receives every broadcast and can publish when the option is true,
# and reads nothing (and logs nothing) when it is false. Needs an nginx
# with OpenResty's privileged agent patch; skipped elsewhere (Debian's).

use lib 't/lib';
use Workerbus::OpenResty ();
my $why;
BEGIN { $why = Workerbus::OpenResty::no_privileged_agent() }
use Workerbus::TestCore $why ? (skip_all => $why) : ('no_plan');

workers(2);
master_on();
no_long_string();
run_tests();

__DATA__

=== TEST 1: enable_privileged_agent = true: the agent is tracked as the agent, gets every broadcast, and its own events reach the workers with wid -1
--- http_config
    lua_shared_dict got 1m;
    init_by_lua_block {
        assert(require("ngx.process").enable_privileged_agent())
        _G.ev = require("resty.events").new {
            listening = "unix:$TEST_NGINX_HTML_DIR/events.sock",
            enable_privileged_agent = true,
        }
    }
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local who = require("ngx.process").type() == "privileged agent" and "agent"
                    or "w" .. ngx.worker.id()
        ev:subscribe("*", "*", function(data, event, source, wid)
            d:incr(who .. ":" .. source, 1, 0)
            if source == "agent" then d:set(who .. ":agent-wid", wid) end
        end)
        assert(ev:init_worker())
        if who == "agent" then
            d:set("agent-pid", ngx.worker.pid())
            assert(ev:publish("all", "agent", "hello", "from the agent"))
        end
    }
--- config
    location = /t {
        content_by_lua_block {
            local d = ngx.shared.got
            local wait = require("wbtest").wait
            for i = 1, 3 do assert(ev:publish("all", "req", "e" .. i, i)) end
            ngx.say("the agent got every broadcast: ",
                    wait(function() return d:get("agent:req") == 3 end))
            ngx.say("every worker got the agent's event: ", wait(function()
                return d:get("w0:agent") == 1 and d:get("w1:agent") == 1
            end))
            ngx.say("with wid: ", d:get("w0:agent-wid"), " ", d:get("w1:agent-wid"))
            ngx.say("the agent got its own: ", d:get("agent:agent"))
            local st = require("resty.workerbus").status()
            local apid = d:get("agent-pid")
            for _, w in ipairs(st.workers) do
                if w.pid == apid then
                    ngx.say("agent record: role ", w.role, ", slot ", w.slot == ngx.null and "null" or w.slot, ", ", w.state)
                end
            end
            ngx.say("live workers: ", st.generations[#st.generations].live_workers)
            for _, r in ipairs(st.zones[1].events.workers) do
                if r.pid == apid then
                    ngx.say("agent reader: ", r.role, ", poller ", r.poller, ", delivered ", r.delivered)
                end
            end
        }
    }
--- request
GET /t
--- response_body
the agent got every broadcast: true
every worker got the agent's event: true
with wid: -1 -1
the agent got its own: 1
agent record: role privileged agent, slot null, running
live workers: 2
agent reader: privileged agent, poller true, delivered 4
--- no_error_log
[error]



=== TEST 2: enable_privileged_agent = false, or unset: the agent's init_worker succeeds, it reads nothing, nothing is logged
--- http_config
    lua_shared_dict got 1m;
    init_by_lua_block {
        assert(require("ngx.process").enable_privileged_agent())
        _G.ev = require("resty.events").new {
            listening = "unix:$TEST_NGINX_HTML_DIR/events.sock",
            enable_privileged_agent = false,
        }
        _G.ev2 = require("resty.events").new {   -- the option unset
            listening = "unix:$TEST_NGINX_HTML_DIR/events2.sock",
        }
    }
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local agent = require("ngx.process").type() == "privileged agent"
        local who = agent and "agent" or "w" .. ngx.worker.id()
        for name, e in pairs { [""] = ev, ["2"] = ev2 } do
            e:subscribe("*", "*", function(data, event, source)
                d:incr(who .. ":" .. event .. name, 1, 0)
            end)
            local ok, err = e:init_worker()
            if agent then
                d:set("agent-pid", ngx.worker.pid())
                d:set("agent-init" .. name, tostring(ok) .. " " .. tostring(err))
            end
        end
    }
--- config
    location = /t {
        content_by_lua_block {
            local d = ngx.shared.got
            local wait = require("wbtest").wait
            ngx.say("agent init_worker: ", wait(function() return d:get("agent-init") end),
                    ", unset: ", wait(function() return d:get("agent-init2") end))
            for _, e in ipairs { ev, ev2 } do
                for i = 1, 3 do assert(e:publish("all", "req", "e", i)) end
                assert(e:publish("all", "req", "marker"))
            end
            ngx.say("the workers got everything: ", wait(function()
                return d:get("w0:marker") == 1 and d:get("w1:marker") == 1
                       and d:get("w0:marker2") == 1 and d:get("w1:marker2") == 1
            end))
            ngx.say("the agent got: ", d:get("agent:e") or 0, ", unset: ", d:get("agent:e2") or 0)
            local apid = d:get("agent-pid")
            local st = require("resty.workerbus").status()
            for _, r in ipairs(st.zones[1].events.workers) do
                if r.pid == apid then
                    ngx.say("agent reader: poller ", r.poller, ", delivered ", r.delivered)
                end
            end
        }
    }
--- request
GET /t
--- response_body
agent init_worker: true nil, unset: true nil
the workers got everything: true
the agent got: 0, unset: 0
agent reader: poller false, delivered 0
--- no_error_log
[error]



=== TEST 3: unique targets: one process handles each, the agent among the candidates (as the original's broker draws it)
--- http_config
    lua_shared_dict got 1m;
    init_by_lua_block {
        assert(require("ngx.process").enable_privileged_agent())
        _G.ev = require("resty.events").new {
            listening = "unix:$TEST_NGINX_HTML_DIR/events.sock",
            enable_privileged_agent = true,
        }
    }
    init_worker_by_lua_block {
        local d = ngx.shared.got
        local who = require("ngx.process").type() == "privileged agent" and "agent"
                    or "w" .. ngx.worker.id()
        ev:subscribe("u", "*", function(data, event)
            d:incr("handled:" .. event, 1, 0)
            d:incr("by:" .. who, 1, 0)
        end)
        ev:subscribe("u", "marker", function() d:incr("marker:" .. who, 1, 0) end)
        assert(ev:init_worker())
    }
--- config
    location = /t {
        content_by_lua_block {
            local d = ngx.shared.got
            local wait = require("wbtest").wait
            local n = 60
            for i = 1, n do assert(ev:publish("key" .. i, "u", "e" .. i, i)) end
            assert(ev:publish("all", "u", "marker"))
            ngx.say("marker everywhere: ", wait(function()
                return d:get("marker:w0") == 1 and d:get("marker:w1") == 1 and d:get("marker:agent") == 1
            end))
            local once = true
            for i = 1, n do once = once and d:get("handled:e" .. i) == 1 end
            ngx.say("each unique event handled exactly once: ", once)
            ngx.say("in all: ", (d:get("by:w0") or 0) + (d:get("by:w1") or 0) + (d:get("by:agent") or 0) - 3)
        }
    }
--- request
GET /t
--- response_body
marker everywhere: true
each unique event handled exactly once: true
in all: 60
--- no_error_log
[error]
