# vim:set ft=perl ts=4 sw=4 et:
# workerbus_postgres: bad values stop `nginx -t` with the directive and the
# parameter named, and never the password (nor any piece of it).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use PgNodes;

# The four forms that used to echo (part of) the password, then every
# other message. The passwords all start with "hun" and end with "xyzzy"
# when they have a tail that a missing quote or escape cuts off.
my $slash_at = '"@" after the host part of the URL: percent-encode "/" and "?" in the user name and password '
             . '(%2F, %3F) and "@" anywhere else (%40)';
my $quote_hint = "(not shown: a value with spaces must be quoted, as in password='a b')";
my $sslmodes = 'use disable, allow, prefer, require, verify-ca or verify-full';
my @bad = (
    # 1. a password parameter in the URL's query, then a bad sslmode
    [ 'workerbus_postgres "postgresql://u@127.0.0.1/db?password=hunter2&sslmode=maybe";',
      qq{invalid value of "sslmode" in the URL: $sslmodes} ],
    # 2. a blank after "password=" (accepted, as libpq), then a bad sslmode
    [ 'workerbus_postgres "host=127.0.0.1 password= hunter2 sslmode=maybe";',
      qq{invalid value of "sslmode" in the connection string: $sslmodes} ],
    [ 'workerbus_postgres "host=127.0.0.1 password= hunter2 bogus=1";',
      qq{unknown connection parameter after the value of "password" in the connection string $quote_hint} ],
    # 3. a value with a blank, unquoted or unterminated
    [ q{workerbus_postgres "host=127.0.0.1 password=hunter xyzzy'";},
      qq{a word without "=" follows the value of "password" in the connection string $quote_hint} ],
    [ q{workerbus_postgres "host=127.0.0.1 password='hunter xyzzy";},
      'unterminated quoted value of "password" in the connection string' ],
    # 4. an unescaped '/' (or '?') in the URL's password
    [ 'workerbus_postgres "postgresql://u:hun/xyzzy@127.0.0.1/db";', $slash_at ],
    [ 'workerbus_postgres "postgresql://u:hun?xyzzy@127.0.0.1/db";', $slash_at ],
    # the password taken for a port (no host): the port is not shown
    [ 'workerbus_postgres "postgresql://u:hunter2/db";',
      'invalid value of "port" in the URL: use a number from 1 to 65535' ],

    [ 'workerbus_postgres "postgresql://u:hunter2@127.0.0.1:99999/db";',
      'invalid value of "port" in the URL: use a number from 1 to 65535' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db?sslmode=verify-ca";',
      'sslmode "verify-ca" needs sslrootcert=<CA file>' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" sslmode=verify-ca;',
      'sslmode "verify-ca" needs sslrootcert=<CA file>' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db?sslmode=Require";',
      qq{invalid value of "sslmode" in the URL: $sslmodes} ],
    [ 'workerbus_postgres "postgresql://u:hunter2@127.0.0.1/db?bogus=1";',
      'unknown connection parameter "bogus" in the URL' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db?password=hunter&xyzzy";',
      'a URL parameter without "=" follows the value of "password" (not shown: percent-encode "&" in a password as %26)' ],
    [ 'workerbus_postgres "postgresql://u:hunter2%zz@127.0.0.1/db";',
      'the password in the URL: bad percent-escape (use % and two hex digits)' ],
    [ 'workerbus_postgres "postgresql://u:hunter2@[::1/db";', 'unclosed "[" in the host part of the URL' ],
    [ 'workerbus_postgres "postgresql://u:hunter2@h1,h2/db";', 'several hosts are not supported (in the URL)' ],
    [ 'workerbus_postgres "postgresql://u:hunter2@%2Ftmp/db";',
      'invalid value of "host" in the URL: Unix sockets are not supported; use a TCP address' ],
    [ 'workerbus_postgres "host=127.0.0.1 bogus=1 password=hunter2";',
      'unknown connection parameter "bogus" in the connection string' ],
    [ 'workerbus_postgres "host=127.0.0.1 dbname password=hunter2";',
      'missing "=" after "dbname" in the connection string' ],
    [ 'workerbus_postgres "host=127.0.0.1 password=hunter2 connect_timeout=soon";',
      'invalid value of "connect_timeout" in the connection string: use a time above zero, such as 5s or 500ms' ],
    [ 'workerbus_postgres hunter2;',
      'invalid connection string (not shown): use postgresql://user@host:port/db or "host=... dbname=..."' ],
    [ 'workerbus_postgres mysql://u:hunter2@x;', 'unsupported URL scheme "mysql": use postgresql:// or postgres://' ],
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
    [ 'workerbus_postgres "postgresql://127.0.0.1/db?password=hunter" xyzzy=1;',
      'unknown option in argument 2 (not shown: it follows the password and may be part of it)' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" hunter2;',
      'argument 2 is not key=value (not shown: it may hold a secret)' ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db" sslmode=maybe;', qq{invalid sslmode "maybe": $sslmodes} ],
    [ 'workerbus_postgres "postgresql://127.0.0.1/db?sslmode=verify-full";',
      'sslmode "verify-full" needs sslrootcert=<CA file>' ],
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
        like($out, qr/\[emerg\] (?:\d+#\d+: )?"workerbus_postgres" directive: $want/, "message for: $main");
    } else {
        like($out, qr/\[emerg\] (?:\d+#\d+: )?"workerbus_postgres" directive: \Q$want\E in \Q$file\E:\d+/, "exact message for: $main");
    }
    unlike($out, qr/hun|xyzzy/, "no password in the output: $main");
}

# secret_file=: the secret is never shown, its errors name the file.
my %secret = (empty => "\n", short => "hunter2-0123456\n", good => "hunter2-0123456789\r\n");
my %secret_path = map { $_ => "$FindBin::Bin/servroot_pg_secret_$_" } keys %secret;
for my $k (keys %secret) {
    open(my $sf, ">", $secret_path{$k}) or die "$secret_path{$k}: $!";
    print $sf $secret{$k};
    close $sf;
}
for my $case (
    [ 'secret_file=/nonexistent/secret', 'cannot read secret_file "/nonexistent/secret": No such file or directory' ],
    [ "secret_file=$secret_path{empty}", qq{secret_file "$secret_path{empty}" is empty} ],
    [ "secret_file=$secret_path{short}", qq{secret_file "$secret_path{short}": the secret must be at least 16 bytes} ],
) {
    my ($opt, $want) = @$case;
    my $main = qq{workerbus_postgres "postgresql://127.0.0.1/db" $opt;};
    my ($rc, $out, $file) = nginx_t(main => $main);
    isnt($rc, 0, "nginx -t fails: $main");
    like($out, qr/\[emerg\] (?:\d+#\d+: )?"workerbus_postgres" directive: \Q$want\E in \Q$file\E:\d+/, "exact message for: $main");
    unlike($out, qr/hun|0123456/, "no secret in the output: $main");
}
{
    my $main = qq{workerbus_postgres "postgresql://127.0.0.1/db" secret_file=$secret_path{good};};
    my ($rc, $out) = nginx_t(main => $main);
    is($rc, 0, "a 16-byte secret passes nginx -t") or diag $out;
    unlike($out, qr/hun|0123456/, "no secret in the output: $main");
}
unlink values %secret_path;

# sslrootcert=: read and checked when the configuration is read (by the
# master, and so by nginx -t), in every mode that may use TLS.
my $bad_ca = "$FindBin::Bin/servroot_pg_bad_ca.pem";
open(my $bf, ">", $bad_ca) or die "$bad_ca: $!";
print $bf "not a certificate\n";
close $bf;
my $pem_hint = '(a PEM file of CA certificates is expected)';
for my $case (
    [ '?sslmode=require&sslrootcert=/nonexistent/ca.pem', '',
      'cannot read sslrootcert "/nonexistent/ca.pem": No such file or directory' ],
    [ '?sslmode=verify-full', ' sslrootcert=/nonexistent/ca.pem',
      'cannot read sslrootcert "/nonexistent/ca.pem": No such file or directory' ],
    [ '?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem', '',
      'cannot read sslrootcert "/nonexistent/ca.pem": No such file or directory' ],
    [ '?sslrootcert=/nonexistent/ca.pem', '',
      'cannot read sslrootcert "/nonexistent/ca.pem": No such file or directory' ],
    [ "?sslmode=verify-ca&sslrootcert=$bad_ca", '',
      qq{cannot load sslrootcert "$bad_ca": no certificate or crl found $pem_hint} ],
    [ '?sslmode=require', " sslrootcert=$bad_ca",
      qq{cannot load sslrootcert "$bad_ca": no certificate or crl found $pem_hint} ],
    [ '?sslmode=allow', " sslrootcert=$bad_ca",
      qq{cannot load sslrootcert "$bad_ca": no certificate or crl found $pem_hint} ],
) {
    my ($query, $opt, $want) = @$case;
    my $main = qq{workerbus_postgres "postgresql://127.0.0.1/db$query"$opt;};
    my ($rc, $out, $file) = nginx_t(main => $main);
    isnt($rc, 0, "nginx -t fails: $main");
    like($out, qr/\[emerg\] (?:\d+#\d+: )?"workerbus_postgres" directive: \Q$want\E in \Q$file\E:\d+/, "exact message for: $main")
        or diag $out;
}
unlink $bad_ca;
for my $main ('workerbus_postgres "postgresql://127.0.0.1/db?sslmode=disable&sslrootcert=/nonexistent/ca.pem";',
              'workerbus_postgres "postgresql://127.0.0.1/db?sslmode=allow";',
              'workerbus_postgres "postgresql://127.0.0.1/db?sslmode=require&sslrootcert=/etc/ssl/certs/ca-certificates.crt";',
              'workerbus_postgres "postgresql://127.0.0.1/db" sslmode=verify-ca sslrootcert=/etc/ssl/certs/ca-certificates.crt;') {
    next if $main =~ m{/etc/ssl/certs/ca-certificates\.crt} && !-r "/etc/ssl/certs/ca-certificates.crt";
    my ($rc, $out) = nginx_t(main => $main);
    is($rc, 0, "passes nginx -t: $main") or diag $out;
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
# libpq's quoting: blanks around '=', a quoted value with a blank.
for my $main ('workerbus_postgres "host=127.0.0.1 password= hunter2 sslmode=disable";',
              q{workerbus_postgres "host = 127.0.0.1 password = 'hunter xyzzy' sslmode=disable";},
              # nginx turns \\' into \' (Perl: \\\\'), which the parser reads as a quote in the value
              q{workerbus_postgres "host=127.0.0.1 password='hunter\\\\'s xyzzy' sslmode=disable";}) {
    ($rc, $out) = nginx_t(main => $main);
    is($rc, 0, "passes nginx -t: $main") or diag $out;
    unlike($out, qr/hun|xyzzy/, "no password in the output: $main");
}
unlink $pw;

done_testing();
