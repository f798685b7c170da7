# vim:set ft=perl ts=4 sw=4 et:
# resty.workerbus.mlcache: lua-resty-mlcache's `ipc` on the workerbus event
# bus, tested against mlcache's ipc contract with an mlcache-shaped stand-in
# (mlcache is not packaged here): per-worker L1 (a Lua table), L2 (a
# lua_shared_dict, keys namespaced name .. key), set/delete/purge
# broadcasting on mlcache's channels, get reading L1 then L2, update calling
# ipc.poll. Real nginx nodes with 4 (and 2) workers; a worker is addressed
# by its pid: the server listens with reuseport, so connections spread over
# the workers, and any worker but the one asked for answers "other" at once.
# Every wait is a deadline loop on what a worker reports.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use PgNodes;

my $BASE = $ENV{TEST_NGINX_PORT} || 1984;

# The stand-in, as mlcache 2.x uses its ipc option: new() checks the table
# and calls register_listeners(self.events); set/delete broadcast the key
# on "mlcache:invalidations:<name>", purge "" on "mlcache:purge:<name>";
# update(timeout) calls ipc.poll(timeout). The handlers count their calls
# per worker in the "got" dict.
my $standin = <<'EOF_LUA';
local M = {}
local mt = { __index = M }
function M.new(name, shm, opts)
    local ipc = opts.ipc
    if type(ipc) ~= "table" then error("opts.ipc must be a table", 2) end
    if type(ipc.register_listeners) ~= "function" then error("opts.ipc.register_listeners must be a function", 2) end
    if type(ipc.broadcast) ~= "function" then error("opts.ipc.broadcast must be a function", 2) end
    if ipc.poll ~= nil and type(ipc.poll) ~= "function" then error("opts.ipc.poll must be a function", 2) end
    local self = setmetatable({ name = name, dict = ngx.shared[shm], l1 = {},
                                broadcast = ipc.broadcast, poll = ipc.poll }, mt)
    local got = ngx.shared.got
    self.events = {
        invalidation = {
            channel = "mlcache:invalidations:" .. name,
            handler = function(key)
                got:incr("inv:" .. ngx.worker.pid(), 1, 0)
                self.l1[key] = nil
            end,
        },
        purge = {
            channel = "mlcache:purge:" .. name,
            handler = function()
                got:incr("purge:" .. ngx.worker.pid(), 1, 0)
                self.l1 = {}
            end,
        },
    }
    local ok, err = ipc.register_listeners(self.events)
    if not ok and err ~= nil then
        return nil, "failed to initialize custom IPC (opts.ipc.register_listeners returned an error): " .. err
    end
    return self
end
function M:get(key)
    local v = self.l1[key]
    if v ~= nil then return v, nil, 1 end
    v = self.dict:get(self.name .. key)
    if v ~= nil then
        self.l1[key] = v
        return v, nil, 2
    end
    return nil, nil, 3   -- mlcache would run the L3 callback here
end
function M:set(key, value)
    self.dict:set(self.name .. key, value)
    self.l1[key] = value
    local _, err = self.broadcast(self.events.invalidation.channel, key)
    if err then return nil, "could not broadcast update: " .. err end
    return true
end
function M:delete(key)
    self.dict:delete(self.name .. key)
    self.l1[key] = nil
    local _, err = self.broadcast(self.events.invalidation.channel, key)
    if err then return nil, "could not broadcast deletion: " .. err end
    return true
end
function M:purge()
    self.dict:flush_all()
    self.l1 = {}
    local _, err = self.broadcast(self.events.purge.channel, "")
    if err then return nil, "could not broadcast purge: " .. err end
    return true
end
function M:update(timeout)
    if not self.poll then error("no polling configured, specify opts.ipc_shm or opts.ipc.poll", 2) end
    local _, err = self.poll(timeout)
    if err then return nil, "could not poll ipc events: " .. err end
    return true
end
return M
EOF_LUA

sub http_for {
    my (%o) = @_;
    my $port = $BASE + $o{offset};
    return <<"EOF_HTTP";
lua_shared_dict cache 1m;
init_by_lua_block {
    package.loaded["t.mlcache"] = (function() $standin end)()
    -- made in the master: whether the bridge runs is not known yet there
    package.loaded.t_early = require("resty.workerbus.mlcache").ipc { cluster = true, shm = "cache" }
}
init_worker_by_lua_block {
    local ev = require "resty.worker.events"
    assert(ev.configure { shm = "ev", interval = $o{interval} })
    -- counts what arrives from PostgreSQL (pid 0), before the ipc's own handlers see it
    ev.register(function(_, _, _, pid)
        if pid == 0 then ngx.shared.got:incr("echo:" .. ngx.worker.pid(), 1, 0) end
    end, "workerbus.mlcache")
    local ipc = require("resty.workerbus.mlcache").ipc($o{ipc})
    package.loaded.t_cache = assert(require("t.mlcache").new("users", "cache", { ipc = ipc }))
}
server {
    listen 127.0.0.1:$port reuseport;
    server_name mlcache.test;
    location = /status { workerbus_status; }
    location = /w {
        content_by_lua_block {
            local me = ngx.worker.pid()
            local pid = tonumber(ngx.var.arg_pid)
            if pid and pid ~= me then return ngx.say("other") end
            local c = package.loaded.t_cache
            local got = ngx.shared.got
            local op, k = ngx.var.arg_op, ngx.var.arg_k
            if op == "get" then
                local v, _, lvl = c:get(k)
                ngx.say(v, "|", lvl)
            elseif op == "l1" then        -- this worker's L1 entry, without get() or update()
                local v = c.l1[k]
                ngx.say(v == nil and "absent" or v)
            elseif op == "l1n" then
                local n = 0
                for _ in pairs(c.l1) do n = n + 1 end
                ngx.say(n)
            elseif op == "l2" then
                ngx.say(ngx.shared.cache:get("users" .. k))
            elseif op == "seed" then      -- the node's L2, as an earlier fetch left it
                ngx.say((ngx.shared.cache:set("users" .. k, ngx.var.arg_v)))
            elseif op == "set" then
                ngx.say(c:set(k, ngx.var.arg_v or string.rep("x", tonumber(ngx.var.arg_n))))
            elseif op == "setbig" then
                ngx.say(c:set(string.rep("k", tonumber(ngx.var.arg_n)), "v"))
            elseif op == "delete" then
                ngx.say(c:delete(k))
            elseif op == "purge" then
                ngx.say(c:purge())
            elseif op == "update" then    -- update(), then get()
                local ok, err = c:update()
                local v, _, lvl = c:get(k)
                ngx.say(ok, " ", err, "|", v, "|", lvl)
            elseif op == "forge" then     -- a cluster event on the ipc's source that no node sent
                ngx.say(require("resty.worker.events").post_cluster("workerbus.mlcache",
                        "mlcache:invalidations:users", ngx.var.arg_d))
            elseif op == "counts" then
                ngx.say(got:get("inv:" .. me) or 0, " ", got:get("purge:" .. me) or 0, " ",
                        got:get("echo:" .. me) or 0)
            end
        }
    }
    location = /bad {
        content_by_lua_block {
            local m = require "resty.workerbus.mlcache"
            local function try(f)
                local ok, err = pcall(f)
                if ok then return ngx.say("no error") end
                local where, msg = tostring(err):match("^(.-:%d+): (.*)\$")
                if where and where:find("content_by_lua", 1, true) then
                    ngx.say("caller: ", msg)
                else
                    ngx.say("elsewhere: ", err)
                end
            end
            for _, o in ipairs {
                "x", 1, true,
                { cluster = "yes" }, { cluster = 1 },
                { source = 1 }, { source = "" },
                { clustre = true }, { [1] = true },
                { shm = 1 }, { shm = "nope" }, { shm_miss = false }, { shm = "cache", shm_miss = "nope" },
                { cluster = true },
                { cluster = true, shm = "cache" },
            } do
                try(function() local r = m.ipc(o) return r end)
            end
            local ipc = m.ipc()
            ngx.say(ipc.register_listeners(nil))
            ngx.say(ipc.register_listeners { x = 1 })
            ngx.say(ipc.register_listeners { x = { handler = function() end } })
            ngx.say(ipc.register_listeners { [2] = { channel = "", handler = function() end } })
            ngx.say(ipc.register_listeners { x = { channel = "c" } })
            try(function() local r = ipc.broadcast(1, "x") return r end)
            try(function() local r = ipc.broadcast("", "x") return r end)
            try(function() local r = ipc.broadcast("c", nil) return r end)
            try(function() local r = ipc.broadcast("c", {}) return r end)
            try(function() local r = ipc.poll("1") return r end)
            ngx.say(ipc.poll(), " ", ipc.poll(0.5))
            local early = package.loaded.t_early
            ngx.say(early.register_listeners { x = { channel = "c", handler = function() end } })
            ngx.say(early.broadcast("c", "k"))
            local cache, err = require("t.mlcache").new("early", "cache", { ipc = early })
            ngx.say(cache and "created" or "nil" .. err)
        }
    }
}
EOF_HTTP
}

sub start_cache_node {
    my (%o) = @_;
    my $n = start_node(name => $o{name}, offset => $o{offset}, workers => $o{workers},
        main => "workerbus_zone ev 4m;\n" . ($o{main} // ""), http => http_for(%o));
    my @pids;
    wait_until(20, sub {
        my $st = node_status($n) or return 0;
        @pids = map { $_->{pid} } grep { $_->{state} eq "running" } @{ $st->{workers} };
        @pids == $o{workers};
    });
    is(scalar @pids, $o{workers}, "node $o{name}: $o{workers} workers");
    $n->{pids} = [ sort { $a <=> $b } @pids ];
    return $n;
}

# The answer of worker $pid to /w?op=...
sub on {
    my ($n, $pid, $q) = @_;
    my $r;
    wait_until(30, sub { $r = node_get($n, "/w?$q&pid=$pid"); defined $r && $r ne "other\n" });
    chomp(my $out = $r // "FAILED");
    return $out;
}
sub any { my ($n, $q) = @_; my $r = node_get($n, "/w?$q") // "FAILED"; chomp $r; $r }
sub eventually {
    my ($n, $pid, $q, $want, $name) = @_;
    my $got;
    wait_until(15, sub { $got = on($n, $pid, $q); $got eq $want });
    is($got, $want, $name);
}
sub fill_l1 {
    my ($n, $k, $want) = @_;
    for my $pid (@{ $n->{pids} }) {
        my $r = on($n, $pid, "op=get&k=$k");
        like($r, qr/^\Q$want\E\|[12]$/, "$n->{name} worker $pid caches $k=$want");
        is(on($n, $pid, "op=l1&k=$k"), $want, "$n->{name} worker $pid: $k in L1");
    }
}

# ---- one node, 4 workers, the bus's background poller ----------------------
my $M = start_cache_node(name => "mlc", offset => 0, workers => 4, interval => 1, ipc => "");
my ($A, @others) = @{ $M->{pids} };

# 1. a set() in worker A reaches every other worker's L1, no update() called
is(any($M, "op=seed&k=u1&v=old"), "true", "L2 holds u1=old");
fill_l1($M, "u1", "old");
is(on($M, $A, "op=set&k=u1&v=new"), "true", "worker A sets u1=new");
for my $pid (@others) {
    eventually($M, $pid, "op=l1&k=u1", "absent", "worker $pid: u1 left its L1 with no update() called");
}
for my $pid (@others) {
    is(on($M, $pid, "op=get&k=u1"), "new|2", "worker $pid: get() reads new from L2");
    is(on($M, $pid, "op=counts"), "1 0 0", "worker $pid: its invalidation handler ran once");
}
# A does not get its own broadcast (as with mlcache's shm ipc): even after
# update() drained everything pending, its handler never ran and its L1
# still holds what set() put there.
is(on($M, $A, "op=update&k=u1"), "true nil|new|1", "worker A: update(), u1 still in its L1");
is(on($M, $A, "op=counts"), "0 0 0", "worker A: its own broadcast was not handled by it");

# delete() the same way
is(on($M, $others[0], "op=delete&k=u1"), "true", "worker B deletes u1");
for my $pid ($A, @others[1 .. $#others]) {
    eventually($M, $pid, "op=l1&k=u1", "absent", "worker $pid: u1 left its L1 after the delete");
    is(on($M, $pid, "op=get&k=u1"), "nil|3", "worker $pid: u1 is gone from L2 too");
}

# 2. read-your-writes: after A's set() returned, B's update() then get() sees it
for my $i (1 .. 20) {
    my $B = $others[$i % @others];
    on($M, $B, "op=get&k=ryw");    # B may hold the previous value in L1
    is(on($M, $A, "op=set&k=ryw&v=v$i"), "true", "round $i: A sets ryw=v$i") or last;
    like(on($M, $B, "op=update&k=ryw"), qr/^true nil\|v$i\|[12]$/, "round $i: B's update() then get() sees v$i");
}

# 3. purge() reaches every worker
is(any($M, "op=seed&k=p1&v=a"), "true", "L2 holds p1");
is(any($M, "op=seed&k=p2&v=b"), "true", "L2 holds p2");
fill_l1($M, "p1", "a");
fill_l1($M, "p2", "b");
is(on($M, $others[1], "op=purge"), "true", "worker C purges");
for my $pid ($A, $others[0], @others[2 .. $#others]) {
    eventually($M, $pid, "op=l1n", "0", "worker $pid: L1 empty after the purge");
    is(on($M, $pid, "op=get&k=p1"), "nil|3", "worker $pid: p1 gone from L2");
    like(on($M, $pid, "op=counts"), qr/^\d+ 1 0$/, "worker $pid: its purge handler ran once");
}
like(on($M, $others[1], "op=counts"), qr/^\d+ 0 0$/, "worker C: did not handle its own purge");

# 4. bad input, and 5. cluster = true without workerbus_postgres
my $bad_local = <<'EOF';
caller: opts must be a table, got string
caller: opts must be a table, got number
caller: opts must be a table, got boolean
caller: opts.cluster must be a boolean, got string
caller: opts.cluster must be a boolean, got number
caller: opts.source must be a string, got number
caller: opts.source must not be empty
caller: unknown option opts.clustre (known: cluster, source, shm, shm_miss)
caller: unknown option [1] (known: cluster, source, shm, shm_miss)
caller: opts.shm must be a string, got number
caller: opts.shm: no such lua_shared_dict: nope
caller: opts.shm_miss must be a string, got boolean
caller: opts.shm_miss: no such lua_shared_dict: nope
caller: opts.shm is required with opts.cluster = true: the lua_shared_dict of the mlcache instances (their L2), which broadcasts from other nodes must clear too
EOF
my $bad_calls = <<'EOF';
nilevents must be a table, got nil
nilevents["x"] must be a table, got number
nilevents["x"].channel must be a non-empty string, got nil
nilevents[2].channel must be a non-empty string, got ""
nilevents["x"].handler must be a function, got nil
caller: channel must be a non-empty string, got number
caller: channel must be a non-empty string, got ""
caller: data must be a string, got nil
caller: data must be a string, got table
caller: timeout must be a number, got string
true true
EOF
my $nobridge = "opts.cluster is true but the PostgreSQL bridge is not configured (no workerbus_postgres directive in nginx.conf)";
is(node_get($M, "/bad"), $bad_local
   . "caller: $nobridge\n"
   . $bad_calls
   . "nil$nobridge\nnil$nobridge\n"
   . "nilfailed to initialize custom IPC (opts.ipc.register_listeners returned an error): $nobridge\n",
   "bad options and arguments: exact errors; cluster = true without the bridge");

my @bad = grep { /\[(error|alert|crit|emerg)\]/ } split /\n/, node_log($M);
is(scalar @bad, 0, "mlc: no errors in the log") or diag join("\n", @bad[0 .. ($#bad < 5 ? $#bad : 5)]);
stop_node($M);

# ---- no background poller (interval = 0): update() alone drains ------------
my $Z = start_cache_node(name => "mlc0", offset => 0, workers => 2, interval => 0, ipc => "");
my ($ZA, $ZB) = @{ $Z->{pids} };
is(any($Z, "op=seed&k=z&v=old"), "true", "mlc0: L2 holds z=old");
fill_l1($Z, "z", "old");
is(on($Z, $ZA, "op=set&k=z&v=new"), "true", "mlc0: A sets z=new");
is(on($Z, $ZB, "op=get&k=z"), "old|1", "mlc0: without a poller, B still has the old value in L1 (nothing polled)");
is(on($Z, $ZB, "op=update&k=z"), "true nil|new|2", "mlc0: B's update() handles the invalidation at once, get() reads new");
is(on($Z, $ZB, "op=counts"), "1 0 0", "mlc0: B handled it once");
stop_node($Z);

# ---- two nodes through PostgreSQL (cluster = true) --------------------------
my $pg = shared_pg();
my $url = "postgresql://$pg->{user}\@$pg->{host}:$pg->{port}/$pg->{db}?sslmode=disable";
my $main = "workerbus_postgres \"$url\" backoff_min=50ms;";
my %c = (workers => 2, interval => 1, ipc => '{ cluster = true, shm = "cache" }', main => $main);
my $NA = start_cache_node(name => "mlca", offset => 0, %c);
my $NB = start_cache_node(name => "mlcb", offset => 1, %c);
for my $n ($NA, $NB) {
    ok(wait_until(30, sub { listening($n, "workerbus_events") }), "$n->{name} listens to the cluster events channel");
}
my ($A1, $A2) = @{ $NA->{pids} };
my ($B1, $B2) = @{ $NB->{pids} };
for my $n ($NA, $NB) {
    is(any($n, "op=seed&k=c1&v=old"), "true", "$n->{name}: L2 holds c1=old");
    fill_l1($n, "c1", "old");
}
is(on($NA, $A1, "op=set&k=c1&v=new"), "true", "node A, worker A1 sets c1=new");
# node B: both workers drop c1 from L1, and node B's L2 no longer holds the
# old value (else the next get() would put it back in L1)
for my $pid ($B1, $B2) {
    eventually($NB, $pid, "op=l1&k=c1", "absent", "node B worker $pid: c1 left its L1");
    is(on($NB, $pid, "op=get&k=c1"), "nil|3", "node B worker $pid: c1 gone from node B's L2 (the L3 callback would run)");
}
# node A: A2 got it through the ring at once; the copy back from PostgreSQL
# is ignored on node A (A2's handler ran once, after that copy arrived)
eventually($NA, $A2, "op=counts", "1 0 1", "node A worker A2: handled once, the PostgreSQL copy arrived and was ignored");
eventually($NA, $A1, "op=counts", "0 0 1", "node A worker A1: never handled its own broadcast");
is(on($NA, $A2, "op=get&k=c1"), "new|2", "node A worker A2 reads new from node A's L2");
is(on($NA, $A1, "op=l1&k=c1"), "new", "node A worker A1 keeps new in its L1");
for my $pid ($B1, $B2) {
    is(on($NB, $pid, "op=counts"), "1 0 1", "node B worker $pid: handled it once");
}

# purge across nodes
is(any($NB, "op=seed&k=c2&v=x"), "true", "node B: L2 holds c2");
fill_l1($NB, "c2", "x");
is(on($NA, $A2, "op=purge"), "true", "node A worker A2 purges");
for my $pid ($B1, $B2) {
    eventually($NB, $pid, "op=l1n", "0", "node B worker $pid: L1 empty");
    is(on($NB, $pid, "op=l2&k=c2"), "nil", "node B worker $pid: node B's L2 flushed");
}
eventually($NA, $A1, "op=counts", "0 1 2", "node A worker A1: handled A2's purge once (PostgreSQL copy ignored)");

# an event too large for PostgreSQL: this node's workers have it, the error says so
# (the size counts this node's id, whose pid and start time vary in length)
like(on($NA, $A1, "op=setbig&n=8000"),
   qr/^nilcould not broadcast update: not sent to the other nodes \(this node's workers have it\): event too large \(80\d\d bytes, max 7900\)$/,
   "node A: a key too large for the bridge");
# the ipc made in init_by_lua works once the bridge runs
my $bad_a = node_get($NA, "/bad") // "";
is($bad_a, $bad_local . "no error\n" . $bad_calls . "true\ntrue\ncreated\n",
   "node A: the same errors, and with the bridge cluster = true works, also for the ipc made in init_by_lua");

# cluster events on the ipc's source that no node sent are ignored, with a warning
is(any($NB, "op=seed&k=c3&v=kept"), "true", "node B: L2 holds c3");
fill_l1($NB, "c3", "kept");
is(any($NA, "op=forge&d=garbage"), "true", "node A posts a cluster event without a node id");
is(any($NA, "op=forge&d=9:c3"), "true", "node A posts a cluster event whose node id length is too long");
my $warn = qq{[warn]};
my $line = qq{workerbus: mlcache ipc: ignored a cluster event on channel "mlcache:invalidations:users" that no node sent (not <length>:<node><data>)};
my $count = sub { my $log = node_log($_[0]); scalar(() = $log =~ /\Q$warn\E.*\Q$line\E/g) };
ok(wait_until(15, sub { $count->($NB) == 4 }), "node B: both workers warned about both") or diag node_log($NB);
for my $pid ($B1, $B2) {
    is(on($NB, $pid, "op=l1&k=c3"), "kept", "node B worker $pid: c3 still in L1");
}

for my $n ($NA, $NB) {
    my @bad = grep { /\[(error|alert|crit|emerg)\]/ } split /\n/, node_log($n);
    is(scalar @bad, 0, "$n->{name}: no errors in the log") or diag join("\n", @bad[0 .. ($#bad < 5 ? $#bad : 5)]);
}

done_testing();
