# vim:set ft=perl ts=4 sw=4 et:
# workerbus_postgres: bad values stop `nginx -t` with the directive and the
# value named, and never the password.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use PgNodes;

my @bad = (
    [ 'workerbus_postgres "postgresql://u:hunter2@127.0.0.1:99999/db";',
      'invalid port "99999" in "postgresql://u:***@127.0.0.1:99999/db"' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db?sslmode=maybe";',
      'invalid sslmode "maybe": use disable, prefer, require or verify-full in "postgresql://127.0.0.1/db?sslmode=maybe"' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" backoff_min=fast;', 'invalid backoff_min "fast"' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" backoff_min=10s backoff_max=1s;',
      'backoff_min (10000ms) is above backoff_max (1000ms)' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" durable=yes;', 'invalid durable "yes": use on or off' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" retention=0s;', 'retention "0s" is below the minimum of 1000ms' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" connect_timeout=x;', 'invalid connect_timeout "x"' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" prefix=a;b;', undef ],  # nginx splits at ';': its own error
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" "prefix=a b";',
      'invalid prefix "a b": at most 32 letters, digits, \'_\', \'.\' or \'-\'' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" password_file=/nonexistent/pw;',
      'cannot read password_file "/nonexistent/pw": No such file or directory' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" colour=blue;', 'unknown option "colour"' ],
    [ 'workerbus_postgres "host=127.0.0.1 password=hunter2 bogus=1";',
      'unknown connection parameter "bogus" in "host=127.0.0.1 password=*** bogus=1"' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db?sslmode=verify-full";',
      'sslmode "verify-full" needs sslrootcert=<CA file>' ],
    [ 'workerbus_postgres mysql://x;', 'the URL must start with postgresql:// in "mysql://x"' ],
    [ 'workerbus_postgres "postgresql://no-such-host.invalid/db";',
      qr/cannot resolve host "no-such-host\.invalid": / ],
    [ "workerbus_postgres \"postgresql://127.0.0.1/db\";\nworkerbus_postgres \"postgresql://127.0.0.1/db\";", 'is duplicate' ],
);

for my $case (@bad) {
    my ($main, $want) = @$case;
    my ($rc, $out, $file) = nginx_t(main => $main);
    isnt($rc, 0, "nginx -t fails: $main");
    next unless defined $want;
    if (ref $want) {
        like($out, qr/\[emerg\] \d+#\d+: "workerbus_postgres" directive: $want/, "message for: $main");
    } else {
        like($out, qr/\[emerg\] \d+#\d+: "workerbus_postgres" directive: \Q$want\E in \Q$file\E:\d+/, "exact message for: $main");
    }
    unlike($out, qr/hunter2/, "no password in the output: $main");
}

# A good one passes, with a password file.
my $pw = "$FindBin::Bin/servroot_pg_pw";
open(my $fh, ">", $pw) or die;
print $fh "s3cret\n";
close $fh;
my ($rc, $out) = nginx_t(main => "workerbus_postgres \"postgresql://alice\@127.0.0.1:5432/test?sslmode=prefer\" "
                              . "password_file=$pw backoff_min=50ms backoff_max=5s durable=on retention=10m prefix=app_ "
                              . "connect_timeout=3s unlisten_after=30s;");
is($rc, 0, "a valid directive passes nginx -t") or diag $out;
($rc, $out) = nginx_t(main => 'workerbus_postgres "host=127.0.0.1 port=5432 dbname=test user=postgres sslmode=disable";');
is($rc, 0, "a libpq keyword string passes nginx -t") or diag $out;
unlink $pw;

done_testing();
