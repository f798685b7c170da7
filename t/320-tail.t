# vim:set ft= ts=4 sw=4 et:
# resty.workerbus.tail(): the bus as Server-Sent Events. A reader sees the
# posted events in order with their metadata (payload only when configured),
# every worker still gets every event, and a client that does not read is
# cut off with a clear message instead of the worker queueing for it.
# Streams stay open while events are posted, so this drives nginx from
# outside (t/lib/Workerbus/Nginx.pm).

use strict;
use warnings;
use Test::More;
use IO::Select;
use JSON::PP qw(decode_json);
use Socket qw(PF_INET SOCK_STREAM SOL_SOCKET SO_RCVBUF pack_sockaddr_in inet_aton);
use Time::HiRes qw(time);
use Workerbus::Nginx;

my $ng = Workerbus::Nginx->start(
    workers => 4,
    # A small send buffer, so that a client that stops reading blocks the stream soon.
    listen_opts => "sndbuf=16k",
    http_config => <<'EOF',
    lua_shared_dict counts 1m;
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        ev.register(function()
            ngx.shared.counts:incr("w" .. ngx.worker.id(), 1, 0)
        end, "test", "tick")
        assert(ev.configure { shm = "workerbus", interval = 1 })
    }
EOF
    config => <<'EOF',
        location = /tail { content_by_lua_block {
            local ok, err = require("resty.workerbus").tail { payload = true }
            if not ok then ngx.say(err) end
        } }
        location = /tail-private { content_by_lua_block {
            local ok, err = require("resty.workerbus").tail()
            if not ok then ngx.say(err) end
        } }
        location = /tail-small { content_by_lua_block {
            local ok, err = require("resty.workerbus").tail { payload = true, max_pending = 50 }
            if not ok then ngx.say(err) end
        } }
        location = /tail-bad { content_by_lua_block {
            local ok, err = require("resty.workerbus").tail { max_pending = 0 }
            ngx.say(ok, " ", err)
            ok, err = require("resty.workerbus").tail { payload = "yes" }
            ngx.say(ok, " ", err)
            ok, err = require("resty.workerbus").tail { zone = "nope" }
            ngx.say(ok, " ", err)
        } }
        location = /post { content_by_lua_block {
            local ev = require "resty.worker.events"
            local pad = string.rep("x", tonumber(ngx.var.arg_size or 0))
            for i = 1, tonumber(ngx.var.arg_n) do
                assert(ev.post("test", "tick", i .. ":" .. pad))
            end
            ngx.say("posted")
        } }
        location = /counts { content_by_lua_block {
            local c = ngx.shared.counts
            local t = {}
            for id = 0, 3 do t[#t + 1] = c:get("w" .. id) or 0 end
            ngx.say(table.concat(t, " "))
        } }
EOF
);

# A raw client of the stream: connect (with a receive buffer of $rcvbuf when
# given), send the request, and read the response head.
sub open_stream {
    my ($path, $rcvbuf) = @_;
    socket(my $s, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
    setsockopt($s, SOL_SOCKET, SO_RCVBUF, $rcvbuf) or die "setsockopt: $!" if $rcvbuf;
    connect($s, pack_sockaddr_in(Workerbus::Nginx::port(), inet_aton("127.0.0.1"))) or die "connect: $!";
    syswrite($s, "GET $path HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    my $st = { sock => $s, buf => "" };
    read_until($st, sub { $st->{buf} =~ /\r\n\r\n/ }, 10) or die "no response head from $path";
    ($st->{head}, $st->{buf}) = split /\r\n\r\n/, $st->{buf}, 2;
    return $st;
}

# Reads into $st->{buf} until $cond is true, EOF, or $secs pass.
sub read_until {
    my ($st, $cond, $secs) = @_;
    my $deadline = time + $secs;
    my $sel = IO::Select->new($st->{sock});
    until ($cond->()) {
        my $left = $deadline - time;
        return 0 if $left <= 0 || $st->{eof};
        next unless $sel->can_read($left);
        my $n = sysread($st->{sock}, my $chunk, 65536);
        $st->{eof} = 1, next unless $n;
        $st->{buf} .= $chunk;
    }
    return 1;
}

# The chunked body's SSE frames so far: [{ id, event, data }], comments skipped.
sub frames {
    my ($st) = @_;
    my $body = $st->{buf};
    # Undo chunked encoding (HTTP/1.1 streams are chunked).
    my $plain = "";
    while ($body =~ /\G([0-9a-fA-F]+)\r\n/gc) {
        my $len = hex $1;
        last if $len == 0;
        my $start = pos $body;
        last if length($body) < $start + $len + 2;
        $plain .= substr($body, $start, $len);
        pos($body) = $start + $len + 2;
    }
    my @f;
    for my $block (split /\n\n/, $plain) {
        my %f;
        for (split /\n/, $block) {
            next if /^:/;
            my ($k, $v) = /^(\w+): ?(.*)$/ or next;
            $f{$k} = $v;
        }
        push @f, \%f if %f && exists $f{data};
    }
    return \@f;
}

sub ticks { [grep { !$_->{event} && $_->{data} =~ /"event":"tick"/ } @{ frames($_[0]) }] }

# --- bad options
is($ng->get("/tail-bad"), "nil tail: opts.max_pending must be a positive integer, not 0\n"
    . "nil tail: opts.payload must be a boolean\n"
    . qq(nil tail: no workerbus zone "nope" (zones: workerbus); declare it with "workerbus_zone nope <size>;"\n),
   "bad options: nil and the reason");

# --- a reader sees the posted events in order, with their metadata
my $t = open_stream("/tail");
like($t->{head}, qr{^HTTP/1\.1 200}, "tail answers 200");
like($t->{head}, qr{\r\nContent-Type: text/event-stream}i, "as text/event-stream");
read_until($t, sub { $t->{buf} =~ /retry: 3000/ }, 10);
like($t->{buf}, qr/: workerbus tail of zone "workerbus", worker \d+; payloads shown/, "a comment names the zone and says payloads are shown");

my $priv = open_stream("/tail-private");
read_until($priv, sub { $priv->{buf} =~ /retry: 3000/ }, 10);


my $c0 = $ng->get("/counts");
is($c0, "0 0 0 0\n", "no tick handled yet");
$ng->get("/post?n=300&size=10");
ok(read_until($t, sub { @{ ticks($t) } >= 300 }, 20), "the reader got all 300 events");
my @ticks = @{ ticks($t) };
my @data = map { decode_json($_->{data}) } @ticks;
is_deeply([map { $_->{payload} } @data[0 .. 299]], [map { "$_:xxxxxxxxxx" } 1 .. 300], "in the order they were posted");
my @seqs = map { $_->{seq} } @data;
is_deeply(\@seqs, [$seqs[0] .. $seqs[0] + 299], "with consecutive sequence numbers");
is_deeply([map { $_->{id} } @ticks[0 .. 299]], \@seqs, "each frame's id is its sequence number");
is_deeply([sort keys %{ $data[0] }], [qw(event payload pid seq size source unique)], "fields of a frame");
is($data[0]{size}, 12, "size is the payload's size in bytes");
like($data[0]{pid}, qr/^\d+$/, "the poster's pid");

ok(read_until($priv, sub { @{ ticks($priv) } >= 300 }, 20), "the private tail got them too");
my $p0 = decode_json(ticks($priv)->[0]{data});
ok(!exists $p0->{payload} && $p0->{size} == 12, "without payload unless configured");

ok(Workerbus::Nginx::wait_for(20, sub { $ng->get("/counts") eq "300 300 300 300\n" }),
   "every worker, the tailing ones too, handled every event");
close $t->{sock};
close $priv->{sock};

# --- a client that does not read is cut off, with a message; one that reads
# the same stream (same limit of 50 waiting events) is not
my $slow = open_stream("/tail-small", 4096);
my $fast = open_stream("/tail-small");
my ($posts, $cut) = (0, 0);
Workerbus::Nginx::wait_for(60, sub {
    $ng->get("/post?n=20&size=200");
    $posts++;
    read_until($fast, sub { @{ ticks($fast) } >= 20 * $posts }, 10);   # keeps up
    $cut = $ng->error_log =~ /workerbus tail: [\d.:]+ cutting off a slow client/;
});
ok($cut, "the worker cuts the client that does not read off, and logs it, while it still does not read ($posts x 20 events posted)");
ok(read_until($slow, sub { $slow->{eof} }, 30), "then, as it reads, its stream ends");
my @f = @{ frames($slow) };
my $last = $f[-1];
is($last->{event}, "cutoff", "its last frame is a cutoff event");
my $msg = decode_json($last->{data});
like($msg->{reason}, qr/^client too slow: more than 50 events were waiting to be sent; events from seq \d+ on were not sent and the stream ends here$/,
     "with a clear reason");
my @got = map { decode_json($_->{data})->{seq} } grep { !$_->{event} } @f;
ok(@got > 0 && @got < 20 * $posts, "it got some events (" . scalar(@got) . "), not all");
is_deeply(\@got, [$got[0] .. $got[0] + $#got], "in order, without a gap");
is($msg->{first_unsent_seq}, $got[-1] + 1, "the message says where the stream stopped");
ok(Workerbus::Nginx::wait_for(10, sub { $ng->error_log =~ /workerbus tail: [\d.:]+ ended: client too slow/ }), "the end is logged");

my @fast = @{ frames($fast) };
is(scalar(grep { ($_->{event} // "") eq "cutoff" } @fast), 0, "the client that reads is not cut off");
is(scalar @{ ticks($fast) }, 20 * $posts, "and got every event");
close $fast->{sock};
close $slow->{sock};

$ng->stop;

# --- no events API configured: the tail starts the worker's poller itself,
# and shows none of the events posted before the client connected, although
# this worker had not read them yet.
$ng = Workerbus::Nginx->start(
    workers => 1,
    config => <<'EOF',
        location = /tail { content_by_lua_block {
            local ok, err = require("resty.workerbus").tail { payload = true }
            if not ok then ngx.say(err) end
        } }
        location = /post-tables { content_by_lua_block {
            local core = require "resty.workerbus.events_core"
            local record = require "resty.workerbus.record"
            assert(core.attach())
            -- cjson gives this one back unchanged: it travels by string.buffer
            assert(core.post("raw", "exact", { name = "a", port = 8080, up = true, tags = { "x", "y" } }, nil, 0))
            -- this one it changes (its integer key becomes "1"): JSON
            assert(core.post("raw", "mixed", { 1, x = 2 }, nil, 0))
            assert(core.post("raw", "events", { name = "a" }, nil, record.FLAG_EVENTS))
            ngx.say("posted")
        } }
        location = /post-raw { content_by_lua_block {
            local core = require "resty.workerbus.events_core"   -- no poller is started
            assert(core.attach())
            for i = 1, tonumber(ngx.var.arg_n) do
                assert(core.post("raw", "ev", ngx.var.arg_tag .. i, nil, 0))
            end
            ngx.say("posted")
        } }
EOF
);
$ng->get("/post-raw?n=5&tag=before");
my $lag = $ng->status->{zones}[0]{events}{workers}[0]{lag};
is($lag, 5, "the worker has not read the 5 events posted before (lag 5)");
my $late = open_stream("/tail");
read_until($late, sub { $late->{buf} =~ /retry: 3000/ }, 10);
$ng->get("/post-raw?n=3&tag=after");
read_until($late, sub { @{ frames($late) } >= 3 }, 20);
ok(Workerbus::Nginx::wait_for(10, sub { $ng->status->{zones}[0]{events}{workers}[0]{lag} == 0 }),
   "the tail started the worker's poller (lag 0)");
read_until($late, sub { 0 }, 0.3);   # anything more that would arrive
is_deeply([map { decode_json($_->{data})->{payload} } @{ frames($late) }], [qw(after1 after2 after3)],
          "the client sees only the events posted after it connected");

# Tables: resty.worker.events' payloads show as the JSON text the original
# would have sent, whichever way they travelled; resty.events' in base64.
$ng->get("/post-tables");
read_until($late, sub { @{ frames($late) } >= 6 }, 20);
my @tf = map { decode_json($_->{data}) } @{ frames($late) }[3 .. 5];
is_deeply(decode_json($tf[0]{payload}), { name => "a", port => 8080, up => JSON::PP::true, tags => ["x", "y"] },
          "a table cjson gives back unchanged: its JSON text");
is_deeply(decode_json($tf[1]{payload}), { 1 => 1, x => 2 }, "a table cjson changes: the JSON sent");
ok(exists $tf[2]{payload_base64} && !exists $tf[2]{payload}, "a resty.events table: base64 of its string.buffer bytes");

# A graceful stop (QUIT) ends the stream with an "end" event, without waiting
# for the keep-alive period (15 s) to pass.
kill "QUIT", $ng->master_pid;
my $t_quit = time;
ok(read_until($late, sub { $late->{eof} }, 20), "QUIT: the stream ends");
cmp_ok(time - $t_quit, "<", 10, "... before the keep-alive period could have");
my $end = frames($late)->[-1];
is($end->{event}, "end", "with an end event");
is_deeply(decode_json($end->{data}), { reason => "the nginx worker is exiting" }, "saying why");
close $late->{sock};
$ng->stop;

# Called outside a content handler: nil and why.
$ng = Workerbus::Nginx->start(
    workers => 1,
    config => <<'EOF',
        location = /early {
            rewrite_by_lua_block {
                local ok, err = require("resty.workerbus").tail()
                ngx.say(ok, " ", err)
                ngx.exit(200)
            }
        }
EOF
);
is($ng->get("/early"), "nil tail: call it from a content handler (content_by_lua*), not in rewrite\n",
   "tail() in rewrite_by_lua: nil and the reason");
$ng->stop;

done_testing;
