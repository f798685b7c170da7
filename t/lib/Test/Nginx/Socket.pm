package Test::Nginx::Socket;

# A small, self-contained runner for the subset of the Test::Nginx::Socket
# (::Lua) block format that this project's suites use.  Written from scratch
# for this repository (Debian does not package Test::Nginx and CPAN is out of
# reach here); it only imitates the behaviour of the real module, see
# t/README.md for what is supported and where it differs.
#
# Note on style: Test::Base is used with Spiffy's "-Base" source filter, which
# rewrites every "sub name {" into a method (prepends "my $self = shift;").
# Every sub below therefore carries a prototype so the filter leaves it alone.

use Test::Base -Base;

use Cwd ();
use Errno ();
use Fcntl qw(SEEK_SET);
use File::Basename ();
use File::Path ();
use File::Spec ();
use IO::Select ();
use IO::Socket::INET ();
use POSIX ();
use Workerbus::HasLua ();
use Text::Diff ();
use Time::HiRes ();

our $VERSION = '0.01';

our @EXPORT = qw(
    run_tests plan blocks repeat_each
    workers master_on master_off master_process_enabled worker_connections
    log_level no_shuffle no_long_string no_root_location
    env_to_nginx config_preamble server_name
    html_dir server_root server_port timeout
    use_hup check_accum_error_log no_nginx_manager
    add_block_preprocessor bail_out
);

# ---------------------------------------------------------------------------
# settings (file scope, like the real module)

our $RepeatEach       = 1;
our $Workers          = 1;
our $MasterOn         = 0;
our $LogLevel         = 'debug';
our $NoRootLocation   = 0;
our $NoLongString     = 0;
our $ConfigPreamble   = '';
our $ServerName       = 'localhost';
our $WorkerConnections = 1024;
our @EnvToNginx;
our @BlockPreprocessors;
our $Timeout          = $ENV{TEST_NGINX_TIMEOUT} || 3;

our $StartTimeout     = 5;     # seconds for nginx to listen (and fork workers)
our $StopTimeout      = 10;    # seconds after QUIT before KILL
our $NginxBlock;                # name of the block whose nginx runs, for diagnostics
our $RetryWindow      = 0.2;   # an empty reply within this is retried once

# the test script's directory: t/servroot and <repo>/lib are found from it
our $TDir = File::Basename::dirname(File::Spec->rel2abs($0));

# ---------------------------------------------------------------------------
# runtime state

our $NginxPid;          # master (or single) process, our direct child
our $NginxStderr;       # file receiving nginx's stdout + stderr
our $RunnerPid = $$;
our %UnsupportedWarned;

# ---------------------------------------------------------------------------
# exported configuration functions

sub repeat_each (;$) {
    if (@_) {
        my $n = shift;
        $RepeatEach = (defined $n && $n =~ /^\d+$/ && $n > 0) ? $n : 1;
    }
    return $RepeatEach;
}

sub workers (;$) {
    $Workers = shift if @_;
    return $Workers;
}

sub master_on () { $MasterOn = 1 }
sub master_off () { $MasterOn = 0 }

sub master_process_enabled (;$) {
    $MasterOn = shift() ? 1 : 0 if @_;
    return $MasterOn;
}

sub worker_connections (;$) {
    $WorkerConnections = shift if @_;
    return $WorkerConnections;
}

sub log_level (;$) {
    $LogLevel = shift if @_;
    return $LogLevel;
}

sub no_shuffle () { 1 }          # blocks always run in file order here
sub use_hup () { 1 }             # accepted; every block gets a fresh nginx
sub check_accum_error_log () { 1 }
sub no_nginx_manager () { 1 }
sub no_long_string () { $NoLongString = 1 }
sub no_root_location () { $NoRootLocation = 1 }

sub env_to_nginx (@) {
    push @EnvToNginx, @_;
}

sub config_preamble (;$) {
    $ConfigPreamble = shift if @_;
    return $ConfigPreamble;
}

sub server_name (;$) {
    $ServerName = shift if @_;
    return $ServerName;
}

sub timeout (;$) {
    $Timeout = shift if @_;
    return $Timeout;
}

sub add_block_preprocessor ($) {
    push @BlockPreprocessors, shift;
}

sub bail_out (@) {
    _stop_nginx();
    Test::More::BAIL_OUT(join '', @_);
}

sub server_root () {
    my $dir = $ENV{TEST_NGINX_SERVROOT};
    $dir = "$TDir/servroot" if !defined $dir || $dir eq '';
    $dir = File::Spec->rel2abs($dir);
    $dir =~ s{/+$}{};
    return $dir;
}

sub html_dir () { server_root() . '/html' }

sub server_port () { $ENV{TEST_NGINX_PORT} || 1984 }

# ---------------------------------------------------------------------------
# small helpers

sub _nginx_binary () {
    my $bin = $ENV{TEST_NGINX_BINARY};
    return $bin if defined $bin && $bin ne '';
    for my $dir (split(/:/, $ENV{PATH} // ''), '/usr/sbin', '/usr/local/sbin',
                 '/usr/local/nginx/sbin')
    {
        next unless length $dir;
        return "$dir/nginx" if -x "$dir/nginx" && !-d _;
    }
    return 'nginx';
}

sub _load_modules () {
    my $list = $ENV{TEST_NGINX_LOAD_MODULES};
    if (defined $list && $list =~ /\S/) {
        return split ' ', $list;
    }
    my @mods;
    # Lua compiled in (OpenResty): loading Debian's modules would be refused.
    return @mods if Workerbus::HasLua::has_lua(_nginx_binary());
    for my $m (qw(ndk_http_module.so ngx_http_lua_module.so)) {
        my $path = "/usr/lib/nginx/modules/$m";
        push @mods, $path if -f $path;
    }
    return @mods;
}

sub _slurp ($;$) {
    my ($file, $offset) = @_;
    open my $in, '<', $file or return '';
    binmode $in;
    seek $in, $offset, SEEK_SET if $offset;
    local $/;
    my $data = <$in>;
    close $in;
    return $data // '';
}

sub _spew ($$) {
    my ($file, $data) = @_;
    File::Path::make_path(File::Basename::dirname($file));
    open my $out, '>', $file or die "cannot write $file: $!\n";
    binmode $out;
    print $out $data;
    close $out or die "cannot write $file: $!\n";
}

sub _lines ($) {
    my $text = shift;
    return [] unless defined $text && length $text;
    return [ split /^/m, $text ];
}

sub _fmt ($) {
    my $s = shift;
    $s = "$s";
    chomp $s;
    $s =~ s/\n/\\n/g;
    $s =~ s/([\0-\010\013-\037])/sprintf('\\x%02x', ord $1)/ge;
    return $s;
}

sub _summary ($) {
    my $s = shift;
    return '' unless defined $s;
    $s =~ s/^\s+|\s+$//gs;
    $s = _fmt($s);
    $s = substr($s, 0, 60) . '...' if length $s > 63;
    return $s;
}

# $TEST_NGINX_FOO -> $ENV{TEST_NGINX_FOO}; dies on an unset variable
sub _expand_env ($$) {
    my ($text, $name) = @_;
    return $text if !defined $text || ref $text;
    $text =~ s{\$(TEST_NGINX_[A-Z0-9_]+)}{
        defined $ENV{$1} ? $ENV{$1}
                         : die "$name - No environment $1 defined.\n"
    }ge;
    return $text;
}

# "3", "3s", "500ms", "1.5"
sub _parse_time ($) {
    my $t = shift;
    return undef unless defined $t;
    $t =~ s/^\s+|\s+$//g;
    return $1 / 1000 if $t =~ /^(\d+(?:\.\d+)?)ms$/;
    return $1 if $t =~ /^(\d+(?:\.\d+)?)s?$/;
    return undef;
}

# a scalar section holding one pattern per line, a qr//, or an array ref
sub _patterns ($) {
    my $pats = shift;
    return [] unless defined $pats;
    return [$pats] if ref $pats eq 'Regexp';
    return [ grep { defined } @$pats ] if ref $pats eq 'ARRAY';
    my $s = $pats;
    chomp $s;
    return [ grep { length } split /\n+/, $s ];
}

sub _line_matches ($$) {
    my ($line, $pat) = @_;
    return ref $pat ? scalar($line =~ $pat) : index($line, $pat) >= 0;
}

sub _indexed ($$$) {
    my ($value, $idx, $need_array) = @_;
    return $value unless ref $value eq 'ARRAY';
    return $need_array ? $value->[$idx] : $value->[0];
}

sub _is_text ($$$) {
    my ($got, $expected, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    if (defined $got && defined $expected && $got ne $expected
        && ($got =~ /\n./s || $expected =~ /\n./s))
    {
        Test::More::ok(0, $name);
        Test::More::diag("response differs (--- expected, +++ got):\n"
            . Text::Diff::diff(\$expected, \$got,
                               { STYLE => 'Unified', FILENAME_A => 'expected',
                                 FILENAME_B => 'got' }));
        return 0;
    }
    return Test::More::is($got, $expected, $name);
}

# ---------------------------------------------------------------------------
# processes

sub _children_of ($) {
    my $ppid = shift;
    my @kids;
    opendir my $dh, '/proc' or return ();
    for my $pid (grep { /^\d+$/ } readdir $dh) {
        open my $fh, '<', "/proc/$pid/stat" or next;
        my $stat = <$fh>;
        close $fh;
        next unless defined $stat;
        # pid (comm) state ppid ...; comm may contain spaces and parens
        next unless $stat =~ /.*\)\s+(\S)\s+(\d+)/s;
        push @kids, $pid if $2 == $ppid && $1 ne 'Z' && $1 ne 'X';
    }
    closedir $dh;
    return @kids;
}

# is something listening on $port (127.0.0.1, any address, or ::)?
# undef when /proc/net/tcp cannot be read
sub _port_listening ($) {
    my $port = shift;
    my $hexport = sprintf '%04X', $port;
    my $seen_file;
    for my $file ('/proc/net/tcp', '/proc/net/tcp6') {
        open my $fh, '<', $file or next;
        $seen_file = 1;
        while (my $l = <$fh>) {
            my @f = split ' ', $l;
            next unless @f > 3 && $f[3] eq '0A';
            my ($addr, $p) = split /:/, $f[1];
            next unless defined $p && uc($p) eq $hexport;
            return 1 if $addr =~ /^(?:0100007F|00000000|0+)$/i;
        }
        close $fh;
    }
    return $seen_file ? 0 : undef;
}

# exists and is not a zombie (orphans may never be reaped in a container)
sub _alive ($) {
    my $pid = shift;
    my $stat = _slurp("/proc/$pid/stat");
    return kill(0, $pid) ? 1 : 0 unless length $stat;
    return $stat =~ /.*\)\s+([^ZX\s])\s/s ? 1 : 0;
}

sub _can_connect ($) {
    my $port = shift;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                     Proto => 'tcp', Timeout => 0.5);
    return 0 unless $sock;
    close $sock;
    return 1;
}

sub _is_listening ($) {
    my $port = shift;
    my $r = _port_listening($port);
    return defined $r ? $r : _can_connect($port);
}

sub _reap ($) {
    my $pid = shift;
    my $r = waitpid($pid, POSIX::WNOHANG());
    return $r == $pid || $r == -1;
}

# stop the nginx we started: QUIT, wait for the master (StopTimeout), then
# KILL; finally KILL whatever is left in its process group (orphaned workers)
sub _stop_nginx (;$$) {
    my ($timeout, $sig) = @_;
    $timeout //= $StopTimeout;
    $sig //= 'QUIT';
    my $pid = $NginxPid;
    return 1 unless $pid;
    local ($!, $?);
    undef $NginxPid;
    my $clean = 1;
    if (!_reap($pid)) {
        kill $sig, $pid;
        my $deadline = Time::HiRes::time() + $timeout;
        my $gone = 0;
        while (Time::HiRes::time() < $deadline) {
            if (_reap($pid)) { $gone = 1; last }
            Time::HiRes::sleep(0.01);
        }
        if (!$gone) {
            $clean = 0;
            my $what = defined $NginxBlock ? ", $NginxBlock" : '';
            Test::More::diag("nginx (pid $pid$what) still running $timeout s after SIG$sig; sending SIGKILL");
            kill 'KILL', -$pid;
            kill 'KILL', $pid;
            waitpid($pid, 0);
        }
    }
    kill 'KILL', -$pid;    # stragglers of that process group, if any
    return $clean;
}

# a previous run that was killed may have left an nginx behind
sub _kill_stale_nginx ($) {
    my $pidfile = shift;
    my $pid = _slurp($pidfile);
    return unless defined $pid && $pid =~ /^\s*(\d+)\s*$/;
    $pid = $1;
    return if $pid == $$;
    # only an nginx started on this servroot (-p <servroot>/)
    my $cmd = _slurp("/proc/$pid/cmdline");
    return unless $cmd =~ /nginx/ && index($cmd, server_root() . '/') >= 0;
    kill 'TERM', $pid;
    for (1 .. 300) {
        last unless _alive($pid);
        Time::HiRes::sleep(0.01);
    }
    kill 'KILL', -$pid;
    kill 'KILL', $pid;
    unlink $pidfile;
}

sub _cleanup () {
    return unless $$ == $RunnerPid;
    _stop_nginx(2, 'TERM') if $NginxPid;
}

END {
    my $status = $?;
    _cleanup();
    $? = $status;
}

for my $sig (qw(INT TERM HUP QUIT)) {
    $SIG{$sig} = sub {
        _cleanup();
        $SIG{$sig} = 'DEFAULT';
        kill $sig, $$;
        POSIX::_exit(1);
    };
}

# fork + exec nginx in the foreground in its own process group; stdout and
# stderr go to $NginxStderr.  Returns the pid.
sub _spawn_nginx (@) {
    my @args = @_;
    my $bin = _nginx_binary();
    my $pid = fork;
    die "fork failed: $!\n" unless defined $pid;
    if ($pid == 0) {
        POSIX::setpgid(0, 0);
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', $NginxStderr or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        { no warnings 'exec'; exec { $bin } $bin, @args; }
        print STDERR "cannot exec $bin: $!\n";
        POSIX::_exit(127);
    }
    POSIX::setpgid($pid, $pid);
    return $pid;
}

sub _nginx_args () {
    return ('-p', server_root() . '/', '-c', 'conf/nginx.conf');
}

sub _status_text ($) {
    my $st = shift;
    return 'exec failed' if $st == -1;
    return 'killed by signal ' . ($st & 127) if $st & 127;
    return 'exit code ' . ($st >> 8);
}

# ---------------------------------------------------------------------------
# nginx.conf

sub _build_config ($) {
    my $block = shift;
    my $name = $block->name;
    my $port = server_port();

    my $main = _expand_env($block->main_config // '', $name);
    my $http = _expand_env($block->http_config // '', $name);
    my $conf = _expand_env($block->config // '', $name);
    my $pre  = _expand_env($ConfigPreamble // '', $name);

    my @mods = _load_modules();
    my $c = '';
    $c .= "load_module $_;\n" for @mods;
    $c .= "worker_processes $Workers;\n";
    $c .= 'master_process ' . ($MasterOn ? 'on' : 'off') . ";\n";
    $c .= "daemon off;\n";
    $c .= "pid logs/nginx.pid;\n";
    # --- log_level (Test::Nginx's section): this block's level, else the file's.
    my $level = $block->log_level // $LogLevel;
    $level =~ s/^\s+|\s+$//g;
    $c .= "error_log logs/error.log $level;\n";
    $c .= "user root;\n" if $> == 0 && $main !~ /^\s*user\s/m;
    for my $e (@EnvToNginx) {
        $c .= "env $e;\n";
    }
    $c .= "\n# --- main_config\n$main\n# --- end of main_config\n\n";
    $c .= "events {\n    worker_connections $WorkerConnections;\n    accept_mutex off;\n}\n\n";
    $c .= "http {\n";
    $c .= "    access_log off;\n";
    $c .= "    default_type text/plain;\n";
    $c .= "    keepalive_timeout 68;\n";
    for my $t (qw(client_body proxy fastcgi uwsgi scgi)) {
        $c .= "    ${t}_temp_path ${t}_temp;\n"
            unless $http =~ /\b${t}_temp_path\b/;
    }
    if (Workerbus::HasLua::has_lua(_nginx_binary(), @mods) && $http !~ /\blua_package_path\b/) {
        my $lua_path = $ENV{TEST_NGINX_LUA_PATH};
        if (!defined $lua_path || $lua_path eq '') {
            my $repo = Cwd::abs_path("$TDir/..") // "$TDir/..";
            $lua_path = "$repo/lib/?.lua;;";
        }
        $c .= "    lua_package_path \"$lua_path\";\n";
    }
    $c .= "\n    # --- http_config\n$http\n    # --- end of http_config\n\n";
    $c .= "    server {\n";
    $c .= "        listen 127.0.0.1:$port;\n";
    $c .= "        server_name $ServerName;\n";
    $c .= "        client_max_body_size 30M;\n";
    $c .= "$pre\n" if length $pre;
    $c .= "        location / {\n            root html;\n            index index.html index.htm;\n        }\n"
        unless $NoRootLocation;
    $c .= "\n        # --- config\n$conf\n        # --- end of config\n";
    $c .= "    }\n}\n";
    return $c;
}

sub _write_user_files ($) {
    my $block = shift;
    my $files = $block->user_files;
    return unless defined $files;
    my $html = html_dir();
    my @list;
    if (ref $files eq 'ARRAY') {
        @list = map { [ $_->[0], $_->[1] ] } @$files;
    } else {
        my $cur;
        for my $line (split /^/m, $files) {
            if ($line =~ /^>>> (\S+)/) {
                $cur = [ $1, '' ];
                push @list, $cur;
            } elsif ($cur) {
                $cur->[1] .= $line;
            }
        }
    }
    for my $f (@list) {
        my ($path, $body) = @$f;
        $path = "$html/$path" unless $path =~ m{^/};
        _spew($path, _expand_env($body, $block->name));
    }
}

# ---------------------------------------------------------------------------
# HTTP client

sub _build_requests ($) {
    my $block = shift;
    my $name = $block->name;
    my $req = $block->request;
    die "$name - no --- request section\n" unless defined $req;
    my @reqs = ref $req eq 'ARRAY' ? @$req : ($req);
    my $more = $block->more_headers;
    my @out;
    for my $i (0 .. $#reqs) {
        my $r = _expand_env($reqs[$i], $name);
        $r =~ s/\A(?:\s*#[^\n]*\n|\s+)+//;    # leading blank and comment lines
        my ($line, $body) = split /\n/, $r, 2;
        $line =~ s/\s+$//;
        my ($method, $uri, $ver) = split ' ', $line, 3;
        die "$name - bad request line \"$line\"\n" unless defined $uri;
        $ver = 'HTTP/1.1' unless defined $ver && length $ver;
        $body = '' unless defined $body;
        $body =~ s/^\s+|\s+$//gs;

        my $h = ref $more eq 'ARRAY' ? $more->[$i] : $more;
        $h = _expand_env($h // '', $name);
        my $hdrs = '';
        for my $hl (split /\n+/, $h) {
            next if $hl =~ /^\s*#/ || $hl !~ /\S/;
            my ($k, $v) = split /:\s*/, $hl, 2;
            $hdrs .= "$k: " . ($v // '') . "\r\n";
        }
        my $head = "$method $uri $ver\r\n";
        $head .= "Host: $ServerName\r\n" unless $hdrs =~ /^Host:/mi;
        $head .= "Connection: close\r\n" unless $hdrs =~ /^Connection:/mi;
        $head .= $hdrs;
        $head .= 'Content-Length: ' . length($body) . "\r\n"
            if length $body && $hdrs !~ /^(?:Content-Length|Transfer-Encoding):/mi;
        push @out, { raw => "$head\r\n$body", head => uc($method) eq 'HEAD' };
    }
    return \@out;
}

# parse what we have so far; returns a hash, with complete => 1 once the
# whole message is there (by Content-Length or chunked framing)
sub _parse_response ($$) {
    my ($buf, $is_head) = @_;
    my %res = (code => undef, headers => {}, body => undef, complete => 0);
    return \%res unless $buf =~ /\A(HTTP\/\d\.\d)\s+(\d{3})[^\r\n]*\r?\n(.*?)\r?\n\r?\n/s;
    $res{code} = $2;
    my $hdr_text = $3;
    my $rest = substr $buf, $+[0];
    for my $l (split /\r?\n/, $hdr_text) {
        my ($k, $v) = split /:\s*/, $l, 2;
        next unless defined $v;
        $k = lc $k;
        $res{headers}{$k} = exists $res{headers}{$k} ? "$res{headers}{$k}, $v" : $v;
    }
    if ($is_head || $res{code} =~ /^(?:1\d\d|204|304)$/) {
        $res{body} = '';
        $res{complete} = 1;
        return \%res;
    }
    my $te = $res{headers}{'transfer-encoding'};
    if (defined $te && $te =~ /chunked/i) {
        my $body = '';
        while (1) {
            last unless $rest =~ /\A([0-9a-fA-F]+)[^\r\n]*\r\n/;
            my $size = hex $1;
            my $start = $+[0];
            if ($size == 0) {
                $res{complete} = 1 if substr($rest, $start) =~ /\r\n\z|\r\n\r\n/;
                last;
            }
            last if length($rest) < $start + $size + 2;
            $body .= substr $rest, $start, $size;
            $rest = substr $rest, $start + $size + 2;
        }
        $res{body} = $body;
        return \%res;
    }
    my $cl = $res{headers}{'content-length'};
    if (defined $cl && $cl =~ /^\d+$/) {
        $res{complete} = 1 if length($rest) >= $cl;
        $res{body} = substr $rest, 0, $cl;
        return \%res;
    }
    $res{body} = $rest;    # read until the server closes
    return \%res;
}

# one request on its own connection; returns (parsed response, error)
sub _send_once ($$) {
    my ($req, $timeout) = @_;
    my $deadline = Time::HiRes::time() + $timeout;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                     PeerPort => server_port(),
                                     Proto => 'tcp', Timeout => $timeout);
    return (undef, "connect failed: $!", 1) unless $sock;
    $sock->autoflush(1);
    binmode $sock;
    my $connected = Time::HiRes::time();
    my $data = $req->{raw};
    my $sel = IO::Select->new($sock);
    while (length $data) {
        my $left = $deadline - Time::HiRes::time();
        return (undef, 'timeout while sending the request', 0)
            if $left <= 0 || !$sel->can_write($left);
        my $n = syswrite $sock, $data;
        if (!defined $n) {
            next if $!{EINTR} || $!{EAGAIN};
            last;    # the server may answer before reading everything
        }
        substr($data, 0, $n) = '';
    }
    my $buf = '';
    my ($err, $res);
    while (1) {
        my $left = $deadline - Time::HiRes::time();
        if ($left <= 0 || !$sel->can_read($left)) {
            $err = "client socket timed out after $timeout s";
            last;
        }
        my $n = sysread $sock, $buf, 65536, length $buf;
        if (!defined $n) {
            next if $!{EINTR} || $!{EAGAIN};
            $err = "read failed: $!";
            last;
        }
        last if $n == 0;
        $res = _parse_response($buf, $req->{head});
        last if $res->{complete};
    }
    close $sock;
    $res = _parse_response($buf, $req->{head});
    # an old worker closing its idle connections (reload, shutdown) does so
    # right after accepting; a slower empty reply (a crash in the middle of
    # the request, say) is not retried: the request may have had effects
    my $retryable = !length($buf) && (!$err || $err !~ /timed out/)
        && Time::HiRes::time() - $connected < $RetryWindow;
    $err //= 'empty reply from server' unless length $buf;
    return ($res, $err, $retryable);
}

# retry once on a refused connection, or a reset or an empty reply that came
# at once (an old worker closing idle connections during a reload)
sub _send_request ($$$) {
    my ($req, $timeout, $name) = @_;
    my ($res, $err, $retry) = _send_once($req, $timeout);
    if ($retry) {
        Test::More::note("$name - $err; retrying once");
        Time::HiRes::sleep(0.3);
        ($res, $err) = _send_once($req, $timeout);
        $err .= ' (after one retry)' if defined $err;
    }
    return ($res, $err);
}

# ---------------------------------------------------------------------------
# checks

sub _check_error_log ($$$$) {
    my ($block, $lines, $rep, $what) = @_;
    my $name = $block->name;

    if (defined $block->grep_error_log) {
        my $pat = $block->grep_error_log;
        $pat = $pat->[$rep] if ref $pat eq 'ARRAY';
        my $expected = $block->grep_error_log_out;
        if (!defined $expected) {
            Test::More::fail("$name - --- grep_error_log without --- grep_error_log_out");
        } else {
            my $out = '';
            for my $line (@$lines) {
                my $m;
                if (ref $pat) {
                    $m = $& if $line =~ $pat;
                } elsif (index($line, $pat) >= 0) {
                    $m = $pat;
                }
                $out .= "$m\n" if defined $m && $m !~ /\n/;
            }
            if (ref $expected eq 'ARRAY') {
                if ($RepeatEach > 1 && @$expected > 1) {
                    $expected = $expected->[$rep];
                } elsif (@$expected == 1) {
                    $expected = $expected->[0];
                } elsif (!grep { ref } @$expected) {
                    $expected = join '', @$expected;
                } else {
                    my @bad = grep { !(ref $_ ? $out =~ $_ : index($out, $_) >= 0) } @$expected;
                    Test::More::ok(!@bad, "$name - grep_error_log_out (req $rep)")
                        or Test::More::diag("got:\n$out\nnot matched: " . join(', ', map { _fmt($_) } @bad));
                    undef $expected;
                }
            }
            if (defined $expected) {
                $expected = _expand_env($expected, $name) unless ref $expected;
                if (ref $expected eq 'Regexp') {
                    Test::More::like($out, $expected, "$name - grep_error_log_out (req $rep)");
                } else {
                    _is_text($out, $expected, "$name - grep_error_log_out (req $rep)");
                }
            }
        }
    }

    if (defined $block->error_log) {
        for my $pat (@{ _patterns($block->error_log) }) {
            my $hit = grep { _line_matches($_, $pat) } @$lines;
            if ($hit) {
                Test::More::pass("$name - pattern \"$pat\" matches a line in $what (req $rep)");
            } else {
                Test::More::fail("$name - pattern \"$pat\" should match a line in $what (req $rep)");
            }
        }
    }

    if (defined $block->no_error_log) {
        for my $pat (@{ _patterns($block->no_error_log) }) {
            my ($hit) = grep { _line_matches($_, $pat) } @$lines;
            if (defined $hit) {
                Test::More::fail("$name - pattern \"" . _fmt($pat)
                    . "\" should not match any line in $what but matches line \""
                    . _fmt($hit) . "\" (req $rep)");
            } else {
                Test::More::pass("$name - pattern \"" . _fmt($pat)
                    . "\" does not match a line in $what (req $rep)");
            }
        }
    }
}

sub _check_shutdown_log ($$) {
    my ($block, $lines) = @_;
    my $name = $block->name;
    for my $pat (@{ _patterns($block->shutdown_error_log) }) {
        if (grep { _line_matches($_, $pat) } @$lines) {
            Test::More::pass("$name - pattern \"$pat\" matches a line in error.log (at shutdown)");
        } else {
            Test::More::fail("$name - pattern \"$pat\" should match a line in error.log (at shutdown)");
        }
    }
    for my $pat (@{ _patterns($block->no_shutdown_error_log) }) {
        my ($hit) = grep { _line_matches($_, $pat) } @$lines;
        if (defined $hit) {
            Test::More::fail("$name - pattern \"" . _fmt($pat)
                . "\" should not match any line in error.log but matches line \""
                . _fmt($hit) . "\" (at shutdown)");
        } else {
            Test::More::pass("$name - pattern \"" . _fmt($pat)
                . "\" does not match a line in error.log (at shutdown)");
        }
    }
}

sub _warn_log_alerts ($$) {
    my ($block, $lines) = @_;
    my $name = $block->name;
    my $pats = join "\n", map { ref $_ ? "$_" : $_ }
        map { @{ _patterns($_) } } grep { defined }
        ($block->error_log, $block->no_error_log);
    for my $lvl (qw(alert crit emerg)) {
        next if index($pats, "[$lvl") >= 0;
        for my $line (@$lines) {
            warn "WARNING: $name - " . _fmt($line) . "\n" if $line =~ /\[$lvl\]/;
        }
    }
}

sub _check_response ($$$$$$) {
    my ($block, $res, $err, $idx, $rep, $need_array) = @_;
    my $name = $block->name;
    my $code = $res ? $res->{code} : undef;
    my $body = $res ? $res->{body} : undef;

    my $exp_code = _indexed($block->error_code, $idx, $need_array);
    $exp_code = 200 unless defined $exp_code;
    $exp_code =~ s/^\s+|\s+$//g;
    Test::More::is($code // '', $exp_code, "$name - status code ok")
        or defined $err && Test::More::diag("$name - request $idx: $err");

    if (defined $block->response_body) {
        my $exp = _indexed($block->response_body, $idx, $need_array);
        $exp = _expand_env($exp, $name) unless ref $exp;
        if (ref $exp eq 'Regexp') {
            Test::More::like($body // '', $exp,
                "$name - response_body - like (repeated req $rep, req $idx)");
        } else {
            _is_text($body, $exp,
                "$name - response_body - response is expected (repeated req $rep, req $idx)");
        }
    } elsif (defined $block->response_body_like) {
        my $pat = _indexed($block->response_body_like, $idx, $need_array);
        $pat = qr/$pat/s unless ref $pat eq 'Regexp';
        Test::More::like($body // '', $pat,
            "$name - response_body_like - response is expected (" . _summary($body) . ")");
    }

    if (defined $block->response_headers) {
        my $spec = _indexed($block->response_headers, $idx, $need_array);
        for my $l (split /\n+/, $spec // '') {
            next unless $l =~ /\S/;
            if ($l =~ /^\s*!\s*(\S+?)\s*$/) {
                my $k = $1;
                Test::More::ok(!exists(($res ? $res->{headers} : {})->{lc $k}),
                    "$name - header $k not present");
                next;
            }
            my ($k, $v) = split /:\s*/, $l, 2;
            $v //= '';
            $v =~ s/\s+$//;
            Test::More::is(($res ? $res->{headers}{lc $k} : undef) // '', $v,
                "$name - header $k ok");
        }
    }
}

my %Supported = map { $_ => 1 } qw(
    ONLY SKIP LAST name description
    main_config http_config config request more_headers
    response_body response_body_like error_code response_headers
    error_log no_error_log grep_error_log grep_error_log_out
    shutdown_error_log no_shutdown_error_log
    wait timeout must_die skip_nginx user_files
);

sub _warn_unsupported ($) {
    my $block = shift;
    # block preprocessors often give meaning to sections of their own
    return if @BlockPreprocessors;
    for my $sec (@{ $block->{_section_order}[0] || [] }) {
        next if $Supported{$sec} || $UnsupportedWarned{$sec}++;
        Test::More::diag("WARNING: section --- $sec is not supported by t/lib/Test/Nginx/Socket.pm; ignored");
    }
}

# ---------------------------------------------------------------------------
# one run of one block

sub _prepare_servroot () {
    my $root = server_root();
    File::Path::make_path("$root/conf", "$root/logs", "$root/html");
    $NginxStderr = "$root/logs/nginx.stderr";
}

sub _read_log_from ($) {
    my $off = shift;
    return _slurp(server_root() . '/logs/error.log', $off);
}

sub _log_size () {
    return -s (server_root() . '/logs/error.log') || 0;
}

sub _startup_failure ($$$$) {
    my ($name, $why, $log_off, $stderr_off) = @_;
    Test::More::fail("$name - nginx started ($why)");
    my $stderr = _slurp($NginxStderr, $stderr_off);
    my $log = _read_log_from($log_off);
    $log = substr($log, -8000) if length $log > 8000;
    Test::More::diag("nginx stderr:\n$stderr") if length $stderr;
    Test::More::diag("error.log:\n$log") if length $log;
}

sub _wait_port_free ($) {
    my $port = shift;
    for (1 .. 300) {
        return 1 unless _is_listening($port);
        Time::HiRes::sleep(0.01);
    }
    return 0;
}

sub _start_nginx ($$$) {
    my ($name, $log_off, $stderr_off) = @_;
    my $port = server_port();
    if (!_wait_port_free($port)) {
        _startup_failure($name, "port $port is already in use by another process", $log_off, $stderr_off);
        return 0;
    }
    my $pid = _spawn_nginx(_nginx_args());
    $NginxPid = $pid;
    my $deadline = Time::HiRes::time() + $StartTimeout;
    while (1) {
        my $r = waitpid($pid, POSIX::WNOHANG());
        if ($r == $pid) {
            my $st = _status_text($?);
            undef $NginxPid;
            kill 'KILL', -$pid;
            _startup_failure($name, "it exited at startup: $st", $log_off, $stderr_off);
            return 0;
        }
        if (_is_listening($port)) {
            return 1 unless $MasterOn;
            return 1 if _children_of($pid) >= $Workers;
        }
        if (Time::HiRes::time() > $deadline) {
            _startup_failure($name, "not listening on 127.0.0.1:$port"
                . ($MasterOn ? " with $Workers workers" : '') . " after $StartTimeout s",
                $log_off, $stderr_off);
            _stop_nginx(2);
            return 0;
        }
        Time::HiRes::sleep(0.02);
    }
}

sub _run_must_die ($$$$) {
    my ($block, $rep, $log_off, $stderr_off) = @_;
    my $name = $block->name;

    # 1. nginx -t
    my $t_pid = _spawn_nginx('-t', _nginx_args());
    waitpid($t_pid, 0);
    my $t_status = $?;
    kill 'KILL', -$t_pid;

    # 2. a real start
    my $port = server_port();
    _wait_port_free($port);
    my $pid = _spawn_nginx(_nginx_args());
    my $deadline = Time::HiRes::time() + $StartTimeout;
    my ($exited, $status);
    while (Time::HiRes::time() < $deadline) {
        if (waitpid($pid, POSIX::WNOHANG()) == $pid) {
            ($exited, $status) = (1, $?);
            last;
        }
        last if _is_listening($port) && Time::HiRes::time() > $deadline - $StartTimeout + 0.5;
        Time::HiRes::sleep(0.02);
    }
    if (!$exited) {
        $NginxPid = $pid;
        _stop_nginx(3);
    } else {
        kill 'KILL', -$pid;
    }

    my $want = $block->must_die;
    $want =~ s/^\s+|\s+$//g if defined $want;
    my $why = 'nginx -t: ' . _status_text($t_status) . '; start: '
        . ($exited ? _status_text($status) : 'still running, stopped it');
    if (defined $want && $want =~ /^\d+$/) {
        Test::More::ok($t_status != 0 && $exited && ($status >> 8) == $want,
            "$name - die with the expected exit code")
            or Test::More::diag("$name - expected exit code $want; $why");
    } else {
        Test::More::ok($t_status != 0 && $exited && $status != 0,
            "$name - die as expected")
            or Test::More::diag("$name - $why");
    }

    my $text = _slurp($NginxStderr, $stderr_off) . _read_log_from($log_off);
    _check_error_log($block, _lines($text), $rep, 'error.log');
}

sub _run_block ($$) {
    my ($block, $rep) = @_;
    my $name = $block->name;
    local ($?, $!);    # waitpid() and kill() results must not leak to exit()

    _stop_nginx();
    _prepare_servroot();

    my ($conf, $reqs);
    my $ok = eval {
        $conf = _build_config($block);
        $reqs = _build_requests($block) unless defined $block->must_die;
        _write_user_files($block);
        _spew(server_root() . '/conf/nginx.conf', $conf);
        1;
    };
    if (!$ok) {
        Test::More::fail("$name - test block is usable");
        Test::More::diag($@);
        return;
    }

    my $log_off = _log_size();
    my $stderr_off = -s $NginxStderr || 0;

    if (defined $block->must_die) {
        _run_must_die($block, $rep, $log_off, $stderr_off);
        return;
    }

    return unless _start_nginx($name, $log_off, $stderr_off);
    $NginxBlock = $name;

    my $timeout = _parse_time($block->timeout) // _parse_time($Timeout) // 3;
    my $need_array = @$reqs > 1;
    for my $i (0 .. $#$reqs) {
        my ($res, $err) = _send_request($reqs->[$i], $timeout, $name);
        _check_response($block, $res, $err, $i, $rep, $need_array);
    }

    my $wait = _parse_time($block->wait);
    Time::HiRes::sleep($wait) if $wait;

    # nginx writes to the log after it has sent the response (log phase,
    # connection close): give it a moment
    Time::HiRes::sleep(0.05);

    my $lines = _lines(_slurp($NginxStderr, $stderr_off) . _read_log_from($log_off));
    _check_error_log($block, $lines, $rep, 'error.log');
    _warn_log_alerts($block, $lines);

    my $shutdown_off = _log_size();
    _stop_nginx();
    if (defined $block->shutdown_error_log || defined $block->no_shutdown_error_log) {
        _check_shutdown_log($block, _lines(_read_log_from($shutdown_off)));
    }
}

sub run_tests () {
    my $root = server_root();
    _prepare_servroot();
    _kill_stale_nginx("$root/logs/nginx.pid");
    # one error.log per test file; each block reads from its own offset
    _spew("$root/logs/error.log", '');
    _spew($NginxStderr, '');

    $ENV{TEST_NGINX_SERVER_PORT} = server_port();
    $ENV{TEST_NGINX_HTML_DIR} = html_dir();

    Test::More::plan('no_plan') unless Test::More->builder->has_plan;

    for my $block (Test::Base::blocks()) {
        $_->($block) for @BlockPreprocessors;
        _warn_unsupported($block);
        for my $rep (0 .. $RepeatEach - 1) {
            _run_block($block, $rep);
        }
    }
    _stop_nginx();
    return;
}

1;
