# The Perl IO::FDPass reference of `python -m fdchannel bench`.
#   perl fdpass.pl MODE COUNT   prints the seconds the workload took
# MODE: local1 (one process: send 1 fd, receive it, close it) or stream1
# (the same, sender and receiver in two processes).
use strict;
use warnings;
use IO::FDPass;
use Socket;
use POSIX ();
use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC);

my ($mode, $count) = @ARGV;
socketpair(my $a, my $b, AF_UNIX, SOCK_STREAM, 0) or die "socketpair: $!";
open(my $null, "<", "/dev/null") or die "open: $!";
my $fd = fileno $null;
my ($af, $bf) = (fileno $a, fileno $b);
my $elapsed;
if ($mode eq "local1") {
    my $start = clock_gettime(CLOCK_MONOTONIC);
    for (1 .. $count) {
        IO::FDPass::send($af, $fd) or die "send: $!";
        my $got = IO::FDPass::recv($bf);
        $got >= 0 or die "recv: $!";
        POSIX::close($got);
    }
    $elapsed = clock_gettime(CLOCK_MONOTONIC) - $start;
} elsif ($mode eq "stream1") {
    pipe(my $ready_r, my $ready_w) or die "pipe: $!";
    my $pid = fork() // die "fork: $!";
    if (!$pid) {
        close $a;
        syswrite($ready_w, "r", 1);
        for (1 .. $count) {
            my $got = IO::FDPass::recv($bf);
            $got >= 0 or POSIX::_exit(1);
            POSIX::close($got);
        }
        POSIX::_exit(0);
    }
    close $b;
    sysread($ready_r, my $c, 1) or die "read: $!";
    my $start = clock_gettime(CLOCK_MONOTONIC);
    for (1 .. $count) {
        IO::FDPass::send($af, $fd) or die "send: $!";
    }
    waitpid($pid, 0);
    $? == 0 or die "receiver failed";
    $elapsed = clock_gettime(CLOCK_MONOTONIC) - $start;
} else {
    die "unknown mode $mode";
}
printf "%.9f\n", $elapsed;
