"""`fdchannel.fdpass`: IO::FDPass's wire, checked against the real Perl module."""

from __future__ import annotations

import sys

import pytest

if sys.platform == "win32":
    pytest.skip(
        "fdchannel.fdpass's POSIX wire: needs SCM_RIGHTS over AF_UNIX sockets, the Perl module "
        "IO::FDPass, fork and resource limits, which Windows lacks (the Win32 flavour is "
        "test_transport_windows_sim.py's)",
        allow_module_level=True,
    )

import errno
import os
import resource
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from fdchannel import fdpass

from ._proc import run_child

TIMEOUT = 30


def _perl_available() -> bool:
    try:
        done = subprocess.run(
            ["perl", "-MIO::FDPass", "-e", "1"], check=False, capture_output=True, timeout=TIMEOUT
        )
    except FileNotFoundError:
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def perl() -> None:
    if _perl_available():
        return
    why = "the interop tests need the Perl module IO::FDPass: apt-get install libio-fdpass-perl"
    # CI installs it, so there a missing module fails: a skipped interop
    # test proves nothing.  Elsewhere the README's test command must still
    # run on a fresh machine, so the skip names what to install.
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    with a, b:
        yield a, b


def run_perl(script: str, sock: socket.socket, *args: str) -> str:
    """Run *script* with IO::FDPass loaded and *sock*'s fd as its first argument."""
    done = subprocess.run(
        ["perl", "-MIO::FDPass", "-e", script, str(sock.fileno()), *args],
        pass_fds=[sock.fileno()],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- interoperability ---------------------------------------------------------------

PERL_SENDS_PIPES = r"""
my $sock = shift;
for my $i (1 .. 3) {
    pipe(my $r, my $w) or die "pipe: $!";
    syswrite($w, "pipe $i from perl $$\n") or die "write: $!";
    close $w;
    IO::FDPass::send($sock, fileno $r) or die "send: $!";
}
print "$$\n";
"""


@pytest.mark.usefixtures("perl")
@pytest.mark.parametrize("as_int", [False, True], ids=["socket", "int"])
def test_perl_sends_python_receives(pair: tuple[socket.socket, socket.socket], as_int: bool) -> None:
    ours, theirs = pair
    perl_pid = run_perl(PERL_SENDS_PIPES, theirs).strip()
    for i in (1, 2, 3):
        # The sender has exited: in-flight fds outlive it.
        fd = fdpass.recv(ours.fileno() if as_int else ours)
        try:
            assert not os.get_inheritable(fd)
            assert read_all(fd) == f"pipe {i} from perl {perl_pid}\n".encode()
        finally:
            os.close(fd)
    theirs.close()
    with pytest.raises(EOFError):
        fdpass.recv(ours)


PERL_RECEIVES_AND_WRITES = r"""
my $sock = shift;
for my $i (1 .. 3) {
    my $fd = IO::FDPass::recv($sock);
    $fd >= 0 or die "recv: $!";
    open(my $fh, ">&=", $fd) or die "open: $!";
    print $fh "perl wrote $i\n";
    close $fh;
}
"""


@pytest.mark.usefixtures("perl")
@pytest.mark.parametrize("as_int", [False, True], ids=["socket", "int"])
def test_python_sends_perl_receives(pair: tuple[socket.socket, socket.socket], as_int: bool) -> None:
    ours, theirs = pair
    readers = []
    try:
        for _ in range(3):
            r, w = os.pipe()
            readers.append(r)
            try:
                fdpass.send(ours.fileno() if as_int else ours, w)
            finally:
                os.close(w)  # allowed at once: the kernel holds the in-flight one
        run_perl(PERL_RECEIVES_AND_WRITES, theirs)
        for i, r in enumerate(readers, 1):
            assert read_all(r) == f"perl wrote {i}\n".encode()
    finally:
        for r in readers:
            os.close(r)


PERL_ECHOES_FD = r"""
my $sock = shift;
my $fd = IO::FDPass::recv($sock);
$fd >= 0 or die "recv: $!";
IO::FDPass::send($sock, $fd) or die "send: $!";
"""


@pytest.mark.usefixtures("perl")
def test_round_trip_through_perl(pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    ours, theirs = pair
    path = tmp_path / "f"
    with open(path, "w+b") as f:
        f.write(b"same open file description")
        f.flush()
        fdpass.send(ours, f)
        run_perl(PERL_ECHOES_FD, theirs)
        fd = fdpass.recv(ours)
        try:
            # The same open file: its offset is shared.
            assert os.lseek(fd, 0, os.SEEK_CUR) == f.tell()
            assert os.pread(fd, 4, 0) == b"same"
        finally:
            os.close(fd)


# -- the wire, byte for byte ------------------------------------------------------


def test_send_writes_one_nul_byte_with_one_fd(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    r, w = os.pipe()
    try:
        fdpass.send(ours, r)
        msg, fds, flags, _ = socket.recv_fds(theirs, 16, 4)
        try:
            assert msg == b"\0"
            assert len(fds) == 1
            assert flags == 0
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_extra_fds_are_closed_first_is_kept(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    pipes = [os.pipe() for _ in range(3)]
    try:
        socket.send_fds(theirs, [b"\0"], [r for r, _ in pipes])
        fd = fdpass.recv(ours)
        try:
            assert os.path.sameopenfile(fd, pipes[0][0])
        finally:
            os.close(fd)
        # The leak fixture proves the other two were closed.
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


# -- errors ---------------------------------------------------------------------------


def test_eof_is_eoferror(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.close()
    with pytest.raises(EOFError):
        fdpass.recv(ours)


def test_byte_without_fd_is_ebadmsg(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(b"\0")
    with pytest.raises(OSError, match="without an fd") as info:
        fdpass.recv(ours)
    assert info.value.errno == errno.EBADMSG


def test_non_nul_byte_is_ebadmsg_and_fd_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    r, w = os.pipe()
    try:
        socket.send_fds(theirs, [b"x"], [r])
        with pytest.raises(OSError, match="NUL") as info:
            fdpass.recv(ours)
        assert info.value.errno == errno.EBADMSG
    finally:
        os.close(r)
        os.close(w)


def test_nonblocking_recv_and_send_raise_blockingioerror(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    ours.setblocking(False)
    with pytest.raises(BlockingIOError):
        fdpass.recv(ours)
    # Fill the socket buffer, then one more fd does not fit.
    r, w = os.pipe()
    try:
        with pytest.raises(BlockingIOError):
            while True:
                ours.send(b"x" * 65536)
        with pytest.raises(BlockingIOError):
            fdpass.send(ours, r)
    finally:
        os.close(r)
        os.close(w)


def test_nonblocking_int_fd_is_left_as_it_was(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    ours.setblocking(False)
    with pytest.raises(BlockingIOError):
        fdpass.recv(ours.fileno())
    assert os.get_blocking(ours.fileno()) is False
    ours.setblocking(True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    try:
        _, theirs = pair
        theirs.close()
        with pytest.raises(EOFError):
            fdpass.recv(ours.fileno())
        # The default timeout did not make our blocking fd non-blocking.
        assert os.get_blocking(ours.fileno()) is True
    finally:
        socket.setdefaulttimeout(old)


def test_timeout_of_socket_object_applies(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    ours.settimeout(0.05)
    with pytest.raises(TimeoutError):
        fdpass.recv(ours)


def test_bad_arguments(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="non-socket") as info:
            fdpass.send(r, w)
        assert info.value.errno == errno.ENOTSOCK
        with pytest.raises(OSError, match="non-socket") as info:
            fdpass.recv(r)
        assert info.value.errno == errno.ENOTSOCK
        with pytest.raises(TypeError):
            fdpass.send(ours, "not an fd")
        os.close(w)
        with pytest.raises(OSError, match="Bad file descriptor") as info:
            fdpass.send(ours, w)  # closed fd
        assert info.value.errno == errno.EBADF
    finally:
        os.close(r)


def test_send_to_vanished_peer_is_brokenpipe_not_sigpipe() -> None:
    def body() -> None:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # what embedders restore
        a, b = socket.socketpair()
        with a:
            b.close()
            try:
                fdpass.send(a, 0)
            except BrokenPipeError:
                return
            raise AssertionError("no BrokenPipeError")

    run_child(body)


def _fill_fd_table() -> list[int]:
    """Lower RLIMIT_NOFILE to what is open and fill every gap below it."""
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    fillers = []
    with pytest.raises(OSError, match="Too many open files"):
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    return fillers


def test_truncated_control_message_is_emsgsize_and_closes_what_arrived(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    r, w = os.pipe()
    try:
        socket.send_fds(theirs, [b"\0"], [r])  # no room for it at all
        socket.send_fds(theirs, [b"\0"], [r, w])  # room for one of two

        def body() -> None:
            fillers = _fill_fd_table()
            with pytest.raises(OSError, match="MSG_CTRUNC") as info:
                fdpass.recv(ours)
            assert info.value.errno == errno.EMSGSIZE
            os.close(fillers.pop())
            with pytest.raises(OSError, match="MSG_CTRUNC") as info:
                fdpass.recv(ours)
            assert info.value.errno == errno.EMSGSIZE
            # The one fd that did arrive was closed: its slot is free again.
            os.close(os.open("/dev/null", os.O_RDONLY))

        run_child(body)
    finally:
        os.close(r)
        os.close(w)
