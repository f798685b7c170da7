# vim:set ft=perl ts=4 sw=4 et:
# Authentication (SCRAM-SHA-256, MD5, cleartext, trust), a wrong password
# (one log line per attempt, with backoff, never the password) and TLS
# (sslmode require / verify-full with a CA file / disable against a TLS
# server), against a private PostgreSQL server whose pg_hba asks for them.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use PgNodes;

my $pg = private_pg();
my $hp = "$pg->{host}:$pg->{port}";
my $SUB = "t403_sub";
my %common = (http => bus_http($SUB), server => bus_server());
my $pwfile = "$FindBin::Bin/servroot_pg_pwfile";

sub connected { my $p = pgst($_[0]); $p && $p->{state} eq "connected" }

# Connects, then a post comes back to the node's own subscribers.
sub round_trip {
    my ($name, $main) = @_;
    my $n = start_node(name => "a", offset => 0, main => $main, %common);
    ok(wait_until(30, sub { connected($n) }), "$name: connected") or diag explain pgst($n);
    ok(wait_until(30, sub { listening($n, $SUB) }), "$name: listening");
    node_get($n, "/postn?c=$SUB&n=1");
    ok(wait_until(30, sub { my @p = map { $_->{pid} } grep { $_->{state} eq "running" } @{ node_status($n)->{workers} };
                            @p == 2 && !grep { node_get($n, "/got") !~ /"$_":1[,}]/ } @p }), "$name: a post comes back");
    my $log = node_log($n);
    stop_node($n);
    return $log;
}

open(my $fh, ">", $pwfile) or die;
print $fh "alice-secret\n";
close $fh;
my $log = round_trip("scram-sha-256 with password_file",
    "workerbus_postgres \"postgresql://alice\@$hp/test?sslmode=disable\" password_file=$pwfile;");
unlike($log, qr/alice-secret/, "the password is not logged");
round_trip("md5", "workerbus_postgres \"postgresql://bob:bob-secret\@$hp/test?sslmode=disable\";");
round_trip("cleartext", "workerbus_postgres \"host=$pg->{host} port=$pg->{port} user=carol password=carol-secret dbname=test sslmode=disable\";");
round_trip("trust", "workerbus_postgres \"postgresql://postgres\@$hp/test?sslmode=disable\";");

# Wrong password: one clear line per attempt, with backoff, no flood.
my $n = start_node(name => "a", offset => 0, main =>
    "workerbus_postgres \"postgresql://alice:WRONG-pw-123\@$hp/test?sslmode=disable\" backoff_min=200ms backoff_max=800ms;",
    %common);
ok(wait_until(20, sub { my $p = pgst($n); $p && $p->{last_error} =~ /password authentication failed for user "alice"/ }),
   "the status gives the reason") or diag explain pgst($n);
my $t0 = time;
ok(wait_until(20, sub { (() = node_log($n) =~ /password authentication failed/g) >= 4 }), "it keeps trying");
my $elapsed = time - $t0;
my $wrong_log = node_log($n);  # read once: the node keeps logging attempts
my @lines = grep { /password authentication failed/ } split /\n/, $wrong_log;
like($lines[0], qr/\[error\] \d+#\d+: workerbus: postgres postgresql:\/\/alice\@\Q$hp\E\/test sslmode=disable: FATAL: password authentication failed for user "alice" \(SQLSTATE 28P01\); retrying in \d+ms \(attempt 1\)/,
     "one clear line per attempt");
my $attempts = () = $wrong_log =~ /\(attempt \d+\)/g;
is($attempts, scalar @lines, "every attempt logs exactly one line");
my $p = pgst($n);
ok($p->{connect_failures} >= 4 && $p->{connect_failures} < 60, "backoff keeps the attempts few ($p->{connect_failures})");
unlike(node_log($n) . node_get($n, "/status"), qr/WRONG-pw-123/, "the password is neither in the log nor in the status");
is($p->{state}, "disconnected", "state: disconnected");
stop_node($n);

# TLS.
$log = round_trip("sslmode=require", "workerbus_postgres \"postgresql://postgres\@$hp/test?sslmode=require\";");
like($log, qr/connected \(server [^)]*\), tls on\)|connected \(server .*tls on/, "sslmode=require: TLS is on");
$log = round_trip("sslmode=verify-full",
    "workerbus_postgres \"postgresql://alice\@localhost:$pg->{port}/test?sslmode=verify-full&sslrootcert=$pg->{ca}\" password_file=$pwfile;");
like($log, qr/tls on/, "verify-full: TLS is on");
$log = round_trip("sslmode=prefer", "workerbus_postgres \"postgresql://postgres\@$hp/test\";");
like($log, qr/tls on/, "prefer (the default) uses TLS when the server offers it");
$log = round_trip("sslmode=disable", "workerbus_postgres \"postgresql://postgres\@$hp/test?sslmode=disable\";");
like($log, qr/tls off/, "disable: no TLS");

# verify-full against a CA that did not sign the server's certificate.
$n = start_node(name => "a", offset => 0, main =>
    "workerbus_postgres \"postgresql://postgres\@localhost:$pg->{port}/test?sslmode=verify-full&sslrootcert=/etc/ssl/certs/ca-certificates.crt\" backoff_min=500ms;",
    %common);
ok(wait_until(20, sub { my $q = pgst($n); $q && $q->{last_error} ne "" }), "verify-full with a wrong CA fails") ;
like(pgst($n)->{last_error}, qr/TLS handshake failed|not trusted/, "with a TLS reason: " . pgst($n)->{last_error});
isnt(pgst($n)->{state}, "connected", "and does not connect");
stop_node($n);
unlink $pwfile;

done_testing();
