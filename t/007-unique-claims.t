# vim:set ft= ts=4 sw=4 et:
# Unique events are never dropped for want of claim-table space. The table
# has one entry per KiB of zone (at least 1,024): while the keys live within
# one timeout fit in it, each is handled by exactly one worker; beyond, a
# claim evicts the entry nearest its expiry, so a key may be handled once
# more, and each such eviction is counted.

use Workerbus::TestCore 'no_plan';

workers(4);
master_on();
no_long_string();
# Each block posts the same 3,000 keys from one request and waits until
# every worker has read them all; `got` counts handlings per key.
our $HttpConfig = <<'_EOC_';
    lua_shared_dict got 4m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(key)
            ngx.shared.got:incr("k" .. key, 1, 0)
            ngx.shared.got:incr("total", 1, 0)
        end, "u")
        assert(ev.configure { shm = "wb", timeout = 60 })
        package.loaded.t_post_all = function(N)
            local wb = require "resty.workerbus"
            for i = 1, N do
                assert(ev.post("u", "e", tostring(i), "key-" .. i))
                if i % 200 == 0 then ngx.sleep(0.01) end  -- within the small ring's capacity
            end
            require("wbtest").wait_for("every worker to read the events", function()
                local z = wb.status().zones[1].events
                if #z.workers ~= 4 then return false end
                for _, r in ipairs(z.workers) do
                    if r.lag ~= 0 then return false end
                end
                return true
            end, 20)
            return wb.status().zones[1].events
        end
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: 3,000 distinct unique keys within one timeout, in a 16 MiB zone (16,384 entries, so that no 32-entry probe window fills): each handled once, by one worker, none evicted
--- main_config
    workerbus_zone wb 16m;
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local N, got = 3000, ngx.shared.got
            local z = package.loaded.t_post_all(N)
            local once = 0
            for i = 1, N do
                if got:get("k" .. i) == 1 then once = once + 1 end
            end
            ngx.say("handled: ", got:get("total"), ", keys handled exactly once: ", once)
            ngx.say("lagged: ", z.lagged_missed, ", evicted: ", z.unique_claims.evicted)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
handled: 3000, keys handled exactly once: 3000
lagged: 0, evicted: 0
--- no_error_log
dropping it



=== TEST 2: 3,000 distinct unique keys within one timeout, in a 1 MiB zone (1,024 entries): none dropped, every second handling of a key follows an eviction
--- main_config
    workerbus_zone wb 1m;
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local N, got = 3000, ngx.shared.got
            local z = package.loaded.t_post_all(N)
            local missing = 0
            for i = 1, N do
                if (got:get("k" .. i) or 0) == 0 then missing = missing + 1 end
            end
            ngx.say("keys never handled: ", missing, ", lagged: ", z.lagged_missed)
            -- how many evictions a run needs depends on how far behind the
            -- slowest worker reads; each extra handling needs one
            ngx.say("evicted: ", z.unique_claims.evicted >= N - 1024,
                    ", extra handlings within evictions: ", got:get("total") - N <= z.unique_claims.evicted)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
keys never handled: 0, lagged: 0
evicted: true, extra handlings within evictions: true
--- no_error_log
dropping it
