# vim:set ft=perl ts=4 sw=4 et:
# Deployment, against a private PostgreSQL server this suite starts:
# 1. a silent peer (a TCP proxy of this suite, stopped with SIGSTOP: no FIN,
#    no RST, the kernel keeps accepting) is found by the keepalive probe
#    within request_timeout, the session is replaced once the path works
#    again, and posts queued meanwhile are delivered;
# 2. least privilege in durable mode: the bridge's role has only the grants
#    of docs/postgres.md ("Deploying") on objects an administrator created;
#    where the objects are missing and the role cannot create them, one
#    clear line per attempt and a backoff that grows;
# 3. objects that exist and are owned by another role: the bridge runs no
#    DDL (it would fail: only the owner may replace a function).
# Processes started here (the proxy) are stopped by pid in the END block;
# PgNodes stops the nodes and the server.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(time);
use PgNodes;

my @proxies;
END {
    my $rc = $?;
    for my $pid (@proxies) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
    }
    $? = $rc;
}

my $pg = private_pg();
my $hp = "$pg->{host}:$pg->{port}";
my $su = sub { "host=$pg->{host} port=$pg->{port} user=postgres dbname=$_[0] sslmode=disable" };
my $SUB = "t406_sub";
my $metrics_loc = "location = /metrics { workerbus_metrics; }\n";
my %common = (http => bus_http($SUB), server => bus_server() . $metrics_loc);

sub workers_of { map { $_->{pid} } grep { $_->{state} eq "running" } @{ node_status($_[0])->{workers} } }
sub got_all {
    my ($n, $count) = @_;
    my @pids = workers_of($n);
    my $g = decode_json(node_get($n, "/got") // "{}");
    return @pids && !grep { ($g->{$_} // 0) < $count } @pids;
}
sub drain_all { my ($n) = @_; map { [ $_, node_get($n, "/drain?pid=$_") ] } workers_of($n) }
sub connected { my $p = pgst($_[0]); $p && $p->{state} eq "connected" }
sub num { defined $_[0] && !ref $_[0] && $_[0] =~ /^-?\d+(\.\d+)?([eE][-+]?\d+)?$/ }

# A TCP proxy 127.0.0.1:<free port> -> PostgreSQL, one forked process
# (SIGSTOP freezes every connection through it at once).
sub start_proxy {
    my ($to_port) = @_;
    my $l = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0, Listen => 16, ReuseAddr => 1)
        or die "proxy listen: $!";
    my $port = $l->sockport;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        eval {
            $SIG{PIPE} = 'IGNORE';
            my $sel = IO::Select->new($l);
            my %peer;
            while (1) {
                for my $fh ($sel->can_read) {
                    if ($fh == $l) {
                        my $c = $l->accept or next;
                        my $u = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $to_port);
                        if (!$u) { close $c; next }
                        $peer{$c} = $u;
                        $peer{$u} = $c;
                        $sel->add($c, $u);
                        next;
                    }
                    my $other = $peer{$fh} or next;
                    my $n = sysread($fh, my $buf, 65536);
                    if (!$n) {
                        for my $s ($fh, $other) { $sel->remove($s); delete $peer{$s}; close $s }
                        next;
                    }
                    my $off = 0;
                    while ($off < $n) {
                        my $w = syswrite($other, $buf, $n - $off, $off);
                        last unless defined $w;
                        $off += $w;
                    }
                }
            }
        };
        POSIX::_exit(0);
    }
    close $l;
    push @proxies, $pid;
    return ($pid, $port);
}

# A waiter on $ch in a request of its own; returns a closure that reads
# its response. Waits (with a deadline) until the waiter is in wb.wait.
sub waiter {
    my ($n, $ch) = @_;
    my $res = bg_get($n, "/wait?c=$ch&t=60");
    ok(wait_until(20, sub { node_get($n, "/waiting?c=$ch") eq "1\n" }), "a waiter on $ch");
    return $res;
}
# Sends pg_notify (from psql, not through the bridge) every half second
# until the waiter on $ch woke: a notification sent before the node's
# LISTEN took effect is not lost for the test, only repeated.
sub notify_until_woken {
    my ($n, $ch, $payload, $secs) = @_;
    my $next = 0;
    return wait_until($secs, sub {
        if (time >= $next) {
            psql($su->("test"), "select pg_notify('$ch', '$payload')");
            $next = time + 0.5;
        }
        node_get($n, "/waiting?c=$ch") eq "0\n";
    });
}
# The bridge's last log lines (for diagnostics).
sub wblog {
    my ($n, $k) = @_;
    my @l = grep { /workerbus: postgres/ } split /\n/, node_log($n);
    splice(@l, 0, @l - ($k // 8)) if @l > ($k // 8);
    return join("\n", @l) || "(no workerbus: postgres lines)";
}
sub metric {
    my ($text, $name) = @_;
    return $text =~ /^\Q$name\E(?:\{[^}]*\})?\s+(\S+)\s*$/m ? $1 : undef;
}

# ---------------------------------------------------------------------------
# 1. Silent peer.
{
    my ($ppid, $pport) = start_proxy($pg->{port});
    my $url = "postgresql://postgres\@127.0.0.1:$pport/test?sslmode=disable&application_name=wb406p";
    my $N = eval { start_node(name => "a", offset => 0, %common,
        main => "workerbus_postgres \"$url\" keepalive=1s request_timeout=2s backoff_min=100ms backoff_max=1s;") };
    ok($N, "a node with keepalive=1s request_timeout=2s starts") or diag $@;
    SKIP: {
    skip "1: the node did not start", 1 unless $N;
    ok(wait_until(30, sub { connected($N) && listening($N, $SUB) }), "silent peer: connected through the proxy")
        or diag explain pgst($N);

    # A wait/post round trip through the bridge.
    my $res = waiter($N, "t406_rt");
    ok(wait_until(20, sub { listening($N, "t406_rt") }), "the waited channel is listened");
    is(node_get($N, "/post?c=t406_rt&p=hello"), "true nil\n", "a post");
    like($res->(), qr/^hello\|\S+\/\d+\/\d+$/, "the waiter got it, with the node's id as origin");

    # TCP keepalive on the bridge's socket (the node's side, towards the proxy).
    my $ss = "";
    ok(wait_until(20, sub { $ss = `ss -tnoH state established '( dport = :$pport )' 2>&1`; $ss =~ /timer:\(keepalive,/ }),
       "SO_KEEPALIVE is set on the bridge's connection") or diag $ss;

    # Probes on an idle session.
    ok(wait_until(20, sub { my $p = pgst($N); $p && num($p->{probes}) && $p->{probes} >= 2 }),
       "idle session: keepalive probes are sent (probes >= 2)") or diag explain pgst($N);
    my $p = pgst($N);
    ok(num($p->{probe_ms}), "probe_ms is the last probe's round trip (" . ($p->{probe_ms} // "undef") . ")");

    # Freeze the path: nothing is forwarded, the kernel still accepts and ACKs.
    my $rc = $p->{reconnects};
    ok(kill('STOP', $ppid), "proxy $ppid stopped (SIGSTOP)");
    my $last_error;
    ok(wait_until(20, sub {
        my $q = pgst($N) or return 0;
        $last_error = $q->{last_error} if ($q->{last_error} // "") =~ /request_timeout|keepalive|probe/i;
        $q->{state} ne "connected" && num($q->{probe_failures}) && $q->{probe_failures} >= 1 && defined $last_error;
    }), "the silent peer is found: state leaves connected, probe_failures >= 1, last_error names the timeout")
        or diag explain pgst($N);
    diag "last_error: " . ($last_error // "undef");
    my @lines = grep { /workerbus: postgres/ && /probe|keepalive|request_timeout/i } split /\n/, node_log($N);
    ok(@lines >= 1, "the error log says the probe timed out") or diag wblog($N);
    diag $lines[0] if @lines;

    # Posts made while the path is frozen wait in the queue.
    is(node_get($N, "/postn?c=$SUB&n=5"), "posted\n", "5 posts while the proxy is stopped");
    is(pgst($N)->{queue_depth}, 5, "they are queued");

    ok(kill('CONT', $ppid), "proxy resumed (SIGCONT)");
    ok(wait_until(30, sub { my $q = pgst($N); $q && $q->{state} eq "connected" && $q->{reconnects} > $rc }),
       "the node reconnects (reconnects grew, state connected)") or diag explain pgst($N);
    ok(wait_until(30, sub { pgst($N)->{queue_depth} == 0 }), "the queue drains");
    ok(wait_until(30, sub { got_all($N, 5) }), "the queued posts reach every worker") or diag node_get($N, "/got");
    is($_->[1], "1,2,3,4,5\n", "worker $_->[0]: each queued post once, in order") for drain_all($N);

    # LISTEN again: a notification from SQL reaches a waiter.
    $res = waiter($N, "t406_rt2");
    ok(notify_until_woken($N, "t406_rt2", "from psql", 30), "a pg_notify from psql wakes the waiter after the reconnect");
    is($res->(), "from psql|\n", "with its payload (origin empty: not posted through the bridge)");

    # Probes go on on the new session; the metrics.
    my $probes = pgst($N)->{probes} // 0;
    ok(wait_until(20, sub { (pgst($N)->{probes} // 0) > $probes }), "probes continue on the new session");
    $p = pgst($N);
    ok(num($p->{probe_ms}), "probe_ms numeric after the reconnect");
    my $m = node_get($N, "/metrics") // "";
    for my $name (qw(workerbus_pg_probes_total workerbus_pg_probe_failures_total workerbus_pg_probe_seconds)) {
        ok(num(metric($m, $name)), "metric $name has a numeric value (" . (metric($m, $name) // "missing") . ")");
    }
    ok((metric($m, "workerbus_pg_probes_total") // 0) > 0, "workerbus_pg_probes_total > 0");
    ok((metric($m, "workerbus_pg_probe_failures_total") // 0) >= 1, "workerbus_pg_probe_failures_total >= 1");
    stop_node($N);
    }
}

# ---------------------------------------------------------------------------
# 2 and 3. Least privilege, durable mode. The one-time SQL and the grants of
# docs/postgres.md, "Deploying", as written there.
my $TABLE_SQL = <<'SQL';
CREATE TABLE workerbus_outbox (
  id bigserial PRIMARY KEY,
  xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  channel text NOT NULL, payload text NOT NULL, origin text NOT NULL DEFAULT '',
  created timestamptz NOT NULL DEFAULT now());
CREATE INDEX workerbus_outbox_xid ON workerbus_outbox (xid, id);
CREATE INDEX workerbus_outbox_created ON workerbus_outbox (created);
SQL
my $FUNC_SQL = <<'SQL';
CREATE FUNCTION workerbus_post(p_channel text, p_payload text, p_origin text DEFAULT '')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE new_id bigint; new_xid xid8;
BEGIN
  INSERT INTO workerbus_outbox (channel, payload, origin) VALUES (p_channel, p_payload, p_origin)
    RETURNING id, xid INTO new_id, new_xid;
  PERFORM pg_notify(p_channel, 'wbd ' || new_id || ' ' || new_xid || ' ' || p_origin || chr(10) || p_payload);
  RETURN new_id;
END $$;
SQL
my $GRANTS_SQL = sub { my ($db) = @_; <<"SQL" };
GRANT CONNECT ON DATABASE $db TO wb_bridge;
GRANT USAGE ON SCHEMA public TO wb_bridge;
GRANT SELECT, INSERT, DELETE ON workerbus_outbox TO wb_bridge;
GRANT USAGE ON SEQUENCE workerbus_outbox_id_seq TO wb_bridge;
GRANT EXECUTE ON FUNCTION workerbus_post(text, text, text) TO wb_bridge;
SQL

my $PW = "wb-bridge-secret";
my $pwfile = "$FindBin::Bin/servroot_pg_406pw";
{
    open(my $fh, ">", $pwfile) or die "$pwfile: $!";
    print $fh "$PW\n";
    close $fh;
}
# wb_owner owns the databases (and so may create in their public schema);
# wb_bridge logs in with a password (scram-sha-256) and has no CREATE on
# public (PostgreSQL 15's default for non-owners, made explicit). Its
# sessions log their DDL statements (log_statement=ddl), so the server's log
# shows whether the bridge ran any.
ok(psql_ok($su->("postgres"), "create role wb_owner nologin; create role wb_bridge login password '$PW'; "
                            . "alter role wb_bridge set log_statement = 'ddl'"), "roles wb_owner and wb_bridge");
for my $db (qw(app app_missing app_own)) {
    ok(psql_ok($su->("postgres"), "create database $db owner wb_owner"), "database $db owned by wb_owner");
    ok(psql_ok($su->($db), "revoke create on schema public from public"), "$db: no CREATE on public for PUBLIC");
}
{
    my $hba = "$pg->{data}/pg_hba.conf";
    open(my $fh, "<", $hba) or die;
    my $text = do { local $/; <$fh> };
    close $fh;
    open($fh, ">", $hba) or die;
    print $fh "host all wb_bridge 127.0.0.1/32 scram-sha-256\n$text";
    close $fh;
    psql($su->("postgres"), "select pg_reload_conf()");
}
my $bridge = sub { "host=$pg->{host} port=$pg->{port} user=wb_bridge dbname=$_[0] sslmode=disable" };
ok(wait_until(20, sub { psql_ok($bridge->("postgres"), "select 1", password => $PW) }), "wb_bridge logs in with its password");

my $pglog = "$pg->{dir}/pg.log";
sub pglog_size { -s $pglog // 0 }
sub pglog_since {
    my ($off) = @_;
    open(my $fh, "<", $pglog) or return "";
    seek($fh, $off, 0);
    local $/;
    return <$fh> // "";
}
sub bridge_conf {
    my ($db, $app, $extra) = @_;
    return "workerbus_postgres \"postgresql://wb_bridge\@$hp/$db?sslmode=disable&application_name=$app\" "
         . "password_file=$pwfile durable=on $extra;";
}

# 2a. The objects exist, created by the owner; wb_bridge has the grants only.
ok(psql_ok($su->("app"), "set role wb_owner; $TABLE_SQL $FUNC_SQL " . $GRANTS_SQL->("app")), "app: one-time SQL and grants, as wb_owner");
{
    open(my $save, ">&", \*STDERR) or die;
    open(STDERR, ">", "/dev/null") or die;
    my $ok = psql_ok($bridge->("app"), "create table t406_x (x int)", password => $PW);
    open(STDERR, ">&", $save) or die;
    ok(!$ok, "app: wb_bridge cannot create in public");
}
SKIP: {
    my $off = pglog_size();
    my $A = start_node(name => "a", offset => 0, %common, main => bridge_conf("app", "wb406a", "backoff_min=100ms backoff_max=1s"));
    ok(wait_until(30, sub { connected($A) && listening($A, $SUB) }), "least privilege: the durable node connects as wb_bridge")
        or do {
            diag "status: " . encode_json(pgst($A) // {});
            diag wblog($A, 3);
            stop_node($A);
            skip "2a: the node never connected", 10;
        };
    is(node_get($A, "/postn?c=$SUB&n=5"), "posted\n", "5 posts");
    ok(wait_until(30, sub { got_all($A, 5) }), "they reach every worker") or diag node_get($A, "/got");
    is($_->[1], "1,2,3,4,5\n", "worker $_->[0]: each once, in order") for drain_all($A);
    is(psql($su->("app"), "select count(*) from workerbus_outbox where payload in ('1','2','3','4','5')"), "5",
       "the posts are rows of the administrator's outbox");

    # Replay: A's session is terminated and cannot log in again (NOLOGIN)
    # until posts were committed; then it must replay them from the outbox.
    my $before = pgst($A);
    ok(psql_ok($su->("postgres"), "alter role wb_bridge nologin"), "wb_bridge: NOLOGIN for a while");
    is(psql($su->("app"), "select count(*) > 0 from (select pg_terminate_backend(pid) from pg_stat_activity "
                        . "where application_name = 'wb406a') t"), "t", "A's backend terminated");
    ok(wait_until(30, sub { my $q = pgst($A); $q->{state} ne "connected" && $q->{connect_failures} > $before->{connect_failures} }),
       "A is disconnected and its logins fail");
    ok(psql_ok($su->("app"), "set role wb_bridge; select workerbus_post('$SUB', 'r' || i, 'sql') from generate_series(1, 3) i"),
       "3 posts through workerbus_post() as wb_bridge meanwhile");
    ok(psql_ok($su->("postgres"), "alter role wb_bridge login"), "wb_bridge: LOGIN again");
    ok(wait_until(30, sub { my $q = pgst($A); $q->{state} eq "connected" && $q->{reconnects} > $before->{reconnects} }),
       "A reconnects");
    ok(wait_until(30, sub { got_all($A, 3) }), "the posts made while A was away reach every worker") or diag node_get($A, "/got");
    is($_->[1], "r1,r2,r3\n", "worker $_->[0]: replayed, each once") for drain_all($A);
    ok(pgst($A)->{durable}{replayed} >= 3, "counted as replayed (" . pgst($A)->{durable}{replayed} . ")");

    my @ddl = grep { /LOG:\s+statement:/ } split /\n/, pglog_since($off);
    is(scalar @ddl, 0, "the bridge ran no DDL") or diag $ddl[0];
    stop_node($A);
}

# 2b. The objects are missing and wb_bridge may not create them.
ok(psql_ok($su->("app_missing"), "grant connect on database app_missing to wb_bridge; grant usage on schema public to wb_bridge"),
   "app_missing: CONNECT and USAGE only, no objects");
{
    my $C = start_node(name => "b", offset => 1, %common, main => bridge_conf("app_missing", "wb406c", "backoff_min=100ms backoff_max=2s"));
    my $priv = qr/(permission denied|lacks).*\b(public|workerbus_outbox|workerbus_post|workerbus_outbox_id_seq)\b/;
    ok(wait_until(30, sub { node_log($C) =~ /workerbus: postgres.*$priv/ }), "a line names the privilege and the object")
        or diag wblog($C);
    my ($line) = grep { /workerbus: postgres.*$priv/ } split /\n/, node_log($C);
    diag $line if $line;
    unlike($line // "", qr/\Q$PW\E/, "without the password");

    my $s1 = pgst($C);
    my $t0 = time;
    my %states;
    # A measurement window of 5 s (not a synchronisation): the states seen
    # during it, and the attempts made in it.
    wait_until(30, sub { my $q = pgst($C); $states{ $q->{state} }++ if $q; time - $t0 >= 5 });
    my $s2 = pgst($C);
    my @log = split /\n/, node_log($C);
    my $s3 = pgst($C);
    my $attempts = ($s2->{connects} + $s2->{connect_failures}) - ($s1->{connects} + $s1->{connect_failures});
    my $secs = sprintf "%.1f", time - $t0;
    ok($s2->{connect_failures} > $s1->{connect_failures},
       "connect_failures grows ($s1->{connect_failures} -> $s2->{connect_failures})");
    ok($attempts >= 1 && $attempts < 15, "backoff grows: $attempts attempts in ${secs} s (< 15)");
    is($s3->{connects}, 0, "no session counted as working (connects 0)");
    ok(!$states{connected}, "state never connected (seen: " . join(",", map { "$_ x$states{$_}" } sort keys %states) . ")");
    my @connected = grep { /workerbus: postgres.*: connected \(server/ } @log;
    is(scalar @connected, 0, "no 'connected' line in the log") or diag $connected[0];
    my @tries = grep { /workerbus: postgres.*retrying in/ } @log;
    my @clear = grep { /$priv/ } @tries;
    is(scalar @clear, scalar @tries, "every attempt's line names the privilege and the object");
    ok(@clear >= $s2->{connect_failures} - 1 && @clear <= $s3->{connect_failures} + 1,
       "one line per failed attempt (" . scalar(@clear) . " lines, connect_failures $s2->{connect_failures}..$s3->{connect_failures})");
    stop_node($C);
}

# 3. The objects exist and the function belongs to another role: replacing
# it would fail (must be owner); the bridge must not try.
ok(psql_ok($su->("app_own"), "grant connect on database app_own to wb_bridge; grant usage, create on schema public to wb_bridge; "
                           . "set role wb_bridge; $TABLE_SQL reset role; set role wb_owner; $FUNC_SQL "
                           . "grant execute on function workerbus_post(text, text, text) to wb_bridge"),
   "app_own: the outbox owned by wb_bridge, workerbus_post() by wb_owner");
{
    my $off = pglog_size();
    my $D = start_node(name => "a", offset => 0, %common, main => bridge_conf("app_own", "wb406d", "backoff_min=100ms backoff_max=1s"));
    ok(wait_until(30, sub { connected($D) && listening($D, $SUB) }), "objects of another owner: the node connects")
        or do { diag "status: " . encode_json(pgst($D) // {}); diag wblog($D, 3) };
    is(node_get($D, "/postn?c=$SUB&n=3"), "posted\n", "3 posts");
    ok(wait_until(30, sub { got_all($D, 3) }), "they reach every worker") or diag node_get($D, "/got");
    is($_->[1], "1,2,3\n", "worker $_->[0]: each once, in order") for drain_all($D);
    is(psql($su->("app_own"), "select pg_get_userbyid(proowner) || ' ' || (prosrc like '%new_xid%') from pg_proc where proname = 'workerbus_post'"),
       "wb_owner true", "workerbus_post() is still the administrator's, unchanged");
    my @ddl = grep { /LOG:\s+statement:/ } split /\n/, pglog_since($off);
    is(scalar @ddl, 0, "the bridge ran no DDL") or diag $ddl[0];
    my @bad = grep { /\[(alert|crit|emerg)\]/ } split /\n/, node_log($D);
    is(scalar @bad, 0, "no alerts") or diag "@bad";
    stop_node($D);
}

unlink $pwfile;
done_testing();
