# vim:set ft= ts=4 sw=4 et:
# Self-test of the block runner in t/lib (Test::Nginx::Socket::Lua subset).
# Needs only nginx + the ndk and lua modules, not the workerbus module.

BEGIN {
    # The runner is tested with nginx's own Lua modules only: drop ours (and
    # anything else) from the list; unset or empty means ndk + lua.
    $ENV{TEST_NGINX_LOAD_MODULES} = join " ",
        grep { m{/(?:ndk_http_module|ngx_http_lua_module)\.so$} }
        split " ", ($ENV{TEST_NGINX_LOAD_MODULES} // "");
}

# after the BEGIN block: the real runner reads TEST_NGINX_* when it is loaded
use Workerbus::TestCore 'no_plan';

# blocks with a "--- master_workers: N" section run with master_on() and
# workers(N); the others with the defaults (no master process, 1 worker).
# A block preprocessor is valid with the real Test::Nginx as well.
add_block_preprocessor(sub {
    my $block = shift;
    if (defined $block->master_workers) {
        master_on();
        workers($block->master_workers);
    } else {
        master_process_enabled(0);
        workers(1);
    }
});

no_long_string();
# the real runner: each error_log check sees the whole block's log (see
# Workerbus::TestCore)
check_accum_error_log();
run_tests();

__DATA__

=== TEST 1: plain config, request and response body
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("hello, ", ngx.var.arg_who or "world")
            ngx.say(require("ngx.process").type())
        }
    }
--- request
GET /t?who=runner
--- response_body
hello, runner
single



=== TEST 2: response_body_like is one regex over the whole body (/s)
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("first line")
            ngx.say("pid ", ngx.worker.pid())
        }
    }
--- request
GET /t
--- response_body_like
^first line.pid \d+$



=== TEST 3: error_code 404
--- config
    location = /t {
        return 404;
    }
--- request
GET /t
--- error_code: 404
--- response_body_like: 404 Not Found



=== TEST 4: more_headers reach the server
--- config
    location = /t {
        content_by_lua_block {
            local h = ngx.req.get_headers()
            ngx.say("x-foo: ", h["x-foo"])
            ngx.say("x-bar: ", h["x-bar"])
            ngx.say("host: ", h["host"])
        }
    }
--- request
GET /t
--- more_headers
X-Foo: foo value
X-Bar: 42
--- response_body
x-foo: foo value
x-bar: 42
host: localhost



=== TEST 5: request eval sends each request on its own connection
--- config
    location = /echo {
        content_by_lua_block {
            ngx.req.read_body()
            ngx.say(ngx.req.get_method(), " ", ngx.var.arg_n or "-", " ", ngx.req.get_body_data() or "")
        }
    }
--- request eval
["GET /echo?n=1", "POST /echo?n=2\nthe body", "GET /missing"]
--- response_body eval
["GET 1 \n", "POST 2 the body\n", qr/404 Not Found/]
--- error_code eval
[200, 200, 404]



=== TEST 6: error_log and no_error_log, plain lines and eval
--- config
    location = /t {
        content_by_lua_block {
            ngx.log(ngx.WARN, "something to warn about: ", 42)
            ngx.log(ngx.ERR, "an error line")
            ngx.say("ok")
        }
    }
--- request
GET /t
--- response_body
ok
--- error_log
something to warn about: 42
[error]
--- no_error_log
[crit]
something that never happens



=== TEST 7: error_log eval with strings and regexes
--- config
    location = /t {
        content_by_lua_block {
            ngx.log(ngx.NOTICE, "answer is ", 6 * 7)
            ngx.say("ok")
        }
    }
--- request
GET /t
--- response_body
ok
--- error_log eval
["answer is 42", qr/\[notice\] \d+#\d+: \*\d+ \[lua\] content_by_lua\(nginx\.conf:\d+\):\d+: answer is \d+/]
--- no_error_log eval
[qr/answer is (?!42)\d+/, "[alert]"]



=== TEST 8: grep_error_log collects the matches of the block, in order
(one request: under the real runner a multi-request block's grep sees only
the last request's lines)
--- config
    location = /t {
        content_by_lua_block {
            for round = 1, 2 do
                for i = 1, 3 do
                    ngx.log(ngx.INFO, "step ", i, " done")
                end
                ngx.log(ngx.INFO, "round ", round, " over")
            end
            ngx.say("ok")
        }
    }
--- request
GET /t
--- response_body
ok
--- grep_error_log eval: qr/step \d done/
--- grep_error_log_out
step 1 done
step 2 done
step 3 done
step 1 done
step 2 done
step 3 done



=== TEST 9: grep_error_log as a plain string, grep_error_log_out as a regex
--- config
    location = /t {
        content_by_lua_block {
            ngx.log(ngx.INFO, "marker")
            ngx.log(ngx.INFO, "marker")
            ngx.say("ok")
        }
    }
--- request
GET /t
--- response_body
ok
--- grep_error_log chop
marker
--- grep_error_log_out eval
qr/\A(?:marker\n){2}\z/



=== TEST 10: wait gives a timer the time to log before the log is checked
--- config
    location = /t {
        content_by_lua_block {
            local ok, err = ngx.timer.at(0.5, function(premature)
                ngx.log(ngx.WARN, "late timer ran, premature: ", premature)
            end)
            ngx.say("timer: ", ok ~= nil, " ", err)
        }
    }
--- request
GET /t
--- response_body
timer: true nil
--- wait: 1
--- error_log
late timer ran, premature: false



=== TEST 11: must_die: a bad directive fails nginx -t and a real start
--- config
    location = /t {
        bogus_directive on;
    }
--- must_die
--- error_log
unknown directive "bogus_directive"
[emerg]
--- no_error_log
[alert]



=== TEST 12: must_die with the expected exit code
--- main_config
    timer_resolution foo;
--- must_die: 1
--- error_log eval
qr/"timer_resolution" directive invalid value in .*nginx\.conf:\d+/



=== TEST 13: $TEST_NGINX_* variables are expanded; user_files land in html
--- config
    location = /t {
        content_by_lua_block {
            ngx.say(ngx.var.server_port == "$TEST_NGINX_SERVER_PORT")
            ngx.say(ngx.config.prefix() .. "html" == "$TEST_NGINX_HTML_DIR")
        }
    }
--- user_files
>>> hello.txt
hello from a user file
>>> sub/dir/x.txt
x
--- request eval
["GET /t", "GET /hello.txt", "GET /sub/dir/x.txt"]
--- response_body eval
["true\ntrue\n", "hello from a user file\n", "x\n"]
--- no_error_log
[error]



=== TEST 14: master_on + 2 workers: both are up when the first request comes
--- master_workers: 2
--- config
    location = /t {
        content_by_lua_block {
            local process = require "ngx.process"
            ngx.say(process.type(), " ", ngx.worker.count(),
                    " master ", process.get_master_pid() ~= ngx.worker.pid())
        }
    }
--- request
GET /t
--- response_body
worker 2 master true
--- grep_error_log eval: qr/start worker process \d+/
--- grep_error_log_out eval
qr/\A(?:start worker process \d+\n){2}\z/



=== TEST 15: shutdown_error_log sees what the workers log while exiting
--- master_workers: 2
--- http_config
    init_worker_by_lua_block {
        assert(ngx.timer.at(3600, function(premature)
            ngx.log(ngx.WARN, "pending timer run at exit, premature: ", premature)
        end))
    }
--- config
    location = /t {
        return 200 "up\n";
    }
--- request
GET /t
--- response_body
up
--- no_error_log
pending timer run at exit
exiting
--- shutdown_error_log
pending timer run at exit, premature: true
exiting
signal 3 (SIGQUIT) received
--- no_shutdown_error_log
[alert]



=== TEST 16: HUP sent in-band from Lua; the next request sees the reload done
--- master_workers: 2
--- config
    location = /hup {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            local master = require("ngx.process").get_master_pid()
            ngx.say("HUP sent: ", ffi.C.kill(master, 1) == 0)  -- 1 = SIGHUP
        }
    }
    location = /after {
        content_by_lua_block {
            -- until this master has started the reload's 2 workers (after
            -- the 2 it started first)
            local pat = " " .. require("ngx.process").get_master_pid() .. "#%d+: start worker process %d+"
            local T = require "wbtest"
            T.wait(function() return T.count_logged(pat) >= 4 end, 2)
            ngx.say("after")
        }
    }
--- request eval
["GET /hup", "GET /after"]
--- response_body eval
["HUP sent: true\n", "after\n"]
--- error_log
signal 1 (SIGHUP) received
reconfiguring
--- grep_error_log eval: qr/start worker process \d+/
--- grep_error_log_out eval
qr/\A(?:start worker process \d+\n){4}\z/
--- no_error_log
[alert]



=== TEST 17: KILL of the other worker sent in-band; the master respawns it
--- master_workers: 2
--- http_config
    lua_shared_dict pids 1m;
    init_worker_by_lua_block {
        ngx.shared.pids:set(ngx.worker.id(), ngx.worker.pid())
    }
--- config
    location = /kill {
        content_by_lua_block {
            local ffi = require "ffi"
            pcall(ffi.cdef, "int kill(int pid, int sig);")
            local pids = ngx.shared.pids
            local id = 1 - ngx.worker.id()
            -- until the other worker has run init_worker
            require("wbtest").wait(function() return pids:get(id) end, 2)
            local other = pids:get(id)
            pids:set("victim", id .. " " .. other)
            ngx.say("killed the other worker: ", ffi.C.kill(other, 9) == 0)  -- SIGKILL
        }
    }
    location = /after {
        content_by_lua_block {
            local pids = ngx.shared.pids
            local id, old = pids:get("victim"):match("(%d) (%d+)")
            -- until the master's respawn has run init_worker
            require("wbtest").wait(function() return pids:get(tonumber(id)) ~= tonumber(old) end, 2)
            local new = pids:get(tonumber(id))
            ngx.say("slot ", id, " has a new pid: ", new ~= tonumber(old))
        }
    }
--- request eval
["GET /kill", "GET /after"]
--- response_body eval
["killed the other worker: true\n", qr/^slot [01] has a new pid: true\n\z/]
--- error_log
[alert]
exited on signal 9
--- grep_error_log eval: qr/start worker process \d+/
--- grep_error_log_out eval
qr/\A(?:start worker process \d+\n){3}\z/
