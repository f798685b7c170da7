# vim:set ft=perl ts=4 sw=4 et:
# The module without Lua (any nginx the module is built for, Lua or not):
# it loads, lays out its zones, tracks the workers' lifecycle, serves its
# status and metrics, and counts a reload as a new generation. Nothing here
# needs lua-nginx-module, so this suite also runs against the second nginx
# CI builds (make test-other-nginx).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Workerbus::Nginx;

my $ng = Workerbus::Nginx->start(
    workers => 2,
    main_config => "workerbus_zone a 1m;\nworkerbus_zone b 512k;\nworkerbus_heartbeat 200ms;",
    config => "location = /metrics { workerbus_metrics; }",
);
my $st = $ng->status;
is(join(",", map { "$_->{name}:$_->{size}" } @{ $st->{zones} }), "a:1048576,b:524288", "zones laid out in declaration order");
ok(!grep({ $_->{used} + $_->{free} != $_->{size} } @{ $st->{zones} }), "each zone's used + free is its size");
is($st->{node}{master_pid}, $ng->master_pid, "the status names this node's master");
my @running = grep { $_->{state} eq "running" } @{ $st->{workers} };
is(scalar @running, 2, "both workers are tracked as running");
is($st->{current_generation}, 1, "first generation");
is($st->{postgres}, undef, "no bridge without workerbus_postgres");

my ($code, undef, $body) = $ng->request("GET", "/metrics");
is($code, 200, "metrics answer");
like($body, qr/^workerbus_generation 1$/m, "metrics carry the generation");
like($body, qr/^# TYPE workerbus_worker_crashes_total counter$/m, "metrics are typed") or diag $body;

# A killed worker is seen as crashed, and its respawn runs.
my $victim = $running[0]{pid};
kill "KILL", $victim;
ok(Workerbus::Nginx::wait_for(10, sub {
    my $s = $ng->status;
    (grep { $_->{pid} == $victim && $_->{state} eq "crashed" } @{ $s->{workers} }) && $s->{crashes_seen} >= 1
        && 2 == grep { $_->{state} eq "running" } @{ $s->{workers} };
}), "a killed worker is reported crashed and a new one runs");

# A reload is generation 2, its workers run, the old ones exit.
kill "HUP", $ng->master_pid;
ok(Workerbus::Nginx::wait_for(15, sub {
    my $s = eval { $ng->status } or return 0;
    $s->{current_generation} == 2
        && 2 == grep { $_->{state} eq "running" && $_->{generation} == 2 } @{ $s->{workers} };
}), "a reload makes generation 2 with its workers running");
my $log = $ng->error_log;
unlike($log, qr/\[(alert|emerg)\].*workerbus/, "no alert or emerg from the module");

done_testing();
