"""Channel.from_fd: adopting an inherited socket fd, and refusing anything else."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from fdchannel import Channel

CHILD = textwrap.dedent(
    """
    import os, sys
    from fdchannel import Channel

    with Channel.from_fd(int(sys.argv[1])) as ch:
        ch.settimeout(10)
        assert not os.get_inheritable(ch.fileno())
        with ch.recv() as msg:
            os.write(msg.fds[0].fileno(), b"child " + msg.payload)
        ch.send(b"done")
    """
)


def test_child_adopts_an_inherited_end() -> None:
    parent, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        with Channel(parent) as ch:
            ch.settimeout(10)
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
            theirs.close()
            ch.send(b"wrote this", fds=[w])
            assert ch.recv().payload == b"done"
            assert proc.wait(10) == 0
        assert os.read(r, 100) == b"child wrote this"
    finally:
        theirs.close()
        os.close(r)
        os.close(w)


def test_pipe_is_refused_and_stays_the_callers() -> None:
    r, w = os.pipe()
    with pytest.raises(OSError, match=r"not a socket|Socket operation"):
        Channel.from_fd(r)
    os.write(w, b"x")  # still open, still ours
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.close(w)


def test_unconnected_socket_is_refused_and_stays_the_callers() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError) as info:
            Channel.from_fd(s.fileno())
        assert info.value.errno == errno.ENOTCONN
        os.fstat(s.fileno())  # still open, still ours


def test_datagram_socket_is_refused_and_stays_the_callers() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        with pytest.raises(ValueError, match="SOCK_STREAM"):
            Channel.from_fd(a.fileno())
        os.fstat(a.fileno())


def test_adopted_fd_becomes_non_inheritable_and_owned() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    os.set_inheritable(a.fileno(), True)
    fd = a.detach()
    with b, Channel.from_fd(fd) as ch:
        assert ch.fileno() == fd
        assert not os.get_inheritable(fd)
    with pytest.raises(OSError) as info:
        os.fstat(fd)  # closed with the channel
    assert info.value.errno == errno.EBADF
