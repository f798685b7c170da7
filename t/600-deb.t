# vim:set ft= ts=4 sw=4 et:
# The Debian package (make deb, pkg/build-deb): built from build/ and lib/,
# laid out like Debian's libnginx-mod-*, installed with apt-get, enabled in
# /etc/nginx/modules-enabled, loaded by an nginx of its own (private -p
# prefix and -c config on 127.0.0.1, the system's nginx untouched) that
# answers workerbus_status with the module's JSON and finds the Lua modules
# where the package put them; removed (disabled) and installed again (enabled
# again); then purged, leaving none of its files.
#
# Needs root, dpkg-dev and a stopped system nginx (the package's trigger
# would reload a running one); skipped otherwise. Files of a `make install`
# that the package overwrites are saved first and put back after the purge;
# a libnginx-mod-workerbus installed before is left alone (skipped). One
# run at a time per machine (a lock), since the package is machine-wide.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use Fcntl qw(:flock);
use File::Basename qw(dirname);
use File::Copy qw(copy);
use File::Path qw(make_path);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use JSON::PP qw(decode_json);
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);
use Workerbus::Nginx;

my $ROOT = Workerbus::Nginx::repo_root();
my $PKG = "libnginx-mod-workerbus";
my $LINK = "/etc/nginx/modules-enabled/50-mod-workerbus.conf";
my $AVAILABLE = "/usr/share/nginx/modules-available/mod-workerbus.conf";
my $SO = "/usr/lib/nginx/modules/ngx_workerbus_module.so";

sub have { system("command -v $_[0] >/dev/null 2>&1") == 0 }
sub pkg_status { my $s = `dpkg-query -W -f='\${Status}' $PKG 2>/dev/null`; $s }
sub nginx_running {
    open my $fh, "<", "/run/nginx.pid" or return 0;
    my ($pid) = (<$fh> // "") =~ /(\d+)/ or return 0;
    return kill 0, $pid;
}

plan skip_all => "not root: installing a package needs root" unless $> == 0;
plan skip_all => "dpkg-shlibdeps missing (Debian package dpkg-dev; make deps installs it)" unless have("dpkg-shlibdeps");
plan skip_all => "apt-get or dpkg-deb missing" unless have("apt-get") && have("dpkg-deb");
plan skip_all => "no module in build/: run make build" unless -f "$ROOT/build/ngx_workerbus_module.so";
plan skip_all => "the system nginx runs: installing the package would reload it" if nginx_running();

# One package test per machine at a time (other checkouts run this suite too).
open my $lock, ">", "/run/lock/workerbus-deb-test.lock" or die "lock: $!";
my $t0 = time;
until (flock($lock, LOCK_EX | LOCK_NB)) {
    BAIL_OUT("another package test held the lock for 300 s") if time - $t0 > 300;
    sleep 0.2;
}
plan skip_all => "$PKG is installed already (not by this test): left alone"
    if pkg_status() =~ /\binstalled$/ || pkg_status() =~ /config-files/;

my $tmp = tempdir("wb-deb-XXXXXX", TMPDIR => 1, CLEANUP => 1);
chmod 0755, $tmp;    # apt fetches a local .deb as its unprivileged _apt user

# --- build ---------------------------------------------------------------
my ($cargo_version) = do { local (@ARGV, $/) = "$ROOT/Cargo.toml"; <> } =~ /^version\s*=\s*"([^"]+)"/m;
(my $version = $cargo_version) =~ s/-/~/g;
chomp(my $arch = `dpkg --print-architecture`);
my $out = `$ROOT/pkg/build-deb $ROOT/build/ngx_workerbus_module.so $ROOT/lib $tmp 2>&1`;
is($?, 0, "pkg/build-deb builds the package") or diag $out;
chomp(my $deb = (split /\n/, $out)[-1] // "");
is($deb, "$tmp/${PKG}_${version}_$arch.deb", "named ${PKG}_${version}_$arch.deb (the version of Cargo.toml)");
BAIL_OUT("no package built") unless -f $deb;

my %field = map { /^(\S+):\s*(.*)$/ ? ($1 => $2) : () } split /\n/, `dpkg-deb -f $deb`;
is($field{Package}, $PKG, "control: Package");
is($field{Version}, $version, "control: Version");
is($field{Architecture}, $arch, "control: Architecture");
my ($abi) = `dpkg-query -W -f='\${Provides}' nginx` =~ /(nginx-abi-[^\s,]+)/;
my %dep = map { /^\s*(\S+)/ ? ($1 => 1) : () } split /,/, ($field{Depends} // "");
ok($abi && $dep{$abi}, "control: Depends on the nginx ABI the installed nginx provides (" . ($abi // "none") . ")")
    or diag $field{Depends};
ok($dep{$_}, "control: Depends on $_") for qw(libnginx-mod-http-ndk libnginx-mod-http-lua lua-resty-core libc6);
is($field{Section}, "httpd", "control: Section httpd, as Debian's nginx modules");

my @files = map { m{^\S+\s+\S+\s+\d+\s+\S+\s+\S+\s+\.(/\S+)$} && !m{/$} ? $1 : () } split /\n/, `dpkg-deb -c $deb`;
my @lua = sort map { s{^\./}{}r } split /\n/, `cd $ROOT/lib && find resty -name '*.lua'`;
is_deeply([sort grep { m{^/usr/share/lua/} } @files], [map { "/usr/share/lua/5.1/$_" } @lua],
          "the Lua modules in /usr/share/lua/5.1/resty/, every one of lib/");
is_deeply([sort grep { !m{^/usr/share/lua/} } @files],
          [sort $SO, $AVAILABLE, "/usr/share/doc/$PKG/changelog.Debian.gz", "/usr/share/doc/$PKG/copyright"],
          "the module, its modules-available snippet and the docs, nothing else");

# --- install ---------------------------------------------------------------
# Files of a `make install` the package would overwrite (owned by no package):
# saved now, put back after the purge.
my %saved;
my $ours = "/usr/lib/nginx/modules/*workerbus* /usr/share/lua/5.1/resty/workerbus*";
my %before = map { $_ => 1 } glob($ours);
for my $f (@files) {
    next unless -e $f && system("dpkg -S $f >/dev/null 2>&1") != 0;
    my $copy = "$tmp/saved" . $f;
    make_path(dirname($copy));
    copy($f, $copy) or die "save $f: $!";
    $saved{$f} = $copy;
}
note "saved, to restore after the purge: " . join(" ", sort keys %saved) if %saved;

my ($nginx_pid, $installed);
sub stop_nginx {
    my $pid = $nginx_pid or return;
    undef $nginx_pid;
    kill "QUIT", $pid;
    my $gone = Workerbus::Nginx::wait_for(10, sub { waitpid($pid, WNOHANG) == $pid });
    kill "KILL", -$pid;
    waitpid($pid, 0) unless $gone;
}
sub purge { system("dpkg --purge $PKG >/dev/null 2>&1") if $installed; undef $installed }
sub restore {
    for my $f (sort keys %saved) {
        make_path(dirname($f));
        copy($saved{$f}, $f) or warn "restore $f: $!";
    }
    %saved = ();
}
END { stop_nginx(); purge(); restore() }
$SIG{$_} = sub { stop_nginx(); purge(); restore(); exit 1 } for qw(INT TERM HUP);

$installed = 1;
$out = `DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 $deb 2>&1`;
is($?, 0, "apt-get install ./" . (split m{/}, $deb)[-1]) or diag $out;
like(pkg_status(), qr/^install ok installed$/, "dpkg: installed");
is(readlink($LINK), $AVAILABLE, "enabled: $LINK -> $AVAILABLE");
is(do { local (@ARGV, $/) = $AVAILABLE; <> }, "load_module modules/ngx_workerbus_module.so;\n",
   "the snippet loads modules/ngx_workerbus_module.so");
my @enabled = sort glob("/etc/nginx/modules-enabled/*.conf");
note "enabled: @enabled";
my ($lua_at) = grep { $enabled[$_] =~ /mod-http-lua/ } 0 .. $#enabled;
my ($wb_at) = grep { $enabled[$_] eq $LINK } 0 .. $#enabled;
ok(defined $wb_at && defined $lua_at && $wb_at > $lua_at, "... loaded after the Lua module (and the NDK)");
ok(!system("cmp -s $ROOT/lib/resty/workerbus.lua /usr/share/lua/5.1/resty/workerbus.lua"),
   "resty/workerbus.lua installed as in lib/");

# --- run: an nginx of its own, the system's configuration untouched --------------
my $prefix = "$tmp/prefix";
make_path("$prefix/conf", "$prefix/logs", "$prefix/tmp");
# As Debian's /usr/share/nginx/modules: load_module modules/... is relative to the prefix.
symlink("/usr/lib/nginx/modules", "$prefix/modules") or die "symlink: $!";
my $port = Workerbus::Nginx::port();
open my $cf, ">", "$prefix/conf/nginx.conf" or die $!;
print $cf <<"EOF";
include /etc/nginx/modules-enabled/*.conf;
user root;
worker_processes 2;
daemon off;
pid logs/nginx.pid;
error_log logs/error.log info;
events { worker_connections 64; }
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path tmp; proxy_temp_path tmp; fastcgi_temp_path tmp; uwsgi_temp_path tmp; scgi_temp_path tmp;
    server {
        listen 127.0.0.1:$port;
        location = /status { workerbus_status; }
        location = /lua {
            content_by_lua_block {
                local wb = require "resty.workerbus"
                require "resty.worker.events"
                require "resty.sync"
                ngx.say(package.searchpath("resty.workerbus", package.path), " ", wb.status().module)
            }
        }
    }
}
EOF
close $cf;
$out = `/usr/sbin/nginx -t -p $prefix/ -c conf/nginx.conf 2>&1`;
is($?, 0, "nginx -t with include /etc/nginx/modules-enabled/*.conf") or diag $out;

$nginx_pid = fork // die "fork: $!";
if ($nginx_pid == 0) {
    setpgrp(0, 0);
    open STDOUT, ">", "$prefix/logs/stderr";
    open STDERR, ">&", \*STDOUT;
    { exec "/usr/sbin/nginx", "-p", "$prefix/", "-c", "conf/nginx.conf" };
    POSIX::_exit(127);
}
my $http = sub {
    my ($path) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $port, Timeout => 5) or return;
    print $s "GET $path HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\n\r\n";
    local $/;
    my $r = <$s> // "";
    return $r =~ m{^HTTP/1\.\d 200 .*?\r\n\r\n(.*)\z}s ? $1 : undef;
};
my $st = Workerbus::Nginx::wait_for(15, sub {
    return "dead" if waitpid($nginx_pid, WNOHANG) == $nginx_pid;
    my $body = $http->("/status") // return;
    my $j = eval { decode_json($body) } or return;
    my $running = grep { $_->{state} eq "running" } @{ $j->{workers} || [] };
    ($j->{node}{master_pid} // 0) == $nginx_pid && $running == 2 ? $j : undef;
});
ok(ref $st, "nginx with the packaged module answers workerbus_status, both workers running")
    or diag `cat $prefix/logs/stderr $prefix/logs/error.log 2>/dev/null`;
is($st->{module}, "workerbus", "... with the module's JSON") if ref $st;
is($st->{version}, $cargo_version, "... of version $cargo_version") if ref $st;
is($http->("/lua"), "/usr/share/lua/5.1/resty/workerbus.lua workerbus\n",
   "the Lua modules load from /usr/share/lua/5.1 (default path) and reach the module");
stop_nginx();

# --- remove, then install again: the link is set aside, then back --------------
$out = `DEBIAN_FRONTEND=noninteractive apt-get remove -y -q -o DPkg::Lock::Timeout=120 $PKG 2>&1`;
is($?, 0, "apt-get remove $PKG") or diag $out;
ok(!-e $LINK && !-l $LINK, "... disables it: no $LINK");
ok(-l "$LINK.removed" && !-e $SO, "... the link set aside (not a *.conf any more), the module gone");
$out = `dpkg -i $deb 2>&1`;
is($?, 0, "dpkg -i again") or diag $out;
is(readlink($LINK), $AVAILABLE, "... enabled again");
ok(!-l "$LINK.removed", "... and nothing set aside");

# --- purge: nothing of it left ---------------------------------------------
$out = `DEBIAN_FRONTEND=noninteractive apt-get purge -y -q -o DPkg::Lock::Timeout=120 $PKG 2>&1`;
is($?, 0, "apt-get purge $PKG") or diag $out;
undef $installed;
like(pkg_status(), qr/^(?:|\S+ ok not-installed)$/, "dpkg: not installed, no config files");
isnt(system("dpkg -L $PKG >/dev/null 2>&1"), 0, "dpkg -L $PKG: not installed");
is_deeply([grep { -e $_ || -l $_ } @files], [], "none of its files is left");
is_deeply([glob("/etc/nginx/modules-enabled/*workerbus*")], [], "no link of it in /etc/nginx/modules-enabled");
ok(!-e "/usr/share/doc/$PKG", "no /usr/share/doc/$PKG");
is_deeply([grep { !$before{$_} } glob($ours)], [],
          "no workerbus file in /usr/lib/nginx/modules nor /usr/share/lua/5.1/resty (but what was there before)");
restore();

done_testing;
