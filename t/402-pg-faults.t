# vim:set ft=perl ts=4 sw=4 et:
# Faults, against a private PostgreSQL server this suite starts and stops:
# database down at start (nginx starts, posts queue, then flow), queue
# overflow, pg_terminate_backend mid-stream in durable mode (every post
# arrives, once), kill -9 of the holder, PostgreSQL restarted, HUP.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use PgNodes;

my $pg = private_pg();
my $conn = "host=$pg->{host} port=$pg->{port} user=postgres dbname=test sslmode=disable";
my $url = "postgresql://postgres\@$pg->{host}:$pg->{port}/test?sslmode=disable";
my $SUB = "t402_sub";
my %common = (http => bus_http($SUB), server => bus_server());
my $opts = "backoff_min=50ms backoff_max=1s connect_timeout=2s";

sub workers_of { map { $_->{pid} } grep { $_->{state} eq "running" } @{ node_status($_[0])->{workers} } }
sub got_all {
    my ($n, $count) = @_;
    my @pids = workers_of($n);
    my $g = decode_json(node_get($n, "/got") // "{}");
    return @pids == 2 && !grep { ($g->{$_} // 0) < $count } @pids;
}
sub drain_all { my ($n) = @_; map { [ $_, node_get($n, "/drain?pid=$_") ] } workers_of($n) }
sub connected { my $p = pgst($_[0]); $p && $p->{state} eq "connected" }

# 0. A server that accepts the connection but never answers: connect_timeout
# ends each attempt (an error, never a hang).
{
    require IO::Socket::INET;
    my $mute = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $pg->{port} + 1, Listen => 16, ReuseAddr => 1)
        or die "listen: $!";
    my $port = $pg->{port} + 1;
    my $n = start_node(name => "b", offset => 1,
        main => "workerbus_postgres \"postgresql://postgres\@127.0.0.1:$port/test?sslmode=disable\" connect_timeout=300ms backoff_min=100ms backoff_max=200ms;",
        %common);
    ok(wait_until(20, sub { my $p = pgst($n); $p && $p->{connect_failures} >= 2 }), "a mute server: attempts keep failing");
    is(pgst($n)->{last_error}, "no reply within connect_timeout (300ms)", "the reason is the connect timeout");
    stop_node($n);
    close $mute;
}

# 1. Database down at start: nginx starts, the status says so, posts queue.
pg_stop($pg);
my $B = start_node(name => "b", offset => 1, main => "workerbus_zone wb 512k;\nworkerbus_postgres \"$url\" $opts;", %common);
ok(wait_until(20, sub { my $p = pgst($B); $p && $p->{state} eq "disconnected" && $p->{last_error} =~ /Connection refused/ }),
   "database down: nginx runs, status says disconnected with the reason") or diag explain pgst($B);
is(node_get($B, "/postn?c=$SUB&n=5"), "posted\n", "posts are accepted while the database is down");
is(pgst($B)->{queue_depth}, 5, "they wait in the queue");
like(node_get($B, "/fill?c=t402_fill"), qr/^\d+ posted, then: post queue full \(\d+ posts, \d+ of \d+ bytes\): the database is not keeping up or is unreachable$/,
     "a full queue is an error at the call");
ok(pgst($B)->{queue_overflow} >= 1, "and counted in the status");
my $fails = pgst($B)->{connect_failures};
ok(wait_until(20, sub { pgst($B)->{connect_failures} > $fails + 1 }), "it keeps retrying");
pg_start($pg);
ok(wait_until(30, sub { connected($B) }), "connects once the database is up");
ok(wait_until(30, sub { got_all($B, 5) }), "the queued posts are delivered");
is($_->[1], "1,2,3,4,5\n", "worker $_->[0] got the queued posts in order") for drain_all($B);
ok(wait_until(30, sub { pgst($B)->{queue_depth} == 0 }), "the queue drains");
stop_node($B);

# 2. Durable mode: pg_terminate_backend mid-stream loses nothing.
# A's session is the one terminated; a longer backoff on A makes sure B
# commits posts while A is away, which A must then replay from the outbox.
my $main = "workerbus_postgres \"$url&application_name=wb_a\" backoff_min=400ms backoff_max=1s durable=on retention=1h;";
my $A = start_node(name => "a", offset => 0, main => $main, %common);
$main = "workerbus_postgres \"$url&application_name=wb_b\" $opts durable=on retention=1h;";
$B = start_node(name => "b", offset => 1, main => $main, %common);
ok(wait_until(30, sub { connected($A) && connected($B) && listening($A, $SUB) && listening($B, $SUB) }), "durable nodes connect");
is(psql($conn, "select count(*) >= 0 from workerbus_outbox"), "t", "the outbox table exists");
is(node_get($B, "/stream?c=$SUB&n=300&gap=0.01"), "1\n", "B streams 300 posts");
for my $round (1 .. 3) {
    my $before = pgst($A)->{reconnects};
    ok(wait_until(20, sub { my $g = decode_json(node_get($A, "/got") // "{}"); ((values %$g)[0] // 0) >= $round * 40 }),
       "round $round: some posts arrived");
    is(psql($conn, "select count(*) > 0 from (select pg_terminate_backend(pid) from pg_stat_activity "
                 . "where application_name = 'wb_a') t"), "t", "round $round: A's backend terminated");
    ok(wait_until(30, sub { pgst($A)->{reconnects} > $before && connected($A) }), "round $round: A reconnected");
}
# And B's session once too: its queued posts wait for it.
is(psql($conn, "select count(*) > 0 from (select pg_terminate_backend(pid) from pg_stat_activity "
             . "where application_name = 'wb_b') t"), "t", "B's backend terminated");
ok(wait_until(60, sub { node_get($B, "/flag?k=done:$SUB") eq "true\n" }), "B finished posting");
ok(wait_until(60, sub { got_all($A, 300) }), "every worker of A has 300 posts") or diag node_get($A, "/got");
my $all = join(",", 1 .. 300);
for my $d (drain_all($A)) {
    my @got = split /,/, $d->[1] =~ s/\n//r;
    is(scalar @got, 300, "worker $d->[0] of A: 300 deliveries, no duplicates");
    is(join(",", sort { $a <=> $b } @got), $all, "worker $d->[0] of A: every post arrived");
}
my $p = pgst($A);
ok($p->{durable}{replayed} > 0, "some were replayed from the outbox ($p->{durable}{replayed})");
ok(wait_until(20, sub { pgst($A)->{durable}{horizon} > 0 && pgst($A)->{durable}{track_overflow} == 0 }),
   "the durable horizon moved, nothing delivered twice for want of room");
my @bad = grep { /\[(alert|crit|emerg)\]/ } split /\n/, node_log($A) . node_log($B);
is(scalar @bad, 0, "no alerts") or diag "@bad";

# Posting from SQL in durable mode: workerbus_post() commits with the
# application's transaction, and a rolled-back one posts nothing.
drain_all($A);
ok(psql_ok($conn, "begin; select workerbus_post('$SUB', 'rolled back', 'sqltest'); rollback"), "a post in a rolled-back transaction");
ok(psql_ok($conn, "begin; create temp table t402(x int); insert into t402 values (1); "
                . "select workerbus_post('$SUB', 'from sql', 'sqltest'); commit"), "a post in a committed transaction");
ok(wait_until(30, sub { got_all($A, 1) }), "it reaches every worker of A");
for my $pid (workers_of($A)) {
    is(node_get($A, "/drain?pid=$pid"), "from sql\n", "worker $pid of A: only the committed post");
    is(node_get($A, "/origin?pid=$pid"), "sqltest\n", "worker $pid of A: with the origin given in SQL");
}

# 3. kill -9 of the holder: another worker takes over.
my $holder = pgst($A)->{holder_pid};
ok(kill('KILL', $holder), "holder $holder killed with SIGKILL");
ok(wait_until(20, sub { my $q = pgst($A); $q && $q->{holder_pid} != $holder && $q->{state} eq "connected" }),
   "another worker holds the connection") or diag explain pgst($A);
ok(pgst($A)->{takeovers} >= 1, "the takeover is counted");
drain_all($A);
ok(wait_until(30, sub { listening($A, $SUB) }), "A listens again");
node_get($B, "/postn?c=$SUB&n=3");
ok(wait_until(30, sub { got_all($A, 3) }), "posts reach A after the takeover (also the respawned worker)");
is($_->[1], "1,2,3\n", "worker $_->[0] of A") for drain_all($A);

# A holder that hangs (SIGSTOP) past its lease is replaced; when it resumes
# it closes its session without delivering anything.
$holder = pgst($A)->{holder_pid};
ok(kill('STOP', $holder), "holder $holder stopped");
ok(wait_until(30, sub { my $q = pgst($A); $q && $q->{holder_pid} != $holder && $q->{state} eq "connected" }),
   "another worker took the connection over from the hung holder");
ok(wait_until(30, sub { listening($A, $SUB) }), "A listens again");
drain_all($A);
node_get($B, "/postn?c=$SUB&n=3");
ok(kill('CONT', $holder), "holder $holder resumed");
ok(wait_until(30, sub { node_log($A) =~ /worker process $holder (lost the lease|hands the connection over)/ }),
   "the resumed worker gives the connection up");
ok(wait_until(30, sub { got_all($A, 3) }), "posts reach A");
is($_->[1], "1,2,3\n", "worker $_->[0] of A: each post once") for drain_all($A);

# 4. PostgreSQL restarted: the bridge comes back.
my $rc = pgst($A)->{reconnects};
pg_stop($pg);
ok(wait_until(20, sub { !connected($A) }), "A sees the database go");
pg_start($pg);
ok(wait_until(30, sub { connected($A) && connected($B) && pgst($A)->{reconnects} > $rc }), "A reconnects after the restart");
ok(wait_until(30, sub { listening($A, $SUB) }), "and listens again");
drain_all($A);
node_get($B, "/postn?c=$SUB&n=2");
ok(wait_until(30, sub { got_all($A, 2) }), "posts flow again");
is($_->[1], "1,2\n", "worker $_->[0] of A") for drain_all($A);

# 5. HUP: the new generation takes the connection over.
my $gen = node_status($A)->{current_generation};
reload_node($A);
ok(wait_until(30, sub {
    my $st = node_status($A) or return 0;
    my %new = map { $_->{pid} => 1 } grep { $_->{generation} == $gen + 1 && $_->{state} eq "running" } @{ $st->{workers} };
    $st->{current_generation} == $gen + 1 && $new{ $st->{postgres}{holder_pid} } && $st->{postgres}{state} eq "connected";
}), "after HUP a worker of the new generation holds the connection");
ok(wait_until(30, sub { listening($A, $SUB) }), "it listens");
ok(wait_until(30, sub { scalar(workers_of($A)) == 2 && !grep { $_->{state} eq "running" && $_->{generation} == $gen } @{ node_status($A)->{workers} } }),
   "the old generation exited (its timers did not hold it up)");
drain_all($A);
node_get($B, "/postn?c=$SUB&n=2");
ok(wait_until(30, sub { got_all($A, 2) }), "posts reach the new generation");
is($_->[1], "1,2\n", "worker $_->[0] of A") for drain_all($A);

done_testing();
