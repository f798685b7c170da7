package Workerbus::Chromium;

# Headless Chromium driven through the DevTools protocol over a pipe
# (--remote-debugging-pipe: the browser reads NUL-terminated JSON commands
# on fd 3 and writes replies and events on fd 4), so no WebSocket client is
# needed. One page; evaluate JavaScript, take screenshots, see requests.

use strict;
use warnings;

use File::Temp qw(tempdir);
use IO::Handle;
use IO::Select;
use JSON::PP;
use MIME::Base64 qw(decode_base64);
use Fcntl qw(F_DUPFD);
use POSIX qw(:sys_wait_h);
use Scalar::Util ();
use Time::HiRes qw(time sleep);

our @FLAGS = qw(--headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking
                --disable-component-update --disable-sync);

sub binary { $ENV{CHROMIUM} || "chromium" }

sub available { system("command -v " . binary() . " >/dev/null 2>&1") == 0 }

our @RUNNING;
END { $_->stop for grep { defined } @RUNNING }

sub start {
    my ($class, %o) = @_;
    $SIG{PIPE} = "IGNORE";    # a browser that died is reported by the read, not by a signal
    my $dir = tempdir("wb-chromium-XXXXXX", TMPDIR => 1, CLEANUP => 1);
    pipe(my $to_r, my $to_w) or die "pipe: $!";
    pipe(my $from_r, my $from_w) or die "pipe: $!";
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        setpgrp(0, 0);
        # Out of the way first (a pipe may itself be fd 3 or 4), then into
        # place; dup2 leaves close-on-exec off on the new descriptors.
        my ($r, $w) = (POSIX::dup(fileno($to_r)), POSIX::dup(fileno($from_w)));
        ($r > 4 || ($r = POSIX::fcntl($r, F_DUPFD, 5))) && ($w > 4 || ($w = POSIX::fcntl($w, F_DUPFD, 5)))
            or POSIX::_exit(126);
        POSIX::dup2($r, 3) // POSIX::_exit(126);
        POSIX::dup2($w, 4) // POSIX::_exit(126);
        open STDOUT, ">", "$dir/chromium.log";
        open STDERR, ">&", \*STDOUT;
        { exec binary(), @FLAGS, "--user-data-dir=$dir/profile", "--remote-debugging-pipe",
             "--window-size=" . ($o{size} || "1280,900"), "about:blank" };
        POSIX::_exit(127);
    }
    close $to_r;
    close $from_w;
    $to_w->autoflush(1);
    my $self = bless { pid => $pid, w => $to_w, r => $from_r, buf => "", id => 0, events => [], dir => $dir,
                       json => JSON::PP->new->utf8->canonical }, $class;
    push @RUNNING, $self;
    Scalar::Util::weaken($RUNNING[-1]);
    my $t = $self->call("Target.createTarget", { url => "about:blank" });
    $self->{session} = $self->call("Target.attachToTarget", { targetId => $t->{targetId}, flatten => JSON::PP::true })
        ->{sessionId};
    $self->send_page("Page.enable");
    $self->send_page("Network.enable");
    return $self;
}

sub _read_message {
    my ($self, $deadline) = @_;
    while (1) {
        my $i = index($self->{buf}, "\0");
        if ($i >= 0) {
            my $msg = substr($self->{buf}, 0, $i);
            substr($self->{buf}, 0, $i + 1) = "";
            return $self->{json}->decode($msg);
        }
        my $left = $deadline - time;
        die "chromium: no answer in time\n" . $self->log_tail if $left <= 0;
        my $sel = IO::Select->new($self->{r});
        next unless $sel->can_read($left);
        my $n = sysread($self->{r}, my $chunk, 1 << 20);
        die "chromium exited\n" . $self->log_tail unless $n;
        $self->{buf} .= $chunk;
    }
}

sub log_tail {
    my ($self) = @_;
    my $f = "$self->{dir}/chromium.log";
    return -e $f ? `tail -20 $f` : "";
}

# Sends a command (to the page's session when $session) and returns its result.
sub _call {
    my ($self, $session, $method, $params, $timeout) = @_;
    my $id = ++$self->{id};
    my $msg = { id => $id, method => $method, params => $params || {} };
    $msg->{sessionId} = $self->{session} if $session;
    print { $self->{w} } $self->{json}->encode($msg) . "\0";
    my $deadline = time + ($timeout || 30);
    while (1) {
        my $m = $self->_read_message($deadline);
        if (defined $m->{id} && $m->{id} == $id) {
            die "chromium: $method failed: " . $self->{json}->encode($m->{error}) . "\n" if $m->{error};
            return $m->{result};
        }
        push @{ $self->{events} }, $m if $m->{method};
    }
}

sub call { my $s = shift; $s->_call(0, @_) }
sub send_page { my $s = shift; $s->_call(1, @_) }

sub navigate {
    my ($self, $url) = @_;
    my $r = $self->send_page("Page.navigate", { url => $url });
    die "chromium: navigation to $url failed: $r->{errorText}\n" if $r->{errorText};
    return $r;
}

# Value of a JavaScript expression in the page (JSON-compatible values).
sub eval_js {
    my ($self, $expr) = @_;
    my $r = $self->send_page("Runtime.evaluate", { expression => $expr, returnByValue => JSON::PP::true });
    die "chromium: exception in page: " . $self->{json}->encode($r->{exceptionDetails}) . "\n" if $r->{exceptionDetails};
    return $r->{result}{value};
}

sub screenshot {
    my ($self, $file) = @_;
    my $r = $self->send_page("Page.captureScreenshot", { format => "png" });
    open my $fh, ">:raw", $file or die "$file: $!";
    print $fh decode_base64($r->{data});
    close $fh;
}

# URLs of every request the page made so far.
sub requested_urls {
    my ($self) = @_;
    eval { $self->send_page("Runtime.evaluate", { expression => "1" }) };    # collect pending events
    return map { $_->{params}{request}{url} } grep { ($_->{method} // "") eq "Network.requestWillBeSent" } @{ $self->{events} };
}

sub stop {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;
    eval { $self->call("Browser.close", {}, 5) };
    my $deadline = time + 5;
    while (waitpid($pid, WNOHANG) != $pid) {
        if (time > $deadline) { kill "KILL", -$pid; waitpid($pid, 0); last }
        sleep 0.05;
    }
    kill "KILL", -$pid;    # helper processes left in its group, if any
}

sub DESTROY { $_[0]->stop }

1;
