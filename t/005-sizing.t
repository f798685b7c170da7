# vim:set ft= ts=4 sw=4 et:
# The lifecycle table and the ring's readers are sized from
# worker_processes: every worker is tracked and gets events, whatever the
# count, and nginx -t refuses what cannot fit, naming the directive.

use Workerbus::TestCore 'no_plan';

add_block_preprocessor(sub {
    my $block = shift;
    master_on();
    workers($block->worker_processes // 4);
});

no_long_string();
run_tests();

__DATA__

=== TEST 1: 130 workers (more than the old fixed table of 128 records): every one is tracked and handles an event
--- worker_processes: 130
--- main_config
    workerbus_zone wb 4m;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function() ngx.shared.got:incr("n", 1, 0) end, "t")
        assert(ev.configure { shm = "wb" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local function wait_for(what, f) return require("wbtest").wait_for(what, f, 30) end
            local running
            wait_for("130 running workers", function()
                running = 0
                for _, w in ipairs(wb.status().workers) do
                    running = running + (w.state == "running" and 1 or 0)
                end
                return running == 130
            end)
            assert(require("resty.worker.events").post("t", "e", "x"))
            wait_for("130 handlers", function() return ngx.shared.got:get("n") == 130 end)
            ngx.say("running: ", running, ", handled: ", ngx.shared.got:get("n"))
        }
    }
--- request
GET /t
--- timeout: 60
--- response_body
running: 130, handled: 130
--- no_error_log
[error]
not tracked



=== TEST 2: more worker processes than the table can ever hold is refused, naming worker_processes
--- worker_processes: 600
--- main_config
    workerbus_zone wb 16m;
--- must_die
--- error_log
workerbus: "worker_processes 600" is too many: the lifecycle table holds at most 1024 workers, and a reload's drain needs room for two per worker process; use at most 512



=== TEST 3: a zone too small for the worker records and ring readers of worker_processes is refused, naming both
--- worker_processes: 256
--- main_config
    workerbus_zone small 256k;
--- must_die
--- error_log eval
qr/workerbus: zone "small" of 256k is too small for "worker_processes 256" \(1024 worker records and their ring readers need about \d+k\); raise its size in "workerbus_zone small <size>;"/
