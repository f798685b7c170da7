# vim:set ft=perl ts=4 sw=4 et:
# Authentication (SCRAM-SHA-256, MD5, cleartext, trust), a wrong password
# (one log line per attempt, with backoff, never the password) and TLS as
# libpq's sslmode table (require without and with sslrootcert, verify-ca,
# verify-full, prefer, allow, disable against a TLS server; a CA that did not
# sign the certificate, a host name it does not name), against a private
# PostgreSQL server whose pg_hba asks for them.
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

# A CA that did not sign the server's certificate (made here, as PgNodes
# makes the server's).
my $other = "$FindBin::Bin/servroot_pg_other_ca";
mkdir $other;
system("cd $other && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 "
     . "-subj /CN=wb-other-ca 2>/dev/null") == 0 or die "openssl failed";
my $other_ca = "$other/ca.crt";

# A connect the server's certificate must fail: the status and one log line
# per attempt give the reason; the node never connects.
sub refused {
    my ($name, $url, $why) = @_;
    my $n = start_node(name => "a", offset => 0, main => "workerbus_postgres \"$url\" backoff_min=200ms backoff_max=400ms;",
                       %common);
    ok(wait_until(20, sub { my $q = pgst($n); $q && $q->{last_error} ne "" }), "$name: fails") or diag explain pgst($n);
    is(pgst($n)->{last_error}, $why, "$name: the reason");
    ok(wait_until(20, sub { node_log($n) =~ /\[error\] \d+#\d+: workerbus: postgres [^\n]*: \Q$why\E; retrying in \d+ms \(attempt \d+\)/ }),
       "$name: the log line names it");
    isnt(pgst($n)->{state}, "connected", "$name: does not connect");
    unlike(node_log($n), qr/: connected \(server/, "$name: never connected");
    stop_node($n);
}

my $untrusted = "server certificate not trusted: unable to verify the first certificate";
# (a) require with sslrootcert checks the chain, as libpq (and verify-ca).
refused("require with a CA that did not sign the certificate",
        "postgresql://postgres\@$hp/test?sslmode=require&sslrootcert=$other_ca", $untrusted);
refused("verify-full with a CA that did not sign the certificate",
        "postgresql://postgres\@localhost:$pg->{port}/test?sslmode=verify-full&sslrootcert=$other_ca", $untrusted);
refused("verify-ca with a CA that did not sign the certificate",
        "postgresql://postgres\@$hp/test?sslmode=verify-ca&sslrootcert=$other_ca", $untrusted);
$log = round_trip("require with the right CA",
    "workerbus_postgres \"postgresql://postgres\@$hp/test?sslmode=require&sslrootcert=$pg->{ca}\";");
like($log, qr/tls on/, "require with the right CA: TLS is on");
# (b) verify-ca: the chain, not the name (the certificate is for "localhost").
$log = round_trip("verify-ca with the right CA, another host name",
    "workerbus_postgres \"postgresql://postgres\@$hp/test?sslmode=verify-ca&sslrootcert=$pg->{ca}\";");
like($log, qr/tls on/, "verify-ca: TLS is on");
# (c) verify-full: the chain and the name.
refused("verify-full with the right CA, another host name",
        "postgresql://postgres\@$hp/test?sslmode=verify-full&sslrootcert=$pg->{ca}",
        "server certificate does not match host \"$pg->{host}\"");
# (d) verify-full with the right CA and the certificate's name: above
# ("sslmode=verify-full"), and with the CA file given as an option.
$log = round_trip("verify-full, sslrootcert as an option",
    "workerbus_postgres \"postgresql://postgres\@localhost:$pg->{port}/test\" sslmode=verify-full sslrootcert=$pg->{ca};");
like($log, qr/tls on/, "verify-full (options): TLS is on");
system("rm", "-rf", $other);

# (f) allow against a server that takes TLS sessions only (pg_hba:
# hostssl for user "dave", hostnossl rejected).
{
    open(my $in, "<", "$pg->{data}/pg_hba.conf") or die;
    my $hba = do { local $/; <$in> };
    close $in;
    open(my $out, ">", "$pg->{data}/pg_hba.conf") or die;
    print $out "hostssl all dave 127.0.0.1/32 trust\nhostnossl all dave 127.0.0.1/32 reject\n" . $hba;
    close $out;
    psql("host=127.0.0.1 port=$pg->{port} user=postgres dbname=postgres", "create user dave; select pg_reload_conf()")
        // die "create user dave";
    ok(wait_until(20, sub {
        !psql_ok("host=127.0.0.1 port=$pg->{port} user=dave dbname=test sslmode=disable", "select 1")
          && psql_ok("host=127.0.0.1 port=$pg->{port} user=dave dbname=test sslmode=require", "select 1") }),
       "the server takes dave over TLS only");
    $n = start_node(name => "a", offset => 0, main =>
        "workerbus_postgres \"postgresql://dave\@$hp/test?sslmode=allow\" backoff_min=200ms;", %common);
    ok(wait_until(30, sub { connected($n) }), "allow: connects to a TLS-only server") or diag explain pgst($n);
    is(pgst($n)->{server}, "postgresql://dave\@$hp/test sslmode=allow", "allow is its own mode (not prefer)");
    like(node_log($n), qr/: connected \(server [^\n]*tls on\)/, "allow: TLS is on");
    stop_node($n);
}
unlink $pwfile;

done_testing();
