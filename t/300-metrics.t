# vim:set ft= ts=4 sw=4 et:
# workerbus_metrics: Prometheus's own checker accepts the output, counters
# move with posted events, a kill -9'd worker shows up as a crash, and the
# figures are those of the JSON status. Drives nginx from outside (promtool
# reads the scrape), so it uses t/lib/Workerbus/Nginx.pm, not the block format.

use strict;
use warnings;
use Test::More;
use File::Temp qw(tempfile);
use Workerbus::Nginx;

my $promtool = $ENV{PROMTOOL} || "promtool";
my $have_promtool = system("$promtool --version >/dev/null 2>&1") == 0;

my $ng = Workerbus::Nginx->start(
    workers => 4,
    main_config => "workerbus_heartbeat 200ms;\nworkerbus_hang_timeout 2s;",
    http_config => <<'EOF',
    init_worker_by_lua_block {
        assert(require("resty.worker.events").configure { shm = "workerbus", interval = 1 })
    }
EOF
    config => <<'EOF',
        location = /metrics { workerbus_metrics; }
        location = /lua-metrics { content_by_lua_block { ngx.print(require("resty.workerbus").metrics()) } }
        location = /post {
            content_by_lua_block {
                local ev = require "resty.worker.events"
                for i = 1, tonumber(ngx.var.arg_n) do
                    assert(ev.post("test", "tick", i))
                end
                ngx.say("posted")
            }
        }
EOF
);

# name{labels} -> value, from one scrape.
sub samples {
    my ($text) = @_;
    my %s;
    for (split /\n/, $text) {
        next if /^#/ || !/\S/;
        my ($k, $v) = /^(\S+)\s+(\S+)$/ or die "bad sample line: $_";
        $s{$k} = $v;
    }
    return \%s;
}

sub scrape { samples(scalar $ng->get("/metrics")) }

my ($text, $hdr) = $ng->get("/metrics");
is($hdr->{"content-type"}, "text/plain; version=0.0.4; charset=utf-8", "content type of the 0.0.4 text format");
like($text, qr/^# HELP workerbus_ring_posted_total Events posted to the ring\.\n# TYPE workerbus_ring_posted_total counter\nworkerbus_ring_posted_total\{zone="workerbus"\} \d+\n/m,
     "a counter has HELP, TYPE and a zone label");

SKIP: {
    skip "promtool not installed (Debian package prometheus; make deps installs it)", 2 unless $have_promtool;
    my ($fh, $file) = tempfile(UNLINK => 1);
    print $fh $text;
    close $fh;
    my $out = `$promtool check metrics < $file 2>&1`;
    is($?, 0, "promtool check metrics accepts the scrape") or diag $out;
    is($out, "", "promtool has no lint remark") or diag $out;
}

# Labels only zone/slot/pid/generation; values never sequence numbers or names of events.
my @labels = map { /(\w+)="/g } grep { !/^#/ } split /\n/, $text;
my %names = map { $_ => 1 } @labels;
is_deeply([sort keys %names], [qw(generation pid slot zone)], "only zone, slot, pid and generation labels");

# The scrape and the JSON come from the same kind of snapshot: with nothing
# happening in between they agree.
my $st = $ng->status;
my $s = scrape();
is($s->{'workerbus_ring_posted_total{zone="workerbus"}'}, $st->{zones}[0]{events}{posted}, "posted agrees with the JSON");
is($s->{'workerbus_zone_size_bytes{zone="workerbus"}'}, $st->{zones}[0]{size}, "zone size agrees with the JSON");
my @pids = $ng->worker_pids;
is(scalar @pids, 4, "four running workers");
for my $w (grep { $_->{state} eq "running" } @{ $st->{workers} }) {
    my $l = qq(slot="$w->{slot}",pid="$w->{pid}",generation="$w->{generation}");
    is($s->{"workerbus_worker_state{$l}"}, 0, "worker $w->{pid} is running (0)");
}
is($s->{'workerbus_generation_live_workers{generation="1"}'}, 4, "4 live workers in generation 1");
is($s->{'workerbus_ring_overflow_mode{zone="workerbus"}'}, 0, "the ring refuses when full (default)");
is($s->{'workerbus_ring_refused_total{zone="workerbus"}'}, $st->{zones}[0]{events}{refused}, "refused agrees with the JSON");
is($s->{'workerbus_ring_idle_workers{zone="workerbus"}'}, scalar @{ $st->{zones}[0]{events}{idle_slots} },
   "idle workers: the number of idle slots in the JSON");

# Counters move after posting: exactly the events posted.
my $before = scrape();
$ng->get("/post?n=25");
my $k = 'workerbus_ring_posted_total{zone="workerbus"}';
is(scrape()->{$k} - $before->{$k}, 25, "posted_total went up by the 25 events posted");
my $delivered = sub {
    my $sc = shift;
    my $sum = 0;
    $sum += $sc->{$_} for grep { /^workerbus_worker_delivered_total\{/ } keys %$sc;
    $sum;
};
my $d0 = $delivered->($before);
ok(Workerbus::Nginx::wait_for(10, sub { $delivered->(scrape()) - $d0 >= 100 }),
   "delivered_total of the four workers went up by 4 x 25");

# kill -9 of a worker: the crash counter moves and the worker's state is crashed.
is(scrape()->{workerbus_worker_crashes_total}, 0, "no crash yet");
my $victim = $pids[1];
my ($vw) = grep { $_->{pid} == $victim } @{ $st->{workers} };
kill "KILL", $victim;
ok(Workerbus::Nginx::wait_for(10, sub { (scrape()->{workerbus_worker_crashes_total} // 0) == 1 }),
   "workerbus_worker_crashes_total is 1 after kill -9");
is(scrape()->{qq(workerbus_worker_state{slot="$vw->{slot}",pid="$victim",generation="1"})}, 3,
   "the killed worker's state is crashed (3)");
ok(Workerbus::Nginx::wait_for(10, sub { scrape()->{'workerbus_generation_live_workers{generation="1"}'} == 4 }),
   "its replacement brings generation 1 back to 4 live workers");

# A stopped worker is a hang: counted once, and its state comes back to
# running when it resumes. No request is made while it is stopped (it could
# be the one to accept it): the log says when the others have seen it.
is(scrape()->{workerbus_worker_hangs_total}, 0, "no hang yet");
my @now = $ng->worker_pids;
my $sleeper = $now[0];
my ($sw) = grep { $_->{pid} == $sleeper } @{ $ng->status->{workers} };
my $state_key = qq(workerbus_worker_state{slot="$sw->{slot}",pid="$sleeper",generation="1"});
kill "STOP", $sleeper;
my $hung = Workerbus::Nginx::wait_for(20, sub { $ng->error_log =~ /worker process $sleeper \(slot \d+, generation 1\) hung/ });
kill "CONT", $sleeper;
ok($hung, "a SIGSTOPped worker is reported hung");
is(scrape()->{workerbus_worker_hangs_total}, 1, "workerbus_worker_hangs_total is 1");
ok(Workerbus::Nginx::wait_for(10, sub { scrape()->{$state_key} == 0 }), "its state is running (0) again once it resumes");

SKIP: {
    skip "promtool not installed", 1 unless $have_promtool;
    my ($fh, $file) = tempfile(UNLINK => 1);
    print $fh scalar $ng->get("/metrics");
    close $fh;
    my $out = `$promtool check metrics < $file 2>&1`;
    is($?, 0, "promtool still accepts the scrape with a crashed worker in it") or diag $out;
}

my $lua = $ng->get("/lua-metrics");
like($lua, qr/^# HELP workerbus_generation .*\nworkerbus_generation 1\n/s, "resty.workerbus.metrics() gives the same text from Lua");
is(join(",", sort keys %{ samples($lua) }), join(",", sort keys %{ scrape() }), "... with the same series");

my ($code) = $ng->request("POST", "/metrics");
is($code, 405, "POST /metrics: 405");

$ng->stop;
my @alerts = grep { !/worker process $victim exited on signal 9/ } grep { /\[(alert|crit|emerg)\]/ } split /\n/, $ng->error_log;
is_deeply(\@alerts, [], "no alert in the error log but nginx's own for the killed worker");

# A directive with an argument is refused by nginx -t, naming it.
{
    my $bad = "$ng->{root}/conf/bad.conf";
    open my $fh, ">", $bad or die $!;
    my $mods = join "", map { "load_module $_;\n" } Workerbus::Nginx::modules();
    print $fh "$mods events {} http { server { listen 127.0.0.1:" . Workerbus::Nginx::port()
        . "; location / { workerbus_metrics on; } } }\n";
    close $fh;
    my $out = `${\Workerbus::Nginx::binary()} -t -c $bad 2>&1`;
    like($out, qr/invalid number of arguments in "workerbus_metrics" directive/, "nginx -t names workerbus_metrics");
}

done_testing;
