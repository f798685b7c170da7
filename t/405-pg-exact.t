# vim:set ft=perl ts=4 sw=4 et:
# Exact durable delivery and trusted cluster events (issue 16), against a
# private PostgreSQL server this suite starts and stops (PGNODES_PG_PORT)
# and real nginx nodes (TEST_NGINX_PORT, +1). Each case is a group of
# checks named "case N (...)":
#
#   1. forged notifications: a psql pg_notify 'wbd 1000000000000 x\n...' on a
#      durable channel, then real workerbus_post rows: all delivered; a forged
#      'wbd <next id> <bignumber> x\n...': the real row with that id still
#      arrives.
#   2. ids going backwards: TRUNCATE workerbus_outbox RESTART IDENTITY while
#      the node runs, then new posts: all delivered, once.
#   3. late commit: a transaction posts 'late' and stays open while 5,000
#      later posts commit; it commits (a) while the node is connected, (b)
#      while the node is away: 'late' reaches every worker, once.
#   4. reconnect with a backlog: 6,000 rows committed while the node is
#      away, plus another node's posts (3,000, 1 ms apart) going on while it
#      reconnects: every worker has exactly the full set, no duplicate.
#   5. replay efficiency: 20,000 rows missed on a listened channel and
#      20,000 on a channel nobody listens to: each worker gets exactly its
#      20,000, `replayed` grows by 20,000, `duplicates_skipped` by < 100.
#   6. a post the server refuses (LATIN1 database, '€', SQLSTATE 22P05), in
#      non-durable and durable mode: the posts around it arrive,
#      `posts_refused` is 1, the queue drains, one log line with the channel
#      and the SQLSTATE, no reconnect loop.
#   7. cluster-event flags from the wire: psql notifications on
#      workerbus_events with bad or unknown flags reach no handler and are
#      counted in `rejected`; a real post_cluster still arrives.
#   8. signed cluster events (secret_file=): same secret delivers; another
#      secret and unsigned psql notifications are dropped, counted in
#      `rejected` and logged; nginx -t refuses a missing (or short) secret.
#
# Nodes are stopped and started afresh between cases, so a case never
# depends on the state another one left in a node's zone. A node is "away"
# deterministically: its database refuses connections (ALTER DATABASE ...
# ALLOW_CONNECTIONS false) while its backend is terminated, and the suite
# waits until the node's status shows a failed attempt; sessions opened
# before (psql driven through IPC::Run, the other node) keep working.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use IPC::Run ();
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);
use PgNodes;

my $pg = private_pg();
sub conn_db { "host=$pg->{host} port=$pg->{port} user=postgres dbname=$_[0] sslmode=disable" }
my $conn = conn_db("test");
my $admin = conn_db("postgres");
sub url {
    my ($app, $db) = @_;
    return "postgresql://postgres\@$pg->{host}:$pg->{port}/" . ($db // "test") . "?sslmode=disable&application_name=$app";
}
my $OPTS = "backoff_min=100ms backoff_max=500ms connect_timeout=2s";
my $DELIVER = 15;    # seconds a delivery may take before the check fails

# ---------------------------------------------------------------------------
# psql sessions that stay open (a transaction held across other steps).
my @sessions;
sub sess_open {
    my ($c) = @_;
    my ($in, $out, $err) = ("", "", "");
    my $h = IPC::Run::start([ "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", $c ], \$in, \$out, \$err);
    my $s = { h => $h, in => \$in, out => \$out, err => \$err, n => 0, pos => 0 };
    push @sessions, $s;
    return $s;
}
# Sends SQL, waits for it to complete; returns its output, or undef on error.
sub sess_do {
    my ($s, $sql, $secs) = @_;
    my $tag = "WB405_DONE_" . ++$s->{n};
    ${ $s->{in} } .= "$sql\n\\echo $tag\n";
    my $end = time + ($secs // 60);
    while (time < $end) {
        last unless $s->{h}->pumpable;
        $s->{h}->pump_nb;
        my $o = ${ $s->{out} };
        if ((my $i = index($o, "$tag\n", $s->{pos})) >= 0) {
            my $r = substr($o, $s->{pos}, $i - $s->{pos});
            $s->{pos} = $i + length("$tag\n");
            $r =~ s/\s+\z//;
            return $r;
        }
        sleep 0.01;
    }
    diag "psql session: no answer to $sql: " . ${ $s->{err} };
    return undef;
}
sub sess_close {
    my ($s) = @_;
    return unless $s->{h};
    ${ $s->{in} } .= "\\q\n";
    eval { $s->{h}->finish; 1 } or eval { $s->{h}->kill_kill };
    delete $s->{h};
}
END { for my $s (@sessions) { eval { $s->{h}->kill_kill if $s->{h} } } }

# ---------------------------------------------------------------------------
# Nodes. Every worker subscribes to the node's channels and keeps what it
# gets in the "rcv" dict (list "l:<channel>:<pid>").
sub rcv_http {
    my $list = join " ", @_;
    return <<"EOF_HTTP";
lua_shared_dict rcv 64m;
init_worker_by_lua_block {
    local wb = require "resty.workerbus"
    local rcv = ngx.shared.rcv
    for ch in ("$list"):gmatch("%S+") do
        local id, err = wb.subscribe(ch, function(payload)
            local ok, e = rcv:rpush("l:" .. ch .. ":" .. ngx.worker.pid(), payload)
            if not ok then ngx.log(ngx.ERR, "t405 rpush failed: ", e) end
        end)
        if not id then ngx.log(ngx.ERR, "subscribe failed: ", err) end
    end
}
EOF_HTTP
}
my $RCV_SERVER = <<'EOF_SRV';
location = /drain {
    content_by_lua_block {
        local rcv = ngx.shared.rcv
        local k = "l:" .. ngx.var.arg_c .. ":" .. ngx.var.arg_pid
        local t = {}
        while true do
            local v = rcv:lpop(k)
            if v == nil then break end
            t[#t + 1] = (v:gsub("\\", "\\\\"):gsub("\n", "\\n"))  -- one line per payload
        end
        ngx.print(table.concat(t, "\n"), "\n")
    }
}
location = /post3 {
    content_by_lua_block {
        -- three posts in a row: the middle one is not representable in LATIN1
        local wb = require "resty.workerbus"
        for _, p in ipairs({ "ok1", "\226\130\172 euro", "ok2" }) do
            local ok, err = wb.post(ngx.var.arg_c, p)
            ngx.say(ok, " ", err)
        end
    }
}
location = /stream {
    content_by_lua_block {
        local c, n, gap = ngx.var.arg_c, tonumber(ngx.var.arg_n), tonumber(ngx.var.arg_gap)
        local function run()
            local wb = require "resty.workerbus"
            for i = 1, n do
                local ok, err = wb.post(c, "s" .. i)
                if not ok then ngx.log(ngx.ERR, "stream post ", i, ": ", err) end
                ngx.sleep(gap)
            end
            ngx.shared.rcv:set("done:" .. c, true)
        end
        ngx.say(ngx.timer.at(0, run))
    }
}
location = /flag { content_by_lua_block { ngx.say(tostring(ngx.shared.rcv:get(ngx.var.arg_k))) } }
EOF_SRV

# Event handlers for source "src" in both APIs, kept in "got" ("we:<pid>", "ev:<pid>").
my $EV_HTTP = <<'EOF_HTTP';
lua_shared_dict ev 1m;
init_by_lua_block {
    _G.rev = require("resty.events").new { listening = "unix:/tmp/wb405-unused.sock" }
}
init_worker_by_lua_block {
    local we = require "resty.worker.events"
    assert(we.configure { shm = "ev", interval = 1 })
    local cjson = require "cjson"
    we.register(function(data, event, source, pid)
        ngx.shared.got:rpush("we:" .. ngx.worker.pid(), cjson.encode { data = data, event = event, source = source })
    end, "src")
    _G.rev:subscribe("src", "*", function(data, event, source, wid)
        ngx.shared.got:rpush("ev:" .. ngx.worker.pid(), cjson.encode { data = data, event = event, source = source })
    end)
    assert(_G.rev:init_worker())
}
EOF_HTTP
my $EV_SERVER = <<'EOF_SRV';
location = /post_cluster {
    content_by_lua_block {
        local we = require "resty.worker.events"
        ngx.say(we.post_cluster("src", ngx.var.arg_e, "payload-" .. ngx.var.arg_e))
    }
}
location = /list {
    content_by_lua_block {
        local got = ngx.shared.got
        local k = ngx.var.arg_k .. ":" .. ngx.var.arg_pid
        local t = {}
        for i = 1, got:llen(k) or 0 do t[i] = got:lpop(k) end
        ngx.print(table.concat(t, "\n"), "\n")
    }
}
EOF_SRV

# A bus node: name, offset, app (application_name), chans, durable, db, zone, main_extra.
sub bus_node {
    my (%o) = @_;
    my $main = ($o{zone} ? "workerbus_zone wb405 $o{zone};\n" : "")
        . "workerbus_postgres \"" . url($o{app}, $o{db}) . "\" durable=" . ($o{durable} ? "on" : "off")
        . " " . ($o{opts} // $OPTS) . ";";
    my $n = start_node(name => $o{name}, offset => $o{offset}, main => $main,
                       http => rcv_http(@{ $o{chans} }), server => $RCV_SERVER);
    $n->{app} = $o{app};
    $n->{chans} = $o{chans};
    return $n;
}
sub ev_node {
    my (%o) = @_;
    my $main = "workerbus_postgres \"" . url($o{app}) . "\" $OPTS" . ($o{secret} ? " secret_file=$o{secret}" : "") . ";";
    my $n = eval { start_node(name => $o{name}, offset => $o{offset}, main => $main, http => $EV_HTTP, server => $EV_SERVER) };
    if (!$n) {
        my ($line) = ($@ // "") =~ /^(.*\[emerg\].*)$/m;
        diag "node $o{name} did not start: " . ($line // $@);
        return undef;
    }
    $n->{app} = $o{app};
    return $n;
}

sub st { my ($n) = @_; ($n && pgst($n)) || {} }
sub num { my ($v) = @_; defined $v && !ref $v && $v =~ /^\d+\z/ }
sub is_connected { (st($_[0])->{state} // "") eq "connected" }
sub workers_of {
    my ($n) = @_;
    my $s = $n && node_status($n) or return ();
    return map { $_->{pid} } grep { $_->{state} eq "running" } @{ $s->{workers} };
}
sub ready {
    my ($n, @ch) = @_;
    return wait_until(30, sub { is_connected($n) && !grep { !listening($n, $_) } @ch });
}

# Drains what every worker received on a channel into $n->{acc}{$ch}{$pid}{$payload} (counts).
sub collect {
    my ($n, $ch) = @_;
    my $acc = $n->{acc}{$ch} //= {};
    for my $pid (workers_of($n)) {
        my $body = node_get($n, "/drain?c=$ch&pid=$pid");
        $acc->{$pid} //= {};
        next unless defined $body;
        $acc->{$pid}{$_}++ for grep { length } split /\n/, $body;
    }
    return $acc;
}
# True when every running worker has every payload of @want.
sub have_all {
    my ($n, $ch, @want) = @_;
    my @pids = workers_of($n);
    return 0 unless @pids;
    my $acc = collect($n, $ch);
    for my $pid (@pids) {
        for my $w (@want) { return 0 unless $acc->{$pid}{$w} }
    }
    return 1;
}
sub wait_all { my ($secs, $n, $ch, @want) = @_; wait_until($secs, sub { have_all($n, $ch, @want) }) }

# Posts a marker row from SQL and waits until every worker has it: whatever
# was committed before it has had its chance to arrive.
my $marker = 0;
sub settle {
    my ($n, $ch) = @_;
    my $m = "marker" . ++$marker;
    psql($conn, "select workerbus_post('$ch', '$m', 'sql')") // return 0;
    return wait_all($DELIVER, $n, $ch, $m);
}

# Per worker: what it received on the channel (markers left out) is exactly
# @want, each once.
sub exact {
    my ($n, $ch, $name, $want, %o) = @_;
    my $acc = collect($n, $ch);
    my %want = map { $_ => 1 } @$want;
    my $ignore = $o{ignore};
    my @pids = workers_of($n);
    ok(scalar @pids, "$name: the node has running workers");
    for my $pid (@pids) {
        my $got = $acc->{$pid} || {};
        my @missing = grep { !$got->{$_} } @$want;
        my @dups = grep { $got->{$_} > 1 && !/^marker\d+\z/ && !($ignore && /$ignore/) } sort keys %$got;
        my @extra = grep { !$want{$_} && !/^marker\d+\z/ && !($ignore && /$ignore/) } sort keys %$got;
        my $total = 0;
        $total += $got->{$_} for grep { $want{$_} } keys %$got;
        my $short = sub { map { length > 24 ? substr($_, 0, 24) . "..." : $_ } @_ };
        ok(!@missing && !@dups && !@extra, "$name: worker $pid received each of the " . scalar(@$want) . " rows exactly once")
            or diag sprintf("worker %s: %d deliveries of wanted rows, %d missing (%s), %d duplicated (%s), %d unexpected (%s)",
                            $pid, $total, scalar @missing, join(",", $short->(@missing[0 .. ($#missing < 4 ? $#missing : 4)])),
                            scalar @dups, join(",", map { $short->($_) . " x$got->{$_}" } @dups[0 .. ($#dups < 4 ? $#dups : 4)]),
                            scalar @extra, join(",", $short->(@extra[0 .. ($#extra < 4 ? $#extra : 4)])));
    }
}

# The node away: its database refuses connections, its backend is
# terminated, and its status shows at least one failed attempt since.
sub block_db   { psql_ok($admin, "alter database test allow_connections false") }
sub unblock_db { psql_ok($admin, "alter database test allow_connections true") }
sub kick {
    my ($app) = @_;
    return psql($admin, "select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = '$app'") // "";
}
sub send_away {
    my ($n) = @_;
    my $fails = st($n)->{connect_failures} // 0;
    return 0 unless block_db();
    return 0 unless kick($n->{app}) >= 1;
    return wait_until(30, sub { my $p = st($n); ($p->{state} // "") ne "connected" && ($p->{connect_failures} // 0) > $fails });
}
sub bring_back {
    my ($n, $reconnects) = @_;
    return 0 unless unblock_db();
    return wait_until(30, sub { my $p = st($n); is_connected($n) && ($p->{reconnects} // 0) > $reconnects });
}
END { psql($admin, "alter database test allow_connections true") if $pg }

sub posts_sql {
    my ($ch, $prefix, $n) = @_;
    return "select count(workerbus_post('$ch', '$prefix' || i, 'sql')) from generate_series(1, $n) i";
}

# T405_CASES=3,5 runs only those cases (while working on one).
my %only = map { $_ => 1 } grep { length } split /[,\s]+/, $ENV{T405_CASES} // "";
sub want_case { !%only || $only{ $_[0] } }

my $t0 = time;

# ===========================================================================
# Case 1: forged notifications.
if (want_case(1)) {
    my $C = "t405_c1";
    my $A = bus_node(name => "a", offset => 0, app => "wb405_a", chans => [$C], durable => 1);
    ok(ready($A, $C), "case 1 (forged): the durable node connects and listens");
    my $p = st($A);
    ok(num($p->{posts_refused}), "status: postgres.posts_refused is a number") or diag explain $p;
    ok(num($p->{rejected}), "status: postgres.rejected is a number");
    ok(ref $p->{durable} eq "HASH" && num($p->{durable}{$_}), "status: postgres.durable.$_ is a number")
        for qw(replayed duplicates_skipped rebases);

    ok(psql_ok($conn, "select pg_notify('$C', 'wbd 1000000000000 x' || chr(10) || 'forged')"),
       "case 1 (forged id 1000000000000): forged notification sent from psql");
    is(psql($conn, posts_sql($C, "r", 20)), "20", "case 1 (forged id 1000000000000): 20 real rows posted with workerbus_post");
    my @real = map { "r$_" } 1 .. 20;
    ok(wait_all($DELIVER, $A, $C, @real), "case 1 (forged id 1000000000000): every real row reaches every worker")
        or diag "received: " . encode_json(collect($A, $C));
    ok(settle($A, $C), "case 1 (forged id 1000000000000): a later marker row arrives");
    exact($A, $C, "case 1 (forged id 1000000000000)", \@real, ignore => qr/forged/);
    stop_node($A);

    $A = bus_node(name => "a", offset => 0, app => "wb405_a", chans => [$C], durable => 1);
    ok(ready($A, $C), "case 1 (forged next id): a fresh node connects and listens");
    my $id = psql($conn, "select workerbus_post('$C', 'pre', 'sql')") // 0;
    ok(wait_all($DELIVER, $A, $C, "pre"), "case 1 (forged next id): a real row arrives first (id $id)");
    my $next = $id + 1;
    ok(psql_ok($conn, "select pg_notify('$C', 'wbd $next 99999999999 x' || chr(10) || 'forged-next')"),
       "case 1 (forged next id): forged 'wbd $next 99999999999 x' sent from psql");
    is(psql($conn, "select workerbus_post('$C', 'real-next', 'sql')"), $next,
       "case 1 (forged next id): the real row gets id $next");
    ok(wait_all($DELIVER, $A, $C, "real-next"), "case 1 (forged next id): the real row with the forged id reaches every worker");
    ok(settle($A, $C), "case 1 (forged next id): a later marker row arrives");
    exact($A, $C, "case 1 (forged next id)", [ "pre", "real-next" ], ignore => qr/forged/);
    stop_node($A);
}

# ===========================================================================
# Case 2: ids going backwards.
if (want_case(2)) {
    my $C = "t405_c2";
    my $A = bus_node(name => "a", offset => 0, app => "wb405_a", chans => [$C], durable => 1);
    ok(ready($A, $C), "case 2 (ids backwards): the durable node connects and listens");
    is(psql($conn, posts_sql($C, "before", 50)), "50", "case 2 (ids backwards): 50 rows posted");
    my @before = map { "before$_" } 1 .. 50;
    ok(wait_all($DELIVER, $A, $C, @before), "case 2 (ids backwards): they arrive");
    ok(psql_ok($conn, "truncate workerbus_outbox restart identity"), "case 2 (ids backwards): TRUNCATE workerbus_outbox RESTART IDENTITY");
    is(psql($conn, "select min(id) from (select workerbus_post('$C', 'after' || i, 'sql') id from generate_series(1, 50) i) t"), "1",
       "case 2 (ids backwards): 50 new rows posted, ids from 1 again");
    my @after = map { "after$_" } 1 .. 50;
    ok(wait_all($DELIVER, $A, $C, @after), "case 2 (ids backwards): every new row reaches every worker")
        or diag "durable status: " . encode_json(st($A)->{durable} // {});
    ok(settle($A, $C), "case 2 (ids backwards): a later marker row arrives");
    exact($A, $C, "case 2 (ids backwards)", [ @before, @after ]);
    stop_node($A);
}

# ===========================================================================
# Case 3: late commit.
if (want_case(3)) {
    my $C = "t405_c3";
    my $A = bus_node(name => "a", offset => 0, app => "wb405_a", chans => [$C], durable => 1);
    ok(ready($A, $C), "case 3 (late commit): the durable node connects and listens");

    # (a) committed while the node is connected.
    my $late = sess_open($conn);
    my $lid = sess_do($late, "begin; select workerbus_post('$C', 'late', 'sql');");
    ok(num($lid), "case 3a (late commit, connected): an open transaction posted 'late' (id " . ($lid // "?") . ")");
    is(psql($conn, posts_sql($C, "n", 5000)), "5000", "case 3a (late commit, connected): 5,000 later rows committed");
    my @n = map { "n$_" } 1 .. 5000;
    ok(wait_all(60, $A, $C, @n), "case 3a (late commit, connected): the 5,000 arrive");
    ok(defined sess_do($late, "commit;"), "case 3a (late commit, connected): the late transaction commits");
    ok(wait_all($DELIVER, $A, $C, "late"), "case 3a (late commit, connected): 'late' reaches every worker")
        or diag "durable status: " . encode_json(st($A)->{durable} // {});
    ok(settle($A, $C), "case 3a (late commit, connected): a later marker row arrives");
    exact($A, $C, "case 3a (late commit, connected)", [ "late", @n ]);

    # (b) committed while the node is away.
    delete $A->{acc};
    my $lid2 = sess_do($late, "begin; select workerbus_post('$C', 'late2', 'sql');");
    ok(num($lid2), "case 3b (late commit, node away): an open transaction posted 'late2'");
    is(psql($conn, posts_sql($C, "m", 5000)), "5000", "case 3b (late commit, node away): 5,000 later rows committed");
    my @m = map { "m$_" } 1 .. 5000;
    ok(wait_all(60, $A, $C, @m), "case 3b (late commit, node away): the 5,000 arrive");
    my $rc = st($A)->{reconnects} // 0;
    ok(send_away($A), "case 3b (late commit, node away): the node's backend is terminated and it cannot reconnect");
    ok(defined sess_do($late, "commit;"), "case 3b (late commit, node away): the late transaction commits");
    ok(!is_connected($A) && (st($A)->{reconnects} // 0) == $rc, "case 3b (late commit, node away): the node was still away at the commit");
    ok(bring_back($A, $rc), "case 3b (late commit, node away): the node reconnects");
    ok(wait_all($DELIVER, $A, $C, "late2"), "case 3b (late commit, node away): 'late2' reaches every worker after the reconnect")
        or diag "durable status: " . encode_json(st($A)->{durable} // {});
    ok(settle($A, $C), "case 3b (late commit, node away): a later marker row arrives");
    exact($A, $C, "case 3b (late commit, node away)", [ "late2", @m ]);
    sess_close($late);
    stop_node($A);
}

# ===========================================================================
# Case 4: reconnect with a backlog, and another node posting meanwhile.
if (want_case(4)) {
    my $C = "t405_c4";
    my $A = bus_node(name => "a", offset => 0, app => "wb405_a", chans => [$C], durable => 1, zone => "64m");
    my $B = bus_node(name => "b", offset => 1, app => "wb405_b", chans => ["t405_c4_unused"], durable => 1);
    ok(ready($A, $C) && ready($B), "case 4 (backlog): nodes A and B connect, A listens");
    is(psql($conn, posts_sql($C, "p", 50)), "50", "case 4 (backlog): 50 rows posted while A is connected");
    my @p = map { "p$_" } 1 .. 50;
    ok(wait_all($DELIVER, $A, $C, @p), "case 4 (backlog): they arrive");
    my $s = sess_open($conn);
    ok(defined sess_do($s, "select 1;"), "case 4 (backlog): a psql session is open");
    my $rc = st($A)->{reconnects} // 0;
    ok(send_away($A), "case 4 (backlog): A's backend is terminated and it cannot reconnect");
    is(sess_do($s, posts_sql($C, "b", 6000) . ";"), "6000", "case 4 (backlog): 6,000 rows committed while A is away");
    my $out = st($B)->{notifications_out} // 0;
    is(node_get($B, "/stream?c=$C&n=3000&gap=0.001"), "1\n", "case 4 (backlog): B starts posting 3,000 rows, 1 ms apart");
    ok(wait_until(30, sub { (st($B)->{notifications_out} // 0) >= $out + 300 }), "case 4 (backlog): B committed some of them while A is away");
    ok(bring_back($A, $rc), "case 4 (backlog): A reconnects (B still posting)");
    ok(wait_until(60, sub { (node_get($B, "/flag?k=done:$C") // "") eq "true\n" }), "case 4 (backlog): B finished posting");
    ok(wait_until(30, sub { (st($B)->{queue_depth} // 1) == 0 }), "case 4 (backlog): B's queue is empty");
    my @want = (@p, (map { "b$_" } 1 .. 6000), (map { "s$_" } 1 .. 3000));
    ok(wait_all($DELIVER, $A, $C, @want), "case 4 (backlog): every worker of A has all 9,050 rows")
        or diag "durable status: " . encode_json(st($A)->{durable} // {});
    ok(settle($A, $C), "case 4 (backlog): a later marker row arrives");
    exact($A, $C, "case 4 (backlog)", \@want);
    sess_close($s);
    stop_node($A);
    stop_node($B);
}

# ===========================================================================
# Case 5: replay efficiency.
if (want_case(5)) {
    my ($C, $X) = ("t405_c5", "t405_c5_nobody");
    my $A = bus_node(name => "a", offset => 0, app => "wb405_a", chans => [$C], durable => 1, zone => "64m");
    ok(ready($A, $C), "case 5 (replay efficiency): the durable node connects and listens");
    is(psql($conn, posts_sql($C, "w", 10)), "10", "case 5 (replay efficiency): 10 rows posted while connected");
    ok(wait_all($DELIVER, $A, $C, map { "w$_" } 1 .. 10), "case 5 (replay efficiency): they arrive");
    my $s = sess_open($conn);
    ok(defined sess_do($s, "select 1;"), "case 5 (replay efficiency): a psql session is open");
    my $rc = st($A)->{reconnects} // 0;
    ok(send_away($A), "case 5 (replay efficiency): the node's backend is terminated and it cannot reconnect");
    my $d0 = st($A)->{durable} // {};
    is(sess_do($s, posts_sql($C, "e", 20000) . ";"), "20000", "case 5 (replay efficiency): 20,000 rows committed on the node's channel");
    is(sess_do($s, posts_sql($X, "x", 20000) . ";"), "20000", "case 5 (replay efficiency): 20,000 rows committed on a channel nobody listens to");
    ok(bring_back($A, $rc), "case 5 (replay efficiency): the node reconnects");
    my @e = map { "e$_" } 1 .. 20000;
    ok(wait_all(60, $A, $C, @e), "case 5 (replay efficiency): every worker has the 20,000 rows of its channel")
        or diag "durable status: " . encode_json(st($A)->{durable} // {});
    ok(settle($A, $C), "case 5 (replay efficiency): a later marker row arrives");
    exact($A, $C, "case 5 (replay efficiency)", [ (map { "w$_" } 1 .. 10), @e ]);
    my $d1 = st($A)->{durable} // {};
    my $replayed = ($d1->{replayed} // 0) - ($d0->{replayed} // 0);
    my $dups = ($d1->{duplicates_skipped} // 0) - ($d0->{duplicates_skipped} // 0);
    # The marker is the only row that may have arrived live (it is posted after the replay).
    ok($replayed >= 20000 && $replayed <= 20001, "case 5 (replay efficiency): durable.replayed grew by 20,000 (grew by $replayed)");
    ok(num($d1->{duplicates_skipped}) && $dups < 100, "case 5 (replay efficiency): durable.duplicates_skipped grew by less than 100 (grew by $dups)");
    sess_close($s);
    stop_node($A);
}

# ===========================================================================
# Case 6: a post the server refuses (LATIN1 database).
if (want_case(6)) {
    my $DB = "wb405_latin1";
    ok(psql_ok($admin, "create database $DB template template0 encoding 'LATIN1' lc_collate 'C' lc_ctype 'C'"),
       "case 6 (refused post): a LATIN1 database");
    my %ch = (N => "t405_c6n", D => "t405_c6d");
    my $N = bus_node(name => "a", offset => 0, app => "wb405_n", chans => [ $ch{N} ], db => $DB);
    my $D = bus_node(name => "b", offset => 1, app => "wb405_d", chans => [ $ch{D} ], db => $DB, durable => 1);
    my %node = (N => $N, D => $D);
    my %mode = (N => "non-durable", D => "durable");
    for my $k (qw(N D)) {
        ok(ready($node{$k}, $ch{$k}), "case 6 (refused post, $mode{$k}): the node connects and listens");
    }
    for my $k (qw(N D)) {
        is(node_get($node{$k}, "/post3?c=$ch{$k}"), "true nil\n" x 3, "case 6 (refused post, $mode{$k}): 'ok1', '€', 'ok2' accepted at the call");
    }
    for my $k (qw(N D)) {
        my ($n, $c, $m) = ($node{$k}, $ch{$k}, $mode{$k});
        ok(wait_all($DELIVER, $n, $c, "ok1", "ok2"), "case 6 (refused post, $m): 'ok1' and 'ok2' reach every worker");
        my $acc = collect($n, $c);
        ok(!grep({ grep { /euro/ } keys %{ $acc->{$_} } } keys %$acc), "case 6 (refused post, $m): the '€' post reaches no worker");
        ok(wait_until(10, sub { (st($n)->{queue_depth} // -1) == 0 }), "case 6 (refused post, $m): queue_depth drains to 0")
            or diag "queue_depth " . (st($n)->{queue_depth} // "?");
        my $p = st($n);
        is($p->{posts_refused}, 1, "case 6 (refused post, $m): posts_refused is 1");
        is($p->{reconnects}, 0, "case 6 (refused post, $m): the node did not reconnect (reconnects 0)");
        my @lines = grep { /22P05/ } split /\n/, node_log($n);
        is(scalar @lines, 1, "case 6 (refused post, $m): one error log line with SQLSTATE 22P05")
            or diag join("\n", @lines[0 .. ($#lines < 2 ? $#lines : 2)]);
        like($lines[0] // "", qr/\Q$c\E/, "case 6 (refused post, $m): the line names the channel $c");
    }
    stop_node($N);
    stop_node($D);
}

# ===========================================================================
# Case 7: cluster-event flags from the wire.
if (want_case(7)) {
    my $A = ev_node(name => "a", offset => 0, app => "wb405_a");
    my $B = ev_node(name => "b", offset => 1, app => "wb405_b");
    for my $n ($A, $B) {
        ok($n && wait_until(30, sub { is_connected($n) && listening($n, "workerbus_events") }),
           "case 7 (event flags): node $n->{name} listens to workerbus_events");
    }
    my %r0 = map { $_->{name} => st($_)->{rejected} } $A, $B;
    my @forged = (
        [ "'3 3 2' || chr(10) || 'srcevdata'",          "kind 3 (string.buffer) from the wire" ],
        [ "'4294967295 3 2' || chr(10) || 'srcevdata'", "flags 4294967295" ],
        [ "'4294901760 3 2' || chr(10) || 'srcevdata'", "flags 0xFFFF0000 (raw data, unknown high bits)" ],
        [ "'1 99 1' || chr(10) || 'ab'",                "malformed lengths" ],
    );
    for my $f (@forged) {
        ok(psql_ok($conn, "select pg_notify('workerbus_events', $f->[0])"), "case 7 (event flags): psql pg_notify on workerbus_events: $f->[1]");
    }
    is(node_get($B, "/post_cluster?e=real"), "true\n", "case 7 (event flags): a real post_cluster from B");
    for my $n ($A, $B) {
        for my $pid (workers_of($n)) {
            my ($we, $ev) = ("", "");
            ok(wait_until($DELIVER, sub {
                $we .= node_get($n, "/list?k=we&pid=$pid") // "";
                $ev .= node_get($n, "/list?k=ev&pid=$pid") // "";
                $we =~ /"event":"real"/ && $ev =~ /"event":"real"/;
            }), "case 7 (event flags): node $n->{name} worker $pid: the real post_cluster arrives in both APIs");
            my @got = map { decode_json($_)->{event} } grep { /\S/ } split /\n/, $we . $ev;
            is_deeply(\@got, [ "real", "real" ], "case 7 (event flags): node $n->{name} worker $pid: no forged event reached a handler")
                or diag "$we$ev";
        }
        my $r1 = st($n)->{rejected};
        ok(num($r1) && num($r0{ $n->{name} }) && $r1 - $r0{ $n->{name} } == scalar @forged,
           "case 7 (event flags): node $n->{name}: rejected grew by " . scalar(@forged))
            or diag "rejected before " . ($r0{ $n->{name} } // "undef") . ", after " . ($r1 // "undef");
    }
    stop_node($_) for grep { $_ } $A, $B;
}

# ===========================================================================
# Case 8: signed cluster events.
if (want_case(8)) {
    my $dir = tempdir("wb405-XXXXXX", TMPDIR => 1, CLEANUP => 1);
    my %secret;
    for ([ same => "s" x 24 . "-shared-secret" ], [ other => "o" x 24 . "-other-secret" ], [ short => "short" ]) {
        $secret{ $_->[0] } = "$dir/$_->[0]";
        open(my $fh, ">", $secret{ $_->[0] }) or die;
        print $fh "$_->[1]\nsecond line ignored\n";
        close $fh;
    }
    my $missing = "$dir/no-such-secret";
    my ($rc, $out) = nginx_t(main => "workerbus_postgres \"postgresql://127.0.0.1/db\" secret_file=$secret{same};");
    is($rc, 0, "case 8 (signed events): nginx -t passes with secret_file") or diag $out;
    ($rc, $out) = nginx_t(main => "workerbus_postgres \"postgresql://127.0.0.1/db\" secret_file=$missing;");
    isnt($rc, 0, "case 8 (signed events): nginx -t fails with a missing secret_file");
    ok($out =~ /"workerbus_postgres" directive: .*secret_file.*\Q$missing\E/ && $out !~ /unknown option/,
       "case 8 (signed events): the message names secret_file and the path") or diag $out;
    ($rc, $out) = nginx_t(main => "workerbus_postgres \"postgresql://127.0.0.1/db\" secret_file=$secret{short};");
    isnt($rc, 0, "case 8 (signed events): nginx -t fails with a secret shorter than 16 bytes");
    ok($out =~ /secret_file/ && $out !~ /unknown option/, "case 8 (signed events): the message names secret_file") or diag $out;

    my $A = ev_node(name => "a", offset => 0, app => "wb405_a", secret => $secret{same});
    my $B = ev_node(name => "b", offset => 1, app => "wb405_b", secret => $secret{same});
    ok($A && $B, "case 8 (signed events): two nodes with the same secret_file start");
    for my $n (grep { $_ } $A, $B) {
        ok(wait_until(30, sub { is_connected($n) && listening($n, "workerbus_events") }),
           "case 8 (signed events): node $n->{name} listens to workerbus_events");
    }
    my $events = sub {
        my ($n, $pid) = @_;
        my $t = (node_get($n, "/list?k=we&pid=$pid") // "") . (node_get($n, "/list?k=ev&pid=$pid") // "");
        return map { decode_json($_)->{event} } grep { /\S/ } split /\n/, $t;
    };
    my %seen;    # "$name:$pid" => [events]
    my $arrived = sub {
        my ($n, $e) = @_;
        return 0 unless $n;
        my @pids = workers_of($n) or return 0;
        for my $pid (@pids) {
            push @{ $seen{"$n->{name}:$pid"} }, $events->($n, $pid);
            return 0 unless 2 == grep { $_ eq $e } @{ $seen{"$n->{name}:$pid"} };
        }
        return 1;
    };
    ok($A && (node_get($A, "/post_cluster?e=signed") // "") eq "true\n", "case 8 (same secret): post_cluster from A");
    ok($B && wait_until($DELIVER, sub { $arrived->($B, "signed") }), "case 8 (same secret): it reaches every worker of B, in both APIs");

    # B again, with another secret.
    stop_node($B) if $B;
    $B = ev_node(name => "b", offset => 1, app => "wb405_b", secret => $secret{other});
    ok($B && wait_until(30, sub { is_connected($B) && listening($B, "workerbus_events") }),
       "case 8 (other secret): B restarted with another secret listens");
    my $r0 = st($A)->{rejected};
    my $o0 = st($B)->{notifications_out} // 0;
    ok($B && (node_get($B, "/post_cluster?e=wrongkey") // "") eq "true\n", "case 8 (other secret): post_cluster from B");
    ok($B && wait_until(30, sub { (st($B)->{notifications_out} // 0) > $o0 }), "case 8 (other secret): B committed it");
    ok(psql_ok($conn, "select pg_notify('workerbus_events', '0 3 8' || chr(10) || 'srcunsignedx')"),
       "case 8 (unsigned): a well-formed unsigned event sent with psql");
    ok($A && (node_get($A, "/post_cluster?e=marker8") // "") eq "true\n", "case 8 (signed events): A posts a later event of its own");
    ok($A && wait_until($DELIVER, sub { $arrived->($A, "marker8") }), "case 8 (signed events): A's own signed event reaches its workers");
    for my $key (grep { /^a:/ } sort keys %seen) {
        my @bad = grep { $_ eq "wrongkey" || $_ eq "unsigned" } @{ $seen{$key} };
        is(scalar @bad, 0, "case 8 (other secret, unsigned): worker " . ($key =~ s/^a://r) . " of A: no event from the other secret or unsigned")
            or diag "@{ $seen{$key} }";
    }
    my $r1 = st($A)->{rejected};
    ok(num($r0) && num($r1) && $r1 - $r0 == 2, "case 8 (other secret, unsigned): A's rejected grew by 2")
        or diag "rejected before " . ($r0 // "undef") . ", after " . ($r1 // "undef");
    ok($A && node_log($A) =~ /workerbus.*(signature|signed|unsigned|reject|secret|hmac)/i,
       "case 8 (other secret, unsigned): A's error log has a line about the dropped events");
    stop_node($_) for grep { $_ } $A, $B;
}

note sprintf("suite time %.1fs", time - $t0);
done_testing();
