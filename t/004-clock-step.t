# vim:set ft= ts=4 sw=4 et:
# The wall clock steps (NTP) while nginx runs: heartbeats, hang detection,
# unique-event claims, resty.sync's runner lease and the PostgreSQL bridge's
# reconnect backoff must not notice. nginx runs with a small
# LD_PRELOAD shim (built here with cc) that adds the number of seconds
# written in a file to gettimeofday() and CLOCK_REALTIME; the monotonic
# clock is left alone, as a real step leaves it.

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
    # A port nothing listens on (bound, then closed): every connect is refused.
    require IO::Socket::INET;
    my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0, Proto => "tcp")
        or die "cannot bind a free port: $!";
    $ENV{TEST_NGINX_CLOSED_PORT} = $s->sockport;
    close $s;
}

# after the BEGIN block: the real runner reads TEST_NGINX_* when it is loaded
use Workerbus::TestCore 'no_plan';

# Each block starts with the clock unstepped, even after a failed block.
add_block_preprocessor(sub { unlink $ENV{TEST_NGINX_CLOCK_STEP} });

# resty.sync's runner with a callback that sleeps 1.6 s per run (interval 1 s:
# back-to-back runs, a run is nearly always under way), counting the runs
# under way in the dict "runs" ("overlaps": runs started beside another).
our $SyncRunner = <<'_EOC_';
    lua_shared_dict runs 1m;
    init_worker_by_lua_block {
        local sync = require "resty.sync"
        local d = ngx.shared.runs
        local syncer = assert(sync.new(1, "wb"))
        assert(syncer:register(function(mode)
            if mode == sync.ACTION_DATA then return "data" end
            -- Raises in init_worker (no ngx.sleep there) before anything is
            -- counted: resty.sync retries it from a timer at once.
            ngx.sleep(0.1)
            if d:incr("cur", 1, 0) > 1 then d:incr("overlaps", 1, 0) end
            d:incr("started", 1, 0)
            d:set("last_pid", ngx.worker.pid())
            ngx.sleep(1.5)
            d:incr("cur", -1)
            return "v" .. d:incr("ended", 1, 0)
        end, "slow"))
        assert(syncer:start())
        SYNCER = syncer
    }
_EOC_

# Waits for a run under way, steps the wall clock by @STEP@ seconds, waits for
# three more runs (deadlines on the monotonic clock), then reports.
our $SyncStep = <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local mono = require("resty.core.time").monotonic_msec
            local d = ngx.shared.runs
            local function wait_for(what, secs, f)
                local deadline = mono() + secs * 1000
                while not f() do
                    if mono() > deadline then error("timed out waiting for " .. what) end
                    ngx.sleep(0.02)
                end
            end
            local function lease()
                for _, z in ipairs(wb.status().zones) do
                    for _, i in ipairs(z.sync or {}) do return i end
                end
            end
            local ok, err = pcall(function()
                wait_for("a run under way", 10, function() return (d:get("cur") or 0) == 1 end)
                local runner = lease().runner_pid
                local f = assert(io.open("$TEST_NGINX_CLOCK_STEP", "w"))
                f:write("@STEP@\n")
                f:close()
                -- Healthy workers tick every second: three more runs of 1.6 s
                -- give every one of them several ticks after the step.
                local ended = d:get("ended") or 0
                wait_for("three more runs", 20, function() return (d:get("ended") or 0) >= ended + 3 end)
                local l = lease()
                ngx.say("overlapping runs: ", d:get("overlaps") or 0,
                        ", runner kept: ", l.runner_pid == runner and d:get("last_pid") == runner,
                        ", takeovers: ", l.takeovers)
                -- Display stays on the (stepped) wall clock: the last update is recent.
                ngx.update_time()
                local modified = assert(SYNCER:get_last_modified_time("slow"))
                ngx.say("last modified on the wall clock: ", math.abs(ngx.now() - modified) < 5)
            end)
            os.remove("$TEST_NGINX_CLOCK_STEP")
            if not ok then error(err) end
        }
    }
_EOC_

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
            local wait_for = require("wbtest").wait_for
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



=== TEST 2: resty.sync: a +60 s wall-clock step while the runner's callback sleeps takes nothing over and never starts a second run at once
--- main_config
    workerbus_zone wb 1m;
--- http_config eval
$::SyncRunner
--- config eval
$::SyncStep =~ s/\@STEP\@/60/r
--- request
GET /t
--- timeout: 40
--- response_body
overlapping runs: 0, runner kept: true, takeovers: 0
last modified on the wall clock: true
--- no_error_log
taken from pid
no longer the runner
[error]



=== TEST 3: resty.sync: a -3600 s wall-clock step while the runner's callback sleeps does not put the next run off by an hour
--- main_config
    workerbus_zone wb 1m;
--- http_config eval
$::SyncRunner
--- config eval
$::SyncStep =~ s/\@STEP\@/-3600/r
--- request
GET /t
--- timeout: 40
--- response_body
overlapping runs: 0, runner kept: true, takeovers: 0
last modified on the wall clock: true
--- no_error_log
taken from pid
[error]



=== TEST 4: the PostgreSQL bridge: a -3600 s wall-clock step does not stop its reconnect attempts
# EXPECTED TO FAIL until src/pg's switch to the monotonic clock lands (issue
# 17 item 2, the bridge half): on the wall clock the next attempt is due an
# hour later. Not skipped on purpose.
--- main_config
    workerbus_zone wb 1m;
    workerbus_postgres "postgresql://postgres@127.0.0.1:$TEST_NGINX_CLOSED_PORT/test?sslmode=disable" backoff_min=50ms backoff_max=200ms;
--- config
    location = /t {
        content_by_lua_block {
            local wb = require "resty.workerbus"
            local mono = require("resty.core.time").monotonic_msec
            local function wait_for(what, secs, f)
                local deadline = mono() + secs * 1000
                while not f() do
                    if mono() > deadline then return false end
                    ngx.sleep(0.02)
                end
                return true
            end
            local function failures()
                local p = wb.status().postgres
                return type(p) == "table" and p.connect_failures or 0
            end
            local ok, err = pcall(function()
                assert(wait_for("attempts", 10, function() return failures() >= 3 end),
                       "timed out waiting for 3 failed attempts before the step")
                local f = assert(io.open("$TEST_NGINX_CLOCK_STEP", "w"))
                f:write("-3600\n")
                f:close()
                local before = failures()
                -- backoff_max is 200 ms: 5 more attempts take about a second.
                local going = wait_for("more attempts", 10, function() return failures() >= before + 5 end)
                ngx.say("attempts go on after the step: ", going)
            end)
            os.remove("$TEST_NGINX_CLOCK_STEP")
            if not ok then error(err) end
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
attempts go on after the step: true
