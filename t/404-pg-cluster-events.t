# vim:set ft=perl ts=4 sw=4 et:
# Cluster-wide worker events: resty.worker.events' post_cluster and
# resty.events' publish_cluster reach every worker of every node, with the
# handlers' usual signature.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use PgNodes;

my $pg = shared_pg();
my $url = "postgresql://$pg->{user}\@$pg->{host}:$pg->{port}/$pg->{db}?sslmode=disable";

my $http = <<'EOF_HTTP';
lua_shared_dict ev 1m;
init_by_lua_block {
    _G.rev = require("resty.events").new { listening = "unix:/tmp/unused.sock" }
}
init_worker_by_lua_block {
    local we = require "resty.worker.events"
    assert(we.configure { shm = "ev", interval = 1 })
    local cjson = require "cjson"
    we.register(function(data, event, source, pid)
        ngx.shared.got:rpush("we:" .. ngx.worker.pid(), cjson.encode { data = data, event = event, source = source, pid = pid or "nil" })
    end, "t404")
    _G.rev:subscribe("t404e", "*", function(data, event, source, wid)
        ngx.shared.got:rpush("ev:" .. ngx.worker.pid(), cjson.encode { data = data, event = event, source = source, wid = wid or "nil" })
    end)
    assert(_G.rev:init_worker())
}
EOF_HTTP
my $server = <<'EOF_SRV';
location = /post_cluster {
    content_by_lua_block {
        local we = require "resty.worker.events"
        ngx.say(we.post_cluster("t404", "changed", { key = "k1", n = 1 }))
        ngx.say(we.post_cluster("t404", "plain", "a string"))
        ngx.say(we.post_cluster("t404", "", "x"))
        ngx.say(_G.rev:publish_cluster("t404e", "updated", { list = { "a", "b" } }))
        ngx.say(_G.rev:publish_cluster("t404e", "big", string.rep("x", 8000)))
    }
}
location = /list {
    content_by_lua_block {
        local got = ngx.shared.got
        local k = ngx.var.arg_k .. ":" .. ngx.var.arg_pid
        local t = {}
        for i = 1, got:llen(k) or 0 do t[i] = got:lpop(k) end
        ngx.say(table.concat(t, "\n"))
    }
}
EOF_SRV

my $main = "workerbus_postgres \"$url\" backoff_min=50ms;";
my $A = start_node(name => "a", offset => 0, main => $main, http => $http, server => $server);
my $B = start_node(name => "b", offset => 1, main => $main, http => $http, server => $server);
for my $n ($A, $B) {
    ok(wait_until(30, sub { listening($n, "workerbus_events") }), "node $n->{name} listens to the cluster events channel");
}
is(node_get($B, "/post_cluster"), "true\ntrue\nnilevent must be a non-empty string\ntrue\n"
   . "nilfailed to publish event: event too large (8014 bytes, max 7900)\n", "posting from B: results and errors");

for my $n ($A, $B) {
    my @pids = map { $_->{pid} } grep { $_->{state} eq "running" } @{ node_status($n)->{workers} };
    is(scalar @pids, 2, "node $n->{name}: two workers");
    for my $pid (@pids) {
        my ($we, $ev) = ("", "");
        ok(wait_until(30, sub {
            $we .= node_get($n, "/list?k=we&pid=$pid");
            $ev .= node_get($n, "/list?k=ev&pid=$pid");
            (grep { /\S/ } split /\n/, $we) >= 2 && (grep { /\S/ } split /\n/, $ev) >= 1;
        }), "node $n->{name}, worker $pid: both kinds arrived");
        my @we = map { decode_json($_) } grep { /\S/ } split /\n/, $we;
        is_deeply(\@we, [ { data => { key => "k1", n => 1 }, event => "changed", source => "t404", pid => 0 },
                          { data => "a string", event => "plain", source => "t404", pid => 0 } ],
                  "node $n->{name}, worker $pid: resty.worker.events handler got (data, event, source, pid)");
        my @ev = map { decode_json($_) } grep { /\S/ } split /\n/, $ev;
        is_deeply(\@ev, [ { data => { list => [ "a", "b" ] }, event => "updated", source => "t404e", wid => "nil" } ],
                  "node $n->{name}, worker $pid: resty.events subscriber got (data, event, source, wid)");
    }
}

done_testing();
