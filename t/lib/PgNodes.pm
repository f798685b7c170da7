package PgNodes;
# Helpers for the PostgreSQL bridge suites (t/4xx-*.t): real PostgreSQL
# servers and real nginx nodes. Several nginx instances on several ports
# act as several nodes sharing one database. Everything started here is
# stopped by pid (END block), also when a test dies.
#
# PostgreSQL: the server on 127.0.0.1:5432 when it accepts trust logins to
# database "test" (as on the developers' machines), else a private one. The
# private server (initdb into a temporary folder, run as the unprivileged
# "postgres" user when we are root) also serves the tests that need
# passwords (scram-sha-256, md5, password), TLS, a restart or an outage.

use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path remove_tree);
use File::Temp qw(tempdir);
use HTTP::Tiny;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);
use Exporter 'import';
use Workerbus::HasLua;

our @EXPORT = qw(shared_pg private_pg start_node stop_node reload_node node_get node_status
                 wait_until psql psql_ok node_log nginx_t repo_root pg_stop pg_start pg_bin
                 bus_http bus_server pgst listening bg_get);

my $ROOT = abs_path(dirname(__FILE__) . "/../..");
sub repo_root { $ROOT }

my $NGINX = $ENV{TEST_NGINX_BINARY} || "/usr/sbin/nginx";
my $PORT_BASE = $ENV{TEST_NGINX_PORT} || 1984;
my $MODULES = $ENV{TEST_NGINX_LOAD_MODULES}
    || "/usr/lib/nginx/modules/ndk_http_module.so /usr/lib/nginx/modules/ngx_http_lua_module.so $ROOT/build/ngx_workerbus_module.so";
my $LUA_PATH = $ENV{TEST_NGINX_LUA_PATH} || "$ROOT/lib/?.lua;;";

my $HAS_LUA = Workerbus::HasLua::has_lua($NGINX, split /\s+/, $MODULES);
my (@nodes, @servers);

sub pg_bin {
    my ($name) = @_;
    for my $d (glob("/usr/lib/postgresql/*/bin")) {
        return "$d/$name" if -x "$d/$name";
    }
    return $name;
}

# Runs psql; returns its output (trimmed) or undef on failure.
sub psql {
    my ($conn, $sql, %o) = @_;
    local $ENV{PGPASSWORD} = $o{password} if defined $o{password};
    local $ENV{PGCONNECT_TIMEOUT} = 3;
    open(my $fh, "-|", "psql", "-X", "-w", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", $conn, "-c", $sql)
        or return undef;
    my $out = do { local $/; <$fh> };
    close $fh or return undef;
    $out =~ s/\s+\z//;
    return $out;
}

sub psql_ok { defined psql(@_) }

sub wait_until {
    my ($secs, $cond) = @_;
    my $end = time + $secs;
    while (time < $end) {
        my $r = $cond->();
        return $r if $r;
        sleep 0.05;
    }
    return $cond->();
}

# The shared server when it serves trust logins to "test", else the private one.
my $shared;
sub shared_pg {
    return $shared if $shared;
    if (!$ENV{PGNODES_PRIVATE_ONLY}
        && psql_ok("host=127.0.0.1 port=5432 user=postgres dbname=test sslmode=disable", "select 1")) {
        $shared = { host => "127.0.0.1", port => 5432, db => "test", user => "postgres", shared => 1 };
    } else {
        $shared = private_pg();
    }
    return $shared;
}

sub run_as_pg {
    my @cmd = @_;
    return ($> == 0) ? ("runuser", "-u", "postgres", "--", @cmd) : @cmd;
}

# A private server on a free port of our range (TEST_NGINX_PORT based, or
# PGNODES_PG_PORT), with password users, TLS, and pg_hba as the tests need.
sub private_pg {
    my (%o) = @_;
    my $port = $o{port} || $ENV{PGNODES_PG_PORT} || 25401;
    my $dir = tempdir("wbpg-XXXXXX", TMPDIR => 1, CLEANUP => 0);
    chmod 0755, $dir;
    my $data = "$dir/data";
    if ($> == 0) {
        system("chown", "postgres", $dir) == 0 or die "chown: $?";
    }
    my $initdb = pg_bin("initdb");
    my $cmd = join " ", map { quotemeta } run_as_pg($initdb, "-D", $data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync");
    system("$cmd >/dev/null") == 0 or die "initdb failed";
    # TLS: a CA and a server certificate for "localhost".
    my $ssl = "$dir/ssl";
    make_path($ssl);
    my $q = "2>/dev/null";
    system("cd $ssl && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=wb-test-ca $q "
         . "&& openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost $q "
         . "&& printf 'subjectAltName=DNS:localhost\\n' > ext.cnf "
         . "&& openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf $q "
         . "&& cp server.crt server.key $data/ && chmod 0600 $data/server.key") == 0 or die "openssl failed";
    system("chown", "postgres", "$data/server.key", "$data/server.crt") if $> == 0;
    chmod 0644, "$ssl/ca.crt";
    open(my $hba, ">", "$data/pg_hba.conf") or die;
    print $hba "host all postgres 127.0.0.1/32 trust\n"
             . "host all alice 127.0.0.1/32 scram-sha-256\n"
             . "host all bob 127.0.0.1/32 md5\n"
             . "host all carol 127.0.0.1/32 password\n"
             . "host all all 127.0.0.1/32 reject\n";
    close $hba;
    open(my $pc, ">>", "$data/postgresql.conf") or die;
    print $pc "listen_addresses = '127.0.0.1'\nport = $port\nunix_socket_directories = '$dir'\n"
            . "ssl = on\nfsync = off\nmax_connections = 40\nshared_buffers = 16MB\n";
    close $pc;
    my $s = { host => "127.0.0.1", port => $port, db => "test", user => "postgres", dir => $dir,
              data => $data, ca => "$ssl/ca.crt" };
    push @servers, $s;
    pg_start($s);
    psql("host=127.0.0.1 port=$port user=postgres dbname=postgres", "create database test") // die "createdb";
    my $conn = "host=127.0.0.1 port=$port user=postgres dbname=postgres";
    psql($conn, "set password_encryption = 'scram-sha-256'; create user alice password 'alice-secret'");
    psql($conn, "set password_encryption = 'md5'; create user bob password 'bob-secret'");
    psql($conn, "create user carol password 'carol-secret'");
    return $s;
}

sub pg_pid {
    my ($s) = @_;
    open(my $fh, "<", "$s->{data}/postmaster.pid") or return undef;
    my $pid = <$fh>;
    chomp $pid if defined $pid;
    return $pid;
}

sub pg_start {
    my ($s) = @_;
    system(run_as_pg(pg_bin("pg_ctl"), "-D", $s->{data}, "-l", "$s->{dir}/pg.log", "-w", "-t", "60", "-s", "start")) == 0
        or die "pg_ctl start failed: " . `tail -5 $s->{dir}/pg.log`;
}

# Stops the private server: fast shutdown by pid, waiting for it to go.
sub pg_stop {
    my ($s) = @_;
    my $pid = pg_pid($s) or return;
    kill 'INT', $pid;
    wait_until(30, sub { !kill(0, $pid) });
}

sub conf_for {
    my ($n) = @_;
    my $loads = join "", map { "load_module $_;\n" } split /\s+/, $MODULES;
    my $workers = $n->{workers} // 2;
    return <<"EOF";
$loads
worker_processes $workers;
error_log logs/error.log info;
pid logs/nginx.pid;
$n->{main}
events { worker_connections 256; }
http {
    access_log off;
@{[ $HAS_LUA ? "    lua_package_path \"$LUA_PATH\";\n    lua_shared_dict got 8m;" : "" ]}
    $n->{http}
    server {
        listen 127.0.0.1:$n->{port};
        location = /status { workerbus_status; }
        $n->{server}
    }
}
EOF
}

# nginx -t on a configuration; returns (exit code, stderr).
sub nginx_t {
    my (%o) = @_;
    my $dir = "$ROOT/t/servroot_pg_t";
    remove_tree($dir);
    make_path("$dir/conf", "$dir/logs");
    my $n = { port => $PORT_BASE, main => $o{main} // "", http => "", server => "", workers => 1 };
    open(my $fh, ">", "$dir/conf/nginx.conf") or die;
    print $fh conf_for($n);
    close $fh;
    my $out = `$NGINX -t -p $dir/ -c conf/nginx.conf 2>&1`;
    return ($? >> 8, $out, "$dir/conf/nginx.conf");
}

# Starts an nginx node: name, port offset (0 or 1), main/http/server snippets.
sub start_node {
    my (%o) = @_;
    my $n = { name => $o{name}, port => $PORT_BASE + ($o{offset} // 0), main => $o{main} // "",
              http => $o{http} // "", server => $o{server} // "", workers => $o{workers} // 2 };
    $n->{dir} = "$ROOT/t/servroot_pg_$n->{name}";
    if (-f "$n->{dir}/logs/nginx.pid") {
        my $old = `cat $n->{dir}/logs/nginx.pid`;
        chomp $old;
        if ($old && kill(0, $old)) {
            kill 'TERM', $old;
            wait_until(10, sub { !kill(0, $old) });
        }
    }
    remove_tree($n->{dir});
    make_path("$n->{dir}/conf", "$n->{dir}/logs");
    open(my $fh, ">", "$n->{dir}/conf/nginx.conf") or die;
    print $fh conf_for($n);
    close $fh;
    system($NGINX, "-p", "$n->{dir}/", "-c", "conf/nginx.conf") == 0 or die "nginx $n->{name} did not start: "
        . `cat $n->{dir}/logs/error.log`;
    my $pid = wait_until(10, sub { my $p = `cat $n->{dir}/logs/nginx.pid 2>/dev/null`; chomp $p; $p });
    $n->{pid} = $pid or die "no pid file for $n->{name}";
    wait_until(10, sub { defined node_get($n, "/status") });
    push @nodes, $n;
    return $n;
}

sub stop_node {
    my ($n) = @_;
    return unless $n->{pid};
    kill 'TERM', $n->{pid};
    wait_until(15, sub { !kill(0, $n->{pid}) });
    # A worker that outlived its master (must not happen): stop it too.
    for my $w (@{ $n->{seen_workers} || [] }) {
        kill 'KILL', $w if kill(0, $w);
    }
    delete $n->{pid};
}

sub reload_node {
    my ($n) = @_;
    kill 'HUP', $n->{pid};
}

sub node_get {
    my ($n, $path) = @_;
    my $r = HTTP::Tiny->new(timeout => 30)->get("http://127.0.0.1:$n->{port}$path");
    return undef unless $r->{success};
    return $r->{content};
}

sub node_status {
    my ($n) = @_;
    require JSON::PP;
    my $body = node_get($n, "/status") // return undef;
    my $st = eval { JSON::PP::decode_json($body) } or return undef;
    $n->{seen_workers} = [ map { $_->{pid} } @{ $st->{workers} || [] } ];
    return $st;
}

sub node_log {
    my ($n) = @_;
    open(my $fh, "<", "$n->{dir}/logs/error.log") or return "";
    local $/;
    return <$fh>;
}


# init_worker code: every worker subscribes to $sub and keeps what it gets
# in the "got" shared dict (list "sub:<pid>", last origin "origin:<pid>"),
# then runs the Lua in $more (optional).
sub bus_http {
    my ($sub, $more) = @_;
    $more //= "";
    return <<"EOF_HTTP";
init_worker_by_lua_block {
    local wb = require "resty.workerbus"
    local got = ngx.shared.got
    local id, err = wb.subscribe("$sub", function(payload, channel, origin)
        got:rpush("sub:" .. ngx.worker.pid(), payload)
        got:set("origin:" .. ngx.worker.pid(), origin)
        got:set("channel", channel)
    end)
    if not id then ngx.log(ngx.ERR, "subscribe failed: ", err) end
    $more
}
EOF_HTTP
}

# Locations the bus suites use: /post, /postn, /wait, /waiting, /got,
# /drain, /origin, /hostile, /big, /stream (posts 1..n from a timer), /flag,
# /fill (posts until the queue is full).
sub bus_server {
    return <<'EOF_SRV';
location = /post {
    content_by_lua_block {
        local wb = require "resty.workerbus"
        local ok, err = wb.post(ngx.unescape_uri(ngx.var.arg_c), ngx.unescape_uri(ngx.var.arg_p or ""))
        ngx.say(ok, " ", err)
    }
}
location = /postn {
    content_by_lua_block {
        local wb = require "resty.workerbus"
        for i = 1, tonumber(ngx.var.arg_n) do
            local ok, err = wb.post(ngx.var.arg_c, tostring(i))
            if not ok then ngx.say("post ", i, ": ", err) return end
        end
        ngx.say("posted")
    }
}
location = /wait {
    content_by_lua_block {
        local wb = require "resty.workerbus"
        local c = ngx.unescape_uri(ngx.var.arg_c)
        ngx.shared.got:incr("waiting:" .. c, 1, 0)
        local p, o = wb.wait(c, tonumber(ngx.var.arg_t))
        ngx.shared.got:incr("waiting:" .. c, -1)
        ngx.say(p, "|", o)
    }
}
location = /got {
    content_by_lua_block {
        local got = ngx.shared.got
        local out = {}
        for _, k in ipairs(got:get_keys(0)) do
            if k:sub(1, 4) == "sub:" then
                out[k:sub(5)] = got:llen(k)
            end
        end
        ngx.say(require("cjson").encode(out))
    }
}
location = /drain {
    content_by_lua_block {
        -- the list of one worker's payloads, joined by commas
        local got = ngx.shared.got
        local k = "sub:" .. ngx.var.arg_pid
        local t = {}
        while true do
            local v = got:lpop(k)
            if v == nil then break end
            t[#t + 1] = v
        end
        ngx.say(table.concat(t, ","))
    }
}
location = /waiting { content_by_lua_block { ngx.say(ngx.shared.got:get("waiting:" .. ngx.var.arg_c) or 0) } }
location = /origin { content_by_lua_block { ngx.say(ngx.shared.got:get("origin:" .. ngx.var.arg_pid)) } }
location = /hostile {
    content_by_lua_block {
        local wb = require "resty.workerbus"
        local cases = {
            { "", "x" }, { string.rep("c", 64), "x" }, { "a\0b", "x" }, { "\255\254", "x" },
            { "ok", "a\0b" }, { "ok", "\255" }, { "ok", string.rep("p", 8001) },
            { "workerbus_events", "x" }, { 42, "x" }, { "ok", 42 },
        }
        for _, c in ipairs(cases) do
            local ok, err = wb.post(c[1], c[2])
            ngx.say(ok, " ", err)
        end
        local ok, err = wb.wait("", 0.1)
        ngx.say("wait: ", ok, " ", err)
        ok, err = wb.subscribe(string.rep("c", 64), function() end)
        ngx.say("subscribe: ", ok, " ", err)
    }
}
location = /stream {
    content_by_lua_block {
        local c, n, gap = ngx.var.arg_c, tonumber(ngx.var.arg_n), tonumber(ngx.var.arg_gap)
        local function run()
            local wb = require "resty.workerbus"
            for i = 1, n do
                local ok, err = wb.post(c, tostring(i))
                if not ok then ngx.log(ngx.ERR, "stream post ", i, ": ", err) end
                ngx.sleep(gap)
            end
            ngx.shared.got:set("done:" .. c, true)
        end
        ngx.say(ngx.timer.at(0, run))
    }
}
location = /flag { content_by_lua_block { ngx.say(tostring(ngx.shared.got:get(ngx.var.arg_k))) } }
location = /fill {
    content_by_lua_block {
        local wb = require "resty.workerbus"
        local big = string.rep("f", 7900)
        for i = 1, 100000 do
            local ok, err = wb.post(ngx.var.arg_c, big)
            if not ok then ngx.say(i - 1, " posted, then: ", err) return end
        end
        ngx.say("never full")
    }
}
location = /big { content_by_lua_block { ngx.say(require("resty.workerbus").post(ngx.var.arg_c, string.rep("b", 7900))) } }
EOF_SRV
}

# The node's status "postgres" section.
sub pgst { my $s = node_status($_[0]); $s ? $s->{postgres} : undef }
sub listening {
    my ($n, $ch) = @_;
    my $p = pgst($n) or return 0;
    return scalar grep { $_->{name} eq $ch && $_->{state} eq "listening" } @{ $p->{channels} };
}
sub bg_get {
    my ($n, $path) = @_;
    pipe(my $r, my $w) or die;
    my $pid = fork // die;
    if (!$pid) { close $r; print $w (node_get($n, $path) // "FAILED"); close $w; POSIX::_exit(0); }
    close $w;
    return sub { my $out = do { local $/; <$r> }; waitpid($pid, 0); $out };
}

END {
    my $rc = $?;
    stop_node($_) for @nodes;
    for my $s (@servers) {
        pg_stop($s);
        remove_tree($s->{dir}) unless $ENV{PGNODES_KEEP};
    }
    $? = $rc;
}

1;
