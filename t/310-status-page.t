# vim:set ft= ts=4 sw=4 et:
# The live status page in a real browser: headless Chromium loads it from
# workerbus_status, the rendered DOM lists every live worker, a kill -9'd
# worker shows as crashed within 2 s, events/s and the sparkline move, and
# the page loads nothing but itself and its JSON. The resty.sync panel
# shows each task's tag, version and failures; the PostgreSQL bridge panel
# (when 127.0.0.1:5432 serves trust logins to "test", else skipped) its
# state, channels and counters; a node with neither shows neither panel.
# A screenshot is kept in build/status-page.png. curl and JSON clients still get JSON.

use strict;
use warnings;
use Test::More;
use File::Path qw(make_path);
use JSON::PP qw(decode_json);
use Time::HiRes qw(time);
use Workerbus::Nginx;
use Workerbus::Chromium;

# Page text (an en dash for a missing value, say) in test names and diagnostics.
binmode(Test::More->builder->$_, ":encoding(UTF-8)") for qw(output failure_output todo_output);

# The bridge's part needs the developers' PostgreSQL (detected as
# t/lib/PgNodes.pm does); a prefix of its own keeps this node off the other
# suites' channels.
my $PG = "host=127.0.0.1 port=5432 user=postgres dbname=test sslmode=disable";
my $have_pg = do {
    local $ENV{PGCONNECT_TIMEOUT} = 3;
    system("psql -X -w -q -At -d '$PG' -c 'select 1' >/dev/null 2>&1") == 0;
};

my $ng = Workerbus::Nginx->start(
    workers => 4,
    main_config => $have_pg
        ? 'workerbus_postgres "postgresql://postgres@127.0.0.1:5432/test?sslmode=disable" durable=on prefix=wb310_;'
        : "",
    http_config => <<'EOF' . ($have_pg ? <<'EOF' : "") . "    }\n",
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        assert(ev.configure { shm = "workerbus", interval = 1 })
        if ngx.worker.id() == 0 then
            -- a steady trickle of events, for the rates and the sparkline
            assert(ngx.timer.every(0.1, function()
                for i = 1, 20 do ev.post("test", "tick", i) end
            end))
        end
        -- resty.sync: a task with a version and data, and one whose source fails
        local sync = require "resty.sync"
        local s = assert(sync.new(0.5, "workerbus"))
        assert(s:register(function(mode)
            if mode == sync.ACTION_VERSION then return "cfg-7" end
            return { page = "status", items = { 1, 2, 3 } }
        end, "page-config"))
        assert(s:register(function() error("source down") end, "broken-feed"))
        assert(s:start())
EOF
        require("resty.workerbus").subscribe("page_demo", function() end)
EOF
    config => <<'EOF',
        location = /pgpost {
            content_by_lua_block {
                local ok, err = require("resty.workerbus").post("page_demo", "hello")
                ngx.say(ok and "posted" or err)
            }
        }
EOF
);

# Content negotiation (no browser needed).
{
    my ($body, $hdr) = $ng->get("/status");
    is($hdr->{"content-type"}, "application/json", "no Accept (curl): JSON");
    ok(eval { decode_json($body) }, "... which parses");
    ($body, $hdr) = $ng->get("/status", Accept => "*/*");
    is($hdr->{"content-type"}, "application/json", "Accept: */*: JSON");
    ($body, $hdr) = $ng->get("/status", Accept => "application/json");
    is($hdr->{"content-type"}, "application/json", "Accept: application/json: JSON");
    ($body, $hdr) = $ng->get("/status", Accept => "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8");
    is($hdr->{"content-type"}, "text/html; charset=utf-8", "a browser's Accept: the page");
    like($body, qr/^<!DOCTYPE html>/, "... an HTML document");
    unlike($body, qr/(?:src|href)\s*=\s*["']?(?:https?:)?\/\//i, "... that links no external asset");
    ($body, $hdr) = $ng->get("/status", Accept => "application/json, text/html;q=0");
    is($hdr->{"content-type"}, "application/json", "text/html;q=0: JSON");
    ($body, $hdr) = $ng->get("/status?format=json", Accept => "text/html");
    is($hdr->{"content-type"}, "application/json", "?format=json wins over Accept");
    ($body, $hdr) = $ng->get("/status?format=html");
    is($hdr->{"content-type"}, "text/html; charset=utf-8", "?format=html wins over no Accept");
}

SKIP: {
    skip "chromium not installed (Debian package chromium; make deps installs it)", 21
        unless Workerbus::Chromium::available();

    my $br = Workerbus::Chromium->start(size => "1280,900");
    # A query argument of its own (a token, say) is kept when the page polls.
    my $url = "http://127.0.0.1:" . Workerbus::Nginx::port() . "/status?token=abc";
    $br->navigate($url);

    my $rows_js = q{JSON.stringify(Array.from(document.querySelectorAll("#workers tr.worker"))
                    .map(function (r) { return [Number(r.dataset.pid), r.dataset.state]; }))};
    my $rows = sub { decode_json($br->eval_js($rows_js) || "[]") };
    my $running = sub { [sort { $a <=> $b } map { $_->[0] } grep { $_->[1] eq "running" } @{ $rows->() }] };

    my @pids = $ng->worker_pids;
    my $shown = Workerbus::Nginx::wait_for(15, sub { my $r = $running->(); "@$r" eq "@pids" ? $r : undef });
    is("@{ $shown || $running->() }", "@pids", "the rendered page lists every live worker pid as running");

    my $rate = Workerbus::Nginx::wait_for(15, sub {
        my $t = $br->eval_js(q{document.getElementById("rate").textContent});
        ($t // "") =~ /^[\d,.]+$/ && $t =~ /[1-9]/ ? $t : undef;
    });
    ok($rate, "events/s is computed from successive snapshots (" . ($rate // "none") . ")");
    ok(Workerbus::Nginx::wait_for(15, sub { $br->eval_js(q{document.querySelectorAll("#spark polyline").length}) }),
       "the sparkline is drawn");
    my $mib = sprintf("%.1f", $ng->status->{zones}[0]{size} / 1048576);
    like($br->eval_js(q{document.querySelector("#zonelist .bar.mem em").textContent}),
         qr/^memory: [\d.]+ [KMG]?i?B of \Q$mib\E MiB \(\d+\.\d%\)$/, "zone memory is shown as a bar");

    # resty.sync: every task of the instance, as the runner published it.
    my $tasks_js = q{JSON.stringify(Array.from(document.querySelectorAll("#sync tr.task")).map(function (r) {
        return { tag: r.querySelector("td.tag").textContent, version: r.querySelector("td.version").textContent,
                 failures: r.querySelector("td.failures").textContent,
                 error: r.querySelector("td.last-error").textContent, failing: r.classList.contains("failing") };
    }))};
    my $tasks = sub { +{ map { $_->{tag} => $_ } @{ JSON::PP->new->decode($br->eval_js($tasks_js) || "[]") } } };
    my $synced = Workerbus::Nginx::wait_for(15, sub {
        my $t = $tasks->();
        $t->{"page-config"} && ($t->{"broken-feed"}{failures} // "") =~ /^[1-9]/ ? $t : undef;
    }) || $tasks->();
    ok(!$br->eval_js(q{document.getElementById("sync").hidden}), "the resty.sync panel is shown");
    is($synced->{"page-config"}{version}, "cfg-7", "... the task page-config with its version cfg-7");
    ok($synced->{"page-config"} && !$synced->{"page-config"}{failing}, "... not failing");
    like($synced->{"broken-feed"}{failures} // "", qr/^[1-9]/, "... the task broken-feed with its failures");
    like($synced->{"broken-feed"}{error} // "", qr/source down/, "... and its last error");
    ok($synced->{"broken-feed"}{failing}, "... marked as failing");
    my $runner = $ng->status->{zones}[0]{sync}[0]{runner_pid};
    like($br->eval_js(q{document.querySelector("#sync .runner").textContent}), qr/^runner pid \Q$runner\E\b/,
         "... and the instance's runner pid ($runner)");

    SKIP: {
        skip "PostgreSQL does not answer trust logins to db test on 127.0.0.1:5432: bridge panel not checked", 6
            unless $have_pg;
        my $pg_js = q{JSON.stringify({ hidden: document.getElementById("pg").hidden,
            state: (document.querySelector("#pg .pgstate") || {}).textContent,
            channels: Array.from(document.querySelectorAll("#pg tr.channel")).map(function (r) {
                return [r.querySelector("td.name").textContent, r.dataset.state]; }),
            inbound: (document.querySelector('#pg [data-field="notifications_in"]') || {}).textContent,
            horizon: (document.querySelector('#pg [data-field="horizon"]') || {}).textContent })};
        my $pgv = sub { JSON::PP->new->decode($br->eval_js($pg_js)) };
        my $listening = sub { grep { $_->[0] eq "page_demo" && $_->[1] eq "listening" } @{ $_[0]{channels} || [] } };
        my $v = Workerbus::Nginx::wait_for(15, sub {
            my $v = $pgv->();
            ($v->{state} // "") eq "connected" && $listening->($v) ? $v : undef;
        }) || $pgv->();
        ok(!$v->{hidden}, "the PostgreSQL bridge panel is shown");
        is($v->{state}, "connected", "... in state connected");
        ok($listening->($v), "... listening to the channel page_demo") or diag explain $v;
        like($v->{horizon} // "", qr/^\d/, "... with its durable horizon (" . ($v->{horizon} // "none") . ")");
        # A post goes out and comes back through PostgreSQL: the page counts it.
        is($ng->get("/pgpost"), "posted\n", "a post to page_demo");
        my $in = Workerbus::Nginx::wait_for(15, sub { my $t = $pgv->()->{inbound} // ""; $t =~ /^[1-9]/ ? $t : undef });
        ok($in, "... is counted in notifications in (" . ($in // "none") . ")");
    }

    # kill -9: the page must show the crash within 2 s.
    my $victim = $pids[2];
    kill "KILL", $victim;
    my $t0 = time;
    my $seen = Workerbus::Nginx::wait_for(10, sub {
        grep { $_->[0] == $victim && $_->[1] eq "crashed" } @{ $rows->() };
    });
    my $took = time - $t0;
    ok($seen, "the killed worker $victim is shown as crashed");
    cmp_ok($took, "<", 2, sprintf("... within 2 s of the kill (%.2f s)", $took));
    ok(Workerbus::Nginx::wait_for(10, sub { @{ $running->() } == 4 }), "its replacement is listed as running");

    my $root = Workerbus::Nginx::repo_root() . "/build";
    make_path($root);
    $br->screenshot("$root/status-page.png");
    note "screenshot: $root/status-page.png";

    # Everything came from the test nginx: the page and its JSON (and the
    # /favicon.ico that headless Chromium asks for by itself, whatever the page says).
    my $base = "http://127.0.0.1:" . Workerbus::Nginx::port();
    my @urls = grep { !/^data:/ } $br->requested_urls;
    my %paths = map { index($_, "$base/") == 0 ? (substr($_, length $base) => 1) : ($_ => 1) } @urls;
    delete $paths{"/favicon.ico"};
    is_deeply([sort keys %paths], ["/status?token=abc", "/status?token=abc&format=json"],
              "the page loaded nothing but itself and its JSON");
    $br->stop;
}

$ng->stop;

# A node without resty.sync and without the bridge: neither panel.
SKIP: {
    skip "chromium not installed", 3 unless Workerbus::Chromium::available();
    my $plain = Workerbus::Nginx->start(workers => 2);
    is($plain->status->{postgres}, undef, "a node without workerbus_postgres: postgres is null");
    my $br = Workerbus::Chromium->start(size => "1280,900");
    $br->navigate("http://127.0.0.1:" . Workerbus::Nginx::port() . "/status");
    ok(Workerbus::Nginx::wait_for(15, sub { $br->eval_js(q{document.querySelectorAll("#workers tr.worker").length}) >= 2 }),
       "... its page rendered");
    is($br->eval_js(q{[document.getElementById("sync").hidden, document.getElementById("pg").hidden].join()}),
       "true,true", "... without the resty.sync panel nor the bridge panel");
    $br->stop;
    $plain->stop;
}

done_testing;
