"""What docs/ownership.md and the handoff recipe say about passed fds, checked for real.

A passed fd names the same open file as the sender's: the offset and the
status flags (O_NONBLOCK included, which a socket timeout sets) are shared,
and a Python file object's unflushed buffer stays in the sender.  Shutting
a passed listening socket down stops it in every process, closing one copy
does not.  Each check runs across a real fork.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import tempfile
from collections.abc import Callable

import pytest

from fdchannel import Channel

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the checks fork: Windows has no os.fork()")

TIMEOUT = 30.0


def fork_child(ours: Channel, theirs: Channel, body: Callable[[Channel], None]) -> int:
    """Run *body* with *theirs* in a forked child; return its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 1
        try:
            theirs.close_other()  # in the child: keep this end only
            theirs.settimeout(TIMEOUT)
            body(theirs)
            code = 0
        finally:
            os._exit(code)
    ours.close_other()
    return pid


def join(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def in_child(ours: Channel, theirs: Channel, body: Callable[[Channel], None]) -> None:
    """Run *body* with *theirs* in a forked child; fail if the child does not exit 0."""
    join(fork_child(ours, theirs, body))


@pytest.fixture
def channels() -> tuple[Channel, Channel]:
    a, b = Channel.pair()
    a.settimeout(TIMEOUT)
    return a, b


def test_a_sent_file_shares_its_offset_with_the_sender(channels: tuple[Channel, Channel]) -> None:
    parent, child = channels

    def read_five(ch: Channel) -> None:
        with ch.recv() as msg, msg.fds[0].open("rb", buffering=0) as f:
            ch.send(f.read(5))

    with parent, tempfile.TemporaryFile() as f:
        f.write(b"0123456789")
        f.flush()
        f.seek(0)
        parent.send(b"", fds=[f])
        in_child(parent, child, read_five)
        with parent.recv() as answer:
            assert answer.payload == b"01234"
        # The child's read moved this process's offset too.
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 5
        f.seek(0, os.SEEK_CUR)  # drop the file object's idea of where it is
        assert f.read() == b"56789"


def test_the_unflushed_buffer_stays_in_the_sender(channels: tuple[Channel, Channel]) -> None:
    parent, child = channels

    def read_all(ch: Channel) -> None:
        with ch.recv() as msg, msg.fds[0].open("rb", buffering=0) as f:
            f.seek(0)
            ch.send(f.read())

    with parent, tempfile.TemporaryFile() as f:
        f.write(b"flushed ")
        f.flush()
        f.write(b"buffered")  # still in this process's buffer
        parent.send(b"", fds=[f])
        in_child(parent, child, read_all)
        with parent.recv() as answer:
            assert answer.payload == b"flushed "


def test_a_socket_timeout_arrives_as_a_non_blocking_open_file(channels: tuple[Channel, Channel]) -> None:
    parent, child = channels

    def report_flag(ch: Channel) -> None:
        with ch.recv() as msg:
            fd = msg.fds[0].fileno()
            ch.send(b"blocking" if os.get_blocking(fd) else b"non-blocking")
            os.set_blocking(fd, True)  # changes the sender's copy too
            ch.send(b"set")

    with parent, socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5.0)  # Python makes the fd non-blocking for this
        parent.send(b"", fds=[listener])
        in_child(parent, child, report_flag)
        with parent.recv() as first, parent.recv() as second:
            assert first.payload == b"non-blocking"
            assert second.payload == b"set"
        assert os.get_blocking(listener.fileno())  # the flag is the open file's


def successor(then: Callable[[socket.socket], bytes]) -> Callable[[Channel], None]:
    """A child that takes the listening socket, says so, waits for a go and reports *then*."""

    def body(ch: Channel) -> None:
        with ch.recv() as msg, msg.fds[0].socket() as listening:
            listening.settimeout(TIMEOUT)
            ch.send(b"ready")
            ch.recv()
            ch.send(then(listening))

    return body


def accept_one(listening: socket.socket) -> bytes:
    conn, _ = listening.accept()
    conn.close()
    return b"accepted"


def accept_fails(listening: socket.socket) -> bytes:
    try:
        listening.accept()[0].close()
    except OSError as exc:
        return f"errno {exc.errno}".encode()
    return b"accepted"


def test_closing_the_old_copy_of_a_listening_socket_leaves_it_listening(
    channels: tuple[Channel, Channel],
) -> None:
    parent, child = channels
    with parent:
        old = socket.create_server(("127.0.0.1", 0))
        port = old.getsockname()[1]
        with old:
            parent.send(b"", fds=[old])
        pid = fork_child(parent, child, successor(accept_one))
        assert parent.recv().payload == b"ready"
        parent.send(b"go")  # our copy is closed
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            assert parent.recv().payload == b"accepted"
    join(pid)


@pytest.mark.skipif(sys.platform != "linux", reason="what shutdown() of a listening socket does is Linux's")
def test_shutdown_of_the_old_copy_stops_the_successors_accept(channels: tuple[Channel, Channel]) -> None:
    parent, child = channels
    with parent, socket.create_server(("127.0.0.1", 0)) as old:
        parent.send(b"", fds=[old])
        pid = fork_child(parent, child, successor(accept_fails))
        assert parent.recv().payload == b"ready"
        old.shutdown(socket.SHUT_RDWR)
        parent.send(b"go")
        assert parent.recv().payload == f"errno {errno.EINVAL}".encode()
    join(pid)
