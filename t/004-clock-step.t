# vim:set ft= ts=4 sw=4 et:
# The wall clock steps (NTP) while nginx runs: heartbeats, hang detection
# and unique-event claims must not notice. nginx runs with a small
# LD_PRELOAD shim (built here with cc) that adds the number of seconds
# written in a file to gettimeofday() and CLOCK_REALTIME; the monotonic
# clock is left alone, as a real step leaves it.

use Test::Nginx::Socket::Lua 'no_plan';
use File::Temp qw(tempdir);

BEGIN {
    my $dir = tempdir("workerbus-clock-XXXXXX", TMPDIR => 1, CLEANUP => 1);
    my $step = "$dir/step";
    open my $c, '>', "$dir/shim.c" or die "$dir/shim.c: $!";
    print $c <<"C";
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
static long step(void) {
    long s = 0;
    FILE *f = fopen("$step", "r");
    if (f) { if (fscanf(f, "%ld", &s) != 1) s = 0; fclose(f); }
    return s;
}
int gettimeofday(struct timeval *tv, void *tz) {
    static int (*real)(struct timeval *, void *);
    if (!real) real = (int (*)(struct timeval *, void *)) dlsym(RTLD_NEXT, "gettimeofday");
    int r = real(tv, tz);
    if (r == 0 && tv) tv->tv_sec += step();
    return r;
}
int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *)) dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    if (r == 0 && ts && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += step();
    return r;
}
C
    close $c;
    system("cc -shared -fPIC -O1 -o $dir/shim.so $dir/shim.c -ldl") == 0
        or die "cannot build the clock shim with cc";
    my $nginx = $ENV{TEST_NGINX_BINARY} || "/usr/sbin/nginx";
    open my $w, '>', "$dir/nginx" or die "$dir/nginx: $!";
    print $w "#!/bin/sh\nLD_PRELOAD=$dir/shim.so exec $nginx \"\$@\"\n";
    close $w;
    chmod 0755, "$dir/nginx";
    $ENV{TEST_NGINX_BINARY} = "$dir/nginx";
    $ENV{TEST_NGINX_CLOCK_STEP} = $step;
    unlink $step;
}

workers(4);
master_on();
no_long_string();
run_tests();

__DATA__

=== TEST 1: a wall-clock step of an hour forward marks no worker hung and expires no unique claim
--- main_config
    workerbus_zone wb 1m;
    workerbus_heartbeat 100ms;
--- http_config
    lua_shared_dict got 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function(data) ngx.shared.got:incr(data, 1, 0) end, "u")
        assert(ev.configure { shm = "wb", timeout = 600 })
    }
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local ev = require "resty.worker.events"
            local got = ngx.shared.got
            local function wait_for(what, f)
                local deadline = ngx.now() + 10
                while not f() do
                    if ngx.now() > deadline then error("timed out waiting for " .. what) end
                    ngx.sleep(0.02)
                end
            end
            local function running()
                local n = 0
                for _, w in ipairs(wb.status().workers) do n = n + (w.state == "running" and 1 or 0) end
                return n
            end
            wait_for("4 running workers", function() return running() == 4 end)
            assert(ev.post("u", "e", "first", "key"))
            wait_for("the unique event", function() return got:get("first") end)

            local f = assert(io.open("$TEST_NGINX_CLOCK_STEP", "w"))
            f:write("3600\n")
            f:close()
            ngx.update_time()
            local stepped = ngx.now()
            -- every worker stamps its heartbeat, then judges the others, after the step
            wait_for("a heartbeat of every worker after the step", function()
                ngx.update_time()
                local since, n = ngx.now() - stepped, 0
                for _, w in ipairs(wb.status().workers) do
                    if w.state ~= "running" or w.heartbeat_age >= since then return false end
                    n = n + 1
                end
                return n == 4 and since > 0.5
            end)
            assert(ev.post("u", "e", "second", "key"))
            assert(ev.post("u", "e", "probe", "other key"))
            wait_for("the probe", function() return got:get("probe") end)
            os.remove("$TEST_NGINX_CLOCK_STEP")
            ngx.say("running: ", running(), ", second event with the claimed key handled: ", got:get("second") or 0)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
running: 4, second event with the claimed key handled: 0
--- no_error_log
hung
[error]
