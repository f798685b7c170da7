# vim:set ft= ts=4 sw=4 et:
# Unique events are never dropped for want of claim-table space: many more
# distinct keys than the old fixed table (1,024) within one timeout are each
# handled by exactly one worker.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();
run_tests();

__DATA__

=== TEST 1: 3,000 distinct unique keys within one timeout: each handled once, by one worker, none dropped
--- main_config
    workerbus_zone wb 1m;
--- http_config
    lua_shared_dict got 4m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(key)
            ngx.shared.got:incr("k" .. key, 1, 0)
            ngx.shared.got:incr("total", 1, 0)
        end, "u")
        assert(ev.configure { shm = "wb", timeout = 60 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local ev = require "resty.worker.events"
            local wb = require "resty.workerbus"
            local got = ngx.shared.got
            local function wait_for(what, f) return require("wbtest").wait_for(what, f, 20) end
            local N = 3000
            for i = 1, N do
                assert(ev.post("u", "e", tostring(i), "key-" .. i))
                if i % 200 == 0 then ngx.sleep(0.01) end  -- within the small ring's capacity
            end
            -- every worker has read everything posted
            wait_for("every worker to read the events", function()
                local z = wb.status().zones[1].events
                if #z.workers ~= 4 then return false end
                for _, r in ipairs(z.workers) do
                    if r.lag ~= 0 then return false end
                end
                return true
            end)
            local once = 0
            for i = 1, N do
                if got:get("k" .. i) == 1 then once = once + 1 end
            end
            ngx.say("handled: ", got:get("total"), ", keys handled exactly once: ", once)
            ngx.say("lagged: ", wb.status().zones[1].events.lagged_missed)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
handled: 3000, keys handled exactly once: 3000
lagged: 0
--- no_error_log
dropping it
