# vim:set ft=perl ts=4 sw=4 et:
# resty.sync's bridge channel (syncer:trigger_on): two nodes whose source is
# a PostgreSQL table, read by the version callback, with a 60 s interval. A
# workerbus_post() from SQL in the transaction that changed the table
# triggers the runner of both nodes, and every worker of both sees the new
# version; a plain pg_notify with an empty payload triggers every task; a
# post from nginx (resty.workerbus post) too; a payload that names no tag is
# logged and ignored. Skipped when PostgreSQL does not answer. No latency is
# asserted (bench/sync_run measures it): every wait is a deadline loop.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use PgNodes;

my $pg = eval { shared_pg() };
plan skip_all => "PostgreSQL does not answer (neither 127.0.0.1:5432 nor a private server): $@" unless $pg;

my $conn = "host=$pg->{host} port=$pg->{port} user=$pg->{user} dbname=$pg->{db} sslmode=disable";
my $url = "postgresql://$pg->{user}\@$pg->{host}:$pg->{port}/$pg->{db}?sslmode=disable";
my $tag = "t502_$$";
my $table = "${tag}_src";
my $ch = "${tag}_sync";
my $psql = pg_bin("psql");
$psql = "/usr/bin/psql" unless $psql =~ m{/};

ok(psql_ok($conn, "create table $table (tag text primary key, v text not null); "
                . "insert into $table values ('a', 'v1'), ('b', 'v1')"), "the source table");

# Every worker: tasks a and b read their version from the table (psql, so
# no Lua PostgreSQL client is needed), on_update records "upd:<tag>:<v>:<pid>".
my $http = <<"EOF_HTTP";
init_worker_by_lua_block {
    local sync = require "resty.sync"
    local got = ngx.shared.got
    local function version(tag)
        local f = io.popen("$psql -X -w -q -A -t -d '$conn' -c \\"select v from $table where tag = '" .. tag .. "'\\" 2>&1")
        local out = f:read("*a")
        f:close()
        out = out:gsub("%s+\$", "")
        return out ~= "" and out or nil
    end
    local s = assert(sync.new(60, "wb"))
    for _, tag in ipairs({ "a", "b" }) do
        assert(s:register(function(mode)
            local v = version(tag)
            if mode == sync.ACTION_VERSION then
                got:incr("checks:" .. tag, 1, 0)
                return v
            end
            return v and "data of " .. v
        end, tag))
        assert(s:on_update(tag, function(data, v)
            got:set("upd:" .. tag .. ":" .. v .. ":" .. ngx.worker.pid(), data)
        end))
    end
    assert(s:trigger_on("$ch"))
    assert(s:start())
    SYNCER = s
}
EOF_HTTP

my $server = <<'EOF_SRV' . bus_server();
location = /seen {
    content_by_lua_block {
        -- how many workers' on_update saw version v of tag t with its data
        local prefix = "upd:" .. ngx.var.arg_t .. ":" .. ngx.var.arg_v .. ":"
        local n = 0
        for _, k in ipairs(ngx.shared.got:get_keys(0)) do
            if k:sub(1, #prefix) == prefix and ngx.shared.got:get(k) == "data of " .. ngx.var.arg_v then
                n = n + 1
            end
        end
        ngx.say(n)
    }
}
location = /checks { content_by_lua_block { ngx.say(ngx.shared.got:get("checks:" .. ngx.var.arg_t) or 0) } }
EOF_SRV

my $main = "workerbus_zone wb 4m; workerbus_postgres \"$url\" backoff_min=50ms backoff_max=2s durable=on;";
my $A = start_node(name => "sa", offset => 0, main => $main, http => $http, server => $server);
my $B = start_node(name => "sb", offset => 1, main => $main, http => $http, server => $server);
for my $n ($A, $B) {
    ok(wait_until(20, sub { my $p = pgst($n); $p && $p->{state} eq "connected" }), "node $n->{name} connects");
    ok(wait_until(20, sub { listening($n, $ch) }), "node $n->{name} listens to the sync channel");
}

sub seen_everywhere {
    my ($t, $v) = @_;
    return wait_until(20, sub {
        (node_get($A, "/seen?t=$t&v=$v") // "") eq "2\n" && (node_get($B, "/seen?t=$t&v=$v") // "") eq "2\n";
    });
}

# The runners' first fetch (in init_worker) is done.
for my $n ($A, $B) {
    ok(wait_until(20, sub { (node_get($n, "/checks?t=a") // "") eq "1\n" && (node_get($n, "/checks?t=b") // "") eq "1\n" }),
       "node $n->{name} fetched a and b once");
}

# 1. The transaction that changes the data posts the tag.
my $b_checks = node_get($A, "/checks?t=b") . node_get($B, "/checks?t=b");
ok(psql_ok($conn, "begin; update $table set v = 'v2' where tag = 'a'; "
                . "select workerbus_post('$ch', 'a'); commit"), "update + workerbus_post in one transaction");
ok(seen_everywhere("a", "v2"), "every worker of both nodes sees a = v2 (interval 60 s)");
is(node_get($A, "/checks?t=b") . node_get($B, "/checks?t=b"), $b_checks, "task b was not run");

# 2. A plain pg_notify with an empty payload: every task.
ok(psql_ok($conn, "begin; update $table set v = 'v3'; select pg_notify('$ch', ''); commit"),
   "update + pg_notify with an empty payload");
ok(seen_everywhere("a", "v3") && seen_everywhere("b", "v3"), "every worker of both nodes sees a and b = v3");

# 3. A post from nginx (resty.workerbus post, from node B).
ok(psql_ok($conn, "update $table set v = 'v4' where tag = 'b'"), "b changed without a post");
is(node_get($B, "/post?c=$ch&p=b"), "true nil\n", "post the tag from node B");
ok(seen_everywhere("b", "v4"), "every worker of both nodes sees b = v4");

# 4. A payload that names no tag: logged by each node's runner, ignored.
ok(psql_ok($conn, "select pg_notify('$ch', 'zz')"), "pg_notify naming no tag");
for my $n ($A, $B) {
    ok(wait_until(20, sub { node_log($n) =~ /sync "wb#1": a post on channel "\Q$ch\E" names no tag of it: "zz"; ignored/ }),
       "node $n->{name} logs the unknown tag");
}
for my $n ($A, $B) {
    unlike(node_log($n), qr/\[(error|crit|alert|emerg)\]/, "node $n->{name}: no error logged");
}

stop_node($_) for $A, $B;
psql($conn, "drop table $table");
done_testing();
