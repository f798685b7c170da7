package Workerbus::Nginx;

# A small nginx harness for the suites that drive nginx from outside while
# it runs (Prometheus's promtool, a headless browser, a streaming client):
# the Test::Nginx block format sends its requests one after the other and
# cannot hold a stream open or hand the server to another program.
#
# Workerbus::Nginx->start(%opts) writes a configuration like the block
# runner's (same modules, same environment variables), starts nginx in the
# foreground as a child in its own process group, and waits until the status
# location shows every worker running. stop() (also run at destruction)
# sends QUIT, waits, then KILLs the group. Everything listens on 127.0.0.1.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path remove_tree);
use IO::Socket::INET;
use JSON::PP qw(decode_json);
use POSIX qw(:sys_wait_h);
use Scalar::Util ();
use Time::HiRes qw(time sleep);
use Workerbus::HasLua;

our $TIMEOUT = $ENV{TEST_NGINX_TIMEOUT} || 10;

sub repo_root { abs_path(dirname(__FILE__) . "/../../..") }

sub port { $ENV{TEST_NGINX_PORT} || 1984 }

sub binary { $ENV{TEST_NGINX_BINARY} || "/usr/sbin/nginx" }

# The load_module paths, ndk and lua first.
sub modules {
    return split ' ', ($ENV{TEST_NGINX_LOAD_MODULES}
        || "/usr/lib/nginx/modules/ndk_http_module.so /usr/lib/nginx/modules/ngx_http_lua_module.so "
           . repo_root() . "/build/ngx_workerbus_module.so");
}

# Polls $cond every 20 ms until it returns true or $secs pass; returns its last value.
sub wait_for {
    my ($secs, $cond) = @_;
    my $deadline = time + $secs;
    while (1) {
        my $v = $cond->();
        return $v if $v || time > $deadline;
        sleep 0.02;
    }
}

# A master left running in this servroot by an interrupted run: stop it (by
# its pid file), or the new nginx cannot listen and the old one would answer.
sub stop_leftover {
    my ($root) = @_;
    open my $fh, "<", "$root/logs/nginx.pid" or return;
    my ($pid) = <$fh> =~ /(\d+)/ or return;
    open my $c, "<", "/proc/$pid/cmdline" or return;    # gone already
    my $cmd = do { local $/; <$c> } // "";
    return unless index($cmd, $root) >= 0;               # the pid now belongs to someone else
    kill "QUIT", $pid;
    wait_for(10, sub { !kill 0, $pid }) or kill "KILL", $pid;
}

our @RUNNING;
END { $_->stop for grep { defined } @RUNNING }
$SIG{$_} = sub { $_->stop for grep { defined } @RUNNING; exit 1 } for qw(INT TERM HUP);

sub start {
    my ($class, %o) = @_;
    my $root = $o{servroot} || ($ENV{TEST_NGINX_SERVROOT} || repo_root() . "/t/servroot") . "-ext";
    my $self = bless { root => $root, port => port(), workers => $o{workers} || 4 }, $class;
    stop_leftover($root);
    remove_tree($root);
    make_path("$root/conf", "$root/logs", "$root/html", "$root/tmp");
    my $binary = binary();
    my @modules = modules();
    my $lua_path = $ENV{TEST_NGINX_LUA_PATH} || repo_root() . "/lib/?.lua;;";
    my $listen = "127.0.0.1:$self->{port}" . ($o{listen_opts} ? " $o{listen_opts}" : "");
    my $user = $> == 0 ? "user root;\n" : "";
    my $conf = join("", map { "load_module $_;\n" } @modules) . <<"EOF";
worker_processes $self->{workers};
daemon off;
pid logs/nginx.pid;
error_log logs/error.log info;
$user
@{[ $o{main_config} || "" ]}
events { worker_connections 1024; accept_mutex off; }
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path tmp; proxy_temp_path tmp; fastcgi_temp_path tmp;
    uwsgi_temp_path tmp; scgi_temp_path tmp;
@{[ Workerbus::HasLua::has_lua($binary, @modules) ? "    lua_package_path \"$lua_path\";" : "" ]}
@{[ $o{http_config} || "" ]}
    server {
        listen $listen;
        server_name localhost;
        location = /status { workerbus_status; }
@{[ $o{config} || "" ]}
    }
}
EOF
    open my $fh, ">", "$root/conf/nginx.conf" or die "$root/conf/nginx.conf: $!";
    print $fh $conf;
    close $fh;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        setpgrp(0, 0);
        open STDOUT, ">", "$root/logs/nginx.stderr";
        open STDERR, ">&", \*STDOUT;
        exec $binary, "-p", "$root/", "-c", "conf/nginx.conf";
        exit 127;
    }
    $self->{pid} = $pid;
    push @RUNNING, $self;
    Scalar::Util::weaken($RUNNING[-1]);
    my $ready = wait_for($TIMEOUT, sub {
        return "dead" if waitpid($pid, WNOHANG) == $pid;
        my $st = eval { $self->status };
        return 0 unless $st && ($st->{node}{master_pid} // 0) == $pid;   # ours, not a leftover
        my $n = grep { $_->{state} eq "running" } @{ $st->{workers} || [] };
        return $n >= $self->{workers};
    });
    if (!$ready || $ready eq "dead") {
        my $err = `cat $root/logs/nginx.stderr $root/logs/error.log 2>/dev/null`;
        $self->stop;
        die "nginx did not start with every worker running:\n$err";
    }
    return $self;
}

sub master_pid { $_[0]{pid} }

# One request on its own connection: (status, {lowercased headers}, body).
sub request {
    my ($self, $method, $path, %h) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $self->{port}, Timeout => $TIMEOUT)
        or die "connect: $!";
    my $req = "$method $path HTTP/1.0\r\nHost: localhost\r\n";
    $req .= "$_: $h{$_}\r\n" for sort keys %h;
    print $s "$req\r\n";
    local $/;
    my $resp = <$s> // "";
    close $s;
    my ($head, $body) = split /\r\n\r\n/, $resp, 2;
    my ($code) = ($head // "") =~ m{^HTTP/\d\.\d (\d+)};
    my %hdr = map { my ($k, $v) = split /:\s*/, $_, 2; (lc $k => $v) } split /\r\n/, ($head // "");
    return ($code // 0, \%hdr, $body // "");
}

sub get {
    my ($self, $path, %h) = @_;
    my ($code, $hdr, $body) = $self->request("GET", $path, %h);
    die "GET $path: HTTP $code\n$body" unless $code == 200;
    return wantarray ? ($body, $hdr) : $body;
}

sub status { decode_json($_[0]->get("/status", Accept => "application/json")) }

# Pids of the running workers, sorted.
sub worker_pids {
    my ($self) = @_;
    return sort { $a <=> $b } map { $_->{pid} } grep { $_->{state} eq "running" } @{ $self->status->{workers} };
}

sub error_log {
    my ($self) = @_;
    open my $fh, "<", "$self->{root}/logs/error.log" or return "";
    local $/;
    return <$fh>;
}

sub stop {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;
    kill "QUIT", $pid;
    my $gone = wait_for(10, sub { waitpid($pid, WNOHANG) == $pid });
    kill "KILL", -$pid;    # the group: workers orphaned by a killed master too
    waitpid($pid, 0) unless $gone;
}

sub DESTROY { $_[0]->stop }

1;
