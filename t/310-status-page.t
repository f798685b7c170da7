# vim:set ft= ts=4 sw=4 et:
# The live status page in a real browser: headless Chromium loads it from
# workerbus_status, the rendered DOM lists every live worker, a kill -9'd
# worker shows as crashed within 2 s, events/s and the sparkline move, and
# the page loads nothing but itself and its JSON. A screenshot is kept in
# build/status-page.png. curl and JSON clients still get JSON.

use strict;
use warnings;
use Test::More;
use File::Path qw(make_path);
use JSON::PP qw(decode_json);
use Time::HiRes qw(time);
use Workerbus::Nginx;
use Workerbus::Chromium;

my $ng = Workerbus::Nginx->start(
    workers => 4,
    http_config => <<'EOF',
    init_worker_by_lua_block {
        local ev = require "resty.worker.events"
        assert(ev.configure { shm = "workerbus", interval = 1 })
        if ngx.worker.id() == 0 then
            -- a steady trickle of events, for the rates and the sparkline
            assert(ngx.timer.every(0.1, function()
                for i = 1, 20 do ev.post("test", "tick", i) end
            end))
        end
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
    skip "chromium not installed (Debian package chromium; make deps installs it)", 8
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
done_testing;
