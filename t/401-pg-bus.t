# vim:set ft=perl ts=4 sw=4 et:
# The bus between two nodes (two nginx instances, two workers each) through
# a real PostgreSQL: wait on A woken by post on B, 1,000 posts reaching every
# worker of A in order, posts from SQL, hostile names and payloads, the
# status section, UNLISTEN of unused channels, a wait getting only what was
# posted after it began, a notification's deliveries not held for the holder.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use PgNodes;

my $pg = shared_pg();
my $url = "postgresql://$pg->{user}\@$pg->{host}:$pg->{port}/$pg->{db}?sslmode=disable";
my $tag = "t401_$$";
my $SUB = "${tag}_sub";

my $HOLD = "${tag}_hold";
# Section 6: the holder's subscriber busies itself until another worker of
# its node has the same notification (at most 3 s), then says which came first.
my $http = bus_http($SUB, <<"EOF_LUA");
    wb.subscribe("$HOLD", function(payload)
        local me = ngx.worker.pid()
        if me ~= wb.status().postgres.holder_pid then
            got:set("hold_other:" .. payload, me)
            return
        end
        ngx.update_time()
        local deadline = ngx.now() + 3
        while not got:get("hold_other:" .. payload) and ngx.now() < deadline do
            ngx.update_time()
        end
        got:set("hold:" .. payload, got:get("hold_other:" .. payload) and "the other worker first" or "the holder first")
    end)
EOF_LUA
my $server = bus_server();

my $main = "workerbus_postgres \"$url\" backoff_min=50ms backoff_max=2s unlisten_after=2s;";
my $A = start_node(name => "a", offset => 0, main => $main, http => $http, server => $server);
my $B = start_node(name => "b", offset => 1, main => $main, http => $http, server => $server);


# Both nodes connect.
for my $n ($A, $B) {
    ok(wait_until(20, sub { my $p = pgst($n); $p && $p->{state} eq "connected" }), "node $n->{name} connects");
}
my $stA = node_status($A);
my $nodeA = $stA->{node}{id};
my $nodeB = node_status($B)->{node}{id};
my $p = $stA->{postgres};
like($p->{server_version}, qr/^\d+/, "status: server version");
ok((grep { $_->{pid} == $p->{holder_pid} } @{ $stA->{workers} }), "status: the holder is one of A's workers");
is($p->{server}, "postgresql://$pg->{user}\@$pg->{host}:$pg->{port}/$pg->{db} sslmode=disable", "status: server without secrets");
for my $f (qw(notifications_in notifications_out queue_depth queue_overflow reconnects last_error channels durable)) {
    ok(exists $p->{$f}, "status has $f");
}

# 1. wait on A, post on B.
my $ch1 = "${tag}_w";
my $res = bg_get($A, "/wait?c=$ch1&t=20");
ok(wait_until(15, sub { listening($A, $ch1) }), "A listens to the waited channel");
is(node_get($B, "/post?c=$ch1&p=hello"), "true nil\n", "post on B");
is($res->(), "hello|$nodeB\n", "the waiter on A gets the payload and B's node id");

# Several waiters on A: every one is woken.
my @w = map { bg_get($A, "/wait?c=$ch1&t=20") } 1 .. 4;
ok(wait_until(15, sub { node_get($A, "/waiting?c=$ch1") eq "4\n" }), "four waiters in place");
ok(listening($A, $ch1), "still listening");
node_get($B, "/post?c=$ch1&p=all");
is(join("", map { $_->() } @w), "all|$nodeB\n" x 4, "four waiters on A all woken by one post");

# A wait times out.
is(node_get($A, "/wait?c=${tag}_none&t=0.3"), "nil|timeout\n", "wait times out");

# 2. 1,000 posts from B reach every worker of A, in order.
for my $n ($A, $B) {
    ok(wait_until(15, sub { listening($n, $SUB) }), "$n->{name} listens to the subscribed channel");
}
is(node_get($B, "/postn?c=$SUB&n=1000"), "posted\n", "1000 posts queued on B");
my @pidsA = map { $_->{pid} } grep { $_->{state} eq "running" } @{ node_status($A)->{workers} };
is(scalar @pidsA, 2, "A has two workers");
ok(wait_until(60, sub {
    my $g = decode_json(node_get($A, "/got") // "{}");
    !grep { ($g->{$_} // 0) < 1000 } @pidsA;
}), "every worker of A received 1000") or diag node_get($A, "/got");
my $want = join(",", 1 .. 1000);
for my $pid (@pidsA) {
    is(node_get($A, "/drain?pid=$pid"), "$want\n", "worker $pid of A: 1..1000 in order, once each");
    is(node_get($A, "/origin?pid=$pid"), "$nodeB\n", "worker $pid of A: origin is node B");
}
my @pidsB = map { $_->{pid} } grep { $_->{state} eq "running" } @{ node_status($B)->{workers} };
is(scalar @pidsB, 2, "B has two workers");
ok(wait_until(60, sub {
    my $g = decode_json(node_get($B, "/got") // "{}");
    !grep { ($g->{$_} // 0) < 1000 } @pidsB;
}), "the posting node's own workers receive them too");
is(node_get($B, "/drain?pid=$_"), "$want\n", "worker $_ of B: 1..1000 in order") for @pidsB;
ok(pgst($B)->{flushes} < 1000, "B sent 1000 posts in fewer transactions (" . pgst($B)->{flushes} . ")");

# 3. A post from SQL (plain pg_notify) reaches the waiters.
my $ch3 = "${tag}_sql";
$res = bg_get($A, "/wait?c=$ch3&t=20");
ok(wait_until(15, sub { listening($A, $ch3) }), "A listens to the SQL channel");
ok(psql_ok("host=$pg->{host} port=$pg->{port} user=$pg->{user} dbname=$pg->{db} sslmode=disable",
           "select pg_notify('$ch3', 'from sql')"), "pg_notify from psql");
is($res->(), "from sql|\n", "a plain SQL notification arrives with an empty origin");

# 4. Hostile input: exact errors at the call; quotes and semicolons pass unharmed.
is(node_get($A, "/hostile"), join("", map { "$_\n" }
    "nil channel must be 1 to 63 bytes (got 0)",
    "nil channel must be 1 to 63 bytes (got 64)",
    "nil channel must not contain NUL bytes",
    "nil channel must be valid UTF-8",
    "nil payload must not contain NUL bytes",
    "nil payload must be valid UTF-8",
    "nil payload too large (8001 bytes, max 7900)",
    "nil channel \"workerbus_events\" is reserved",
    "nil channel must be a string",
    "nil payload must be a string",
    "wait: nil channel must be 1 to 63 bytes (got 0)",
    "subscribe: nil channel must be 1 to 63 bytes (got 64)"), "hostile input gets the documented errors");
my $evil = "${tag}'\"; DROP TABLE x; --";
my $evil_q = $evil; $evil_q =~ s/([^A-Za-z0-9_])/sprintf("%%%02X", ord $1)/ge;
my $payload = "it's \"quoted\"; SELECT 1; --\n\\ done";
my $payload_q = $payload; $payload_q =~ s/([^A-Za-z0-9_])/sprintf("%%%02X", ord $1)/ge;
$res = bg_get($A, "/wait?c=$evil_q&t=20");
ok(wait_until(15, sub { listening($A, $evil) }), "A listens to a channel named with quotes and a semicolon");
is(node_get($B, "/post?c=$evil_q&p=$payload_q"), "true nil\n", "post with quotes, semicolons and a newline");
is($res->(), "$payload|$nodeB\n", "they arrive unchanged");
my $big = "${tag}_big";
$res = bg_get($A, "/wait?c=$big&t=20");
ok(wait_until(15, sub { listening($A, $big) }), "A listens to the big channel");
is(node_get($B, "/big?c=$big"), "true\n", "a payload of the maximum size is accepted");
is(length($res->()), 7900 + 1 + length($nodeB) + 1, "and arrives whole");
ok(psql_ok("host=$pg->{host} port=$pg->{port} user=$pg->{user} dbname=$pg->{db} sslmode=disable", "select 1"),
   "the database is fine");

# 5. Channels nobody uses any more are UNLISTENed (unlisten_after=2s).
ok(wait_until(20, sub { !grep { $_->{name} eq $ch3 } @{ pgst($A)->{channels} } }), "an unused channel is dropped");
ok(listening($A, $SUB), "a subscribed channel stays");
ok(listening($A, "workerbus_events"), "the cluster events channel stays");

# 6. A notification's other deliveries do not wait for the holder's own
# subscriber (its wake-ups are not held as a worker's own post's are): the
# holder's subscriber is still running when the other worker of A has it.
ok(wait_until(15, sub { listening($A, $HOLD) }), "A listens to the hold channel");
is(node_get($B, "/post?c=$HOLD&p=h1"), "true nil\n", "post on B to the hold channel");
ok(wait_until(15, sub { node_get($A, "/flag?k=hold:h1") ne "nil\n" }), "the holder's subscriber ran");
is(node_get($A, "/flag?k=hold:h1"), "the other worker first\n", "A's other worker had the notification while the holder's subscriber ran");

# 7. A wait returns only what entered the node's event ring after it began
# (issue 16): in a worker whose first wait starts its event poller late, and
# in a worker that waited before. Node C (two workers, nothing subscribed:
# no worker reads its ring before its first wait) takes A's port; its
# server (the first of the port: its default) listens with reuseport, so
# new connections spread over its workers, and the endpoints below answer
# "other" at once in any worker but the one asked for.
my $lua_c = <<'EOF_LUA';
location = /waitw {
    content_by_lua_block {
        local me = ngx.worker.pid()
        if ngx.var.arg_pid and tonumber(ngx.var.arg_pid) ~= me then return ngx.say("other") end
        local c = ngx.var.arg_c
        local got = ngx.shared.got
        -- counted once this handler yields, so only after wait() has begun
        ngx.timer.at(0, function() got:incr("waiting:" .. c, 1, 0) end)
        local p, o = require("resty.workerbus").wait(c, tonumber(ngx.var.arg_t))
        got:incr("waiting:" .. c, -1, 0)
        ngx.say(p, "|", o, "|", me)
    }
}
location = /late {
    content_by_lua_block {
        -- posts through PostgreSQL, holds this worker (no yield, so its
        -- poller reads nothing) until the post is in the node's ring, then
        -- waits on the channel
        local me = ngx.worker.pid()
        if tonumber(ngx.var.arg_pid) ~= me then return ngx.say("other") end
        local wb = require "resty.workerbus"
        local core = require "resty.workerbus.events_core"
        local c = ngx.var.arg_c
        local _, head = core.position()
        local ok, err = wb.post(c, "late")
        if not ok then return ngx.say("post failed: ", err) end
        ngx.update_time()
        local deadline = ngx.now() + 10
        while select(2, core.position()) == head do
            ngx.update_time()
            if ngx.now() > deadline then return ngx.say("the post never entered the ring") end
        end
        local p, o = wb.wait(c, tonumber(ngx.var.arg_t))
        ngx.say(p, "|", o, "|", me)
    }
}
EOF_LUA
sub on_worker {
    my ($n, $pid, $path) = @_;
    my $r;
    wait_until(30, sub { $r = node_get($n, "$path&pid=$pid"); defined $r && $r ne "other\n" });
    return $r // "FAILED";
}
sub bg_on_worker {
    my ($n, $pid, $path) = @_;
    pipe(my $r, my $w) or die;
    my $child = fork // die;
    if (!$child) { close $r; print $w on_worker($n, $pid, $path); close $w; POSIX::_exit(0); }
    close $w;
    return sub { my $out = do { local $/; <$r> }; waitpid($child, 0); $out };
}
my $portC = $A->{port};
stop_node($A);
my $C = start_node(name => "c", offset => 0,
    main => "workerbus_postgres \"$url\" backoff_min=50ms backoff_max=2s unlisten_after=60s;",
    http => "server {\n listen 127.0.0.1:$portC reuseport;\n server_name c.test;\n location = /status { workerbus_status; }\n$server\n$lua_c\n}\n");
ok(wait_until(20, sub { my $q = pgst($C); $q && $q->{state} eq "connected" }), "node c connects");
my $holderC = pgst($C)->{holder_pid};
my ($otherC) = grep { $_ != $holderC } map { $_->{pid} } grep { $_->{state} eq "running" } @{ node_status($C)->{workers} };
ok($otherC, "c: a worker besides the holder ($holderC)");
my $ch6 = "${tag}_fresh";
my $waiting = sub { my $v = node_get($C, "/waiting?c=$ch6"); defined $v && $v eq "1\n" && listening($C, $ch6) };

# Worker X (not the holder) waits first, and a post from B wakes it.
$res = bg_on_worker($C, $otherC, "/waitw?c=$ch6&t=20");
ok(wait_until(15, $waiting), "c: worker X ($otherC) waits, c listens");
is(node_get($B, "/post?c=$ch6&p=old"), "true nil\n", "post on B");
is($res->(), "old|$nodeB|$otherC\n", "worker X's wait gets it");
# Worker Y's first wait, begun after that post: it must not get it.
is(on_worker($C, $holderC, "/waitw?c=$ch6&t=1"), "nil|timeout|$holderC\n",
   "worker Y's ($holderC) first wait does not get the post made before it began");
# Worker X again: a post already in the ring, not yet read by X's poller
# (X holds itself until the holder, another worker, has put it there).
is(on_worker($C, $otherC, "/late?c=$ch6&t=1"), "nil|timeout|$otherC\n",
   "worker X's wait does not get a post that entered the ring before it began");
# Both still get what is posted after their wait began.
for my $pid ($holderC, $otherC) {
    $res = bg_on_worker($C, $pid, "/waitw?c=$ch6&t=20");
    ok(wait_until(15, $waiting), "c: worker $pid waits");
    is(node_get($B, "/post?c=$ch6&p=new$pid"), "true nil\n", "post on B");
    is($res->(), "new$pid|$nodeB|$pid\n", "worker $pid gets the post made after its wait began");
}

# 8. A post from a worker that does not hold the connection wakes the
# holder for its flush only: the holder's event poller (running, asleep)
# is not resumed by it. Node D: two workers, resty.worker.events configured
# in each (so each has a poller asleep on its semaphore), nothing
# subscribed; the post's channel is one no node listens to.
my $lua_d = <<'EOF_LUA';
location = /wakes {
    content_by_lua_block {
        if tonumber(ngx.var.arg_pid) ~= ngx.worker.pid() then return ngx.say("other") end
        ngx.say(require("resty.workerbus.events_core").poller_wakes())
    }
}
location = /posts {
    content_by_lua_block {
        -- n posts from this worker, one at a time: each after the holder
        -- flushed the one before and went back to sleep
        if tonumber(ngx.var.arg_pid) ~= ngx.worker.pid() then return ngx.say("other") end
        local wb = require "resty.workerbus"
        local out = function() return wb.status().postgres.notifications_out end
        local o0 = out()
        for i = 1, tonumber(ngx.var.arg_n) do
            ngx.sleep(0.05)
            local ok, err = wb.post(ngx.var.arg_c, "p" .. i)
            if not ok then return ngx.say("post failed: ", err) end
            ngx.update_time()
            local deadline = ngx.now() + 10
            while out() < o0 + i do
                ngx.sleep(0.002)
                ngx.update_time()
                if ngx.now() > deadline then return ngx.say("post ", i, " was not flushed") end
            end
        end
        ngx.say("flushed ", out() - o0)
    }
}
EOF_LUA
my $portD = $B->{port} + 1;   # offset 2
my $D = start_node(name => "d", offset => 2,
    main => "workerbus_postgres \"$url\" backoff_min=50ms backoff_max=2s;",
    http => "init_worker_by_lua_block { assert(require('resty.worker.events').configure { shm = 'workerbus', interval = 0.01 }) }\n"
          . "server {\n listen 127.0.0.1:$portD reuseport;\n server_name d.test;\n location = /status { workerbus_status; }\n$lua_d\n}\n");
ok(wait_until(20, sub { my $q = pgst($D); $q && $q->{state} eq "connected" }), "node d connects");
my $holderD = pgst($D)->{holder_pid};
my ($otherD) = grep { $_ != $holderD } map { $_->{pid} } grep { $_->{state} eq "running" } @{ node_status($D)->{workers} };
ok($otherD, "d: a worker besides the holder ($holderD)");
my $w0 = on_worker($D, $holderD, "/wakes?x=1");
like($w0, qr/^\d+\n$/, "d: the holder's poller runs");
is(on_worker($D, $otherD, "/posts?c=${tag}_nobody&n=20"), "flushed 20\n", "d: 20 posts from the other worker, each flushed by the holder");
my $w1 = on_worker($D, $holderD, "/wakes?x=1");
ok($w1 - $w0 < 10, "d: the holder's poller was not resumed by the wake-ups for its flushes (" . ($w1 - $w0) . " resumptions for 20 posts)");

my @bad = grep { /\[(error|alert|crit|emerg)\]/ } split /\n/, node_log($A) . node_log($B) . node_log($C) . node_log($D);
is(scalar @bad, 0, "no errors in the logs") or diag join("\n", @bad[0 .. ($#bad < 5 ? $#bad : 5)]);

done_testing();
