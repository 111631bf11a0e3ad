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

from ._portable import wine_unbound_socket_quirk

CHILD = textwrap.dedent(
    """
    import os, socket, sys
    from fdchannel import Channel

    if sys.argv[1] == "share":  # Windows: a socket.share() blob on stdin
        fd = socket.fromshare(sys.stdin.buffer.read()).detach()
    else:
        fd = int(sys.argv[1])
    with Channel.from_fd(fd) as ch:
        ch.settimeout(10)
        assert not ch._sock.get_inheritable()  # a SOCKET on Windows: os.get_inheritable refuses it
        with ch.recv() as msg:
            os.write(msg.fds[0].fileno(), b"child " + msg.payload)
        ch.send(b"done")
    """
)


def _start_child_with(sock: socket.socket) -> subprocess.Popen[bytes]:
    """Start CHILD holding its own copy of *sock* (and nothing else of ours).

    POSIX: inherited through pass_fds.  Windows has no pass_fds, and a
    SOCKET does not survive handle inheritance everywhere (not under Wine,
    not with layered providers; spawn() avoids it too): the child gets a
    ``socket.share()`` blob instead, and adopts the number it makes of it.
    """
    if sys.platform != "win32":
        return subprocess.Popen([sys.executable, "-c", CHILD, str(sock.fileno())], pass_fds=[sock.fileno()])
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "share"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    with proc.stdin:
        proc.stdin.write(sock.share(proc.pid))
    return proc


def _still_open(sock: socket.socket) -> None:
    sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)  # not os.fstat: Windows SOCKETs are no fds


def test_child_adopts_an_inherited_end() -> None:
    parent, theirs = socket.socketpair(getattr(socket, "AF_UNIX", socket.AF_INET), socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        with Channel(parent) as ch:
            ch.settimeout(10)
            proc = _start_child_with(theirs)
            theirs.close()
            try:
                ch.send(b"wrote this", fds=[w])
                assert ch.recv().payload == b"done"
                assert proc.wait(10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        assert os.read(r, 100) == b"child wrote this"
    finally:
        theirs.close()
        os.close(r)
        os.close(w)


def test_pipe_is_refused_and_stays_the_callers() -> None:
    r, w = os.pipe()
    with pytest.raises(OSError) as info:
        Channel.from_fd(r)
    # On Windows from_fd() takes a SOCKET value, and a CRT fd's number may
    # be the value of some other object's handle (Wine: WSAEOPNOTSUPP).
    expected = {errno.ENOTSOCK, errno.EOPNOTSUPP} if sys.platform == "win32" else {errno.ENOTSOCK}
    assert info.value.errno in expected  # (the wording differs by platform)
    os.write(w, b"x")  # still open, still ours
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.close(w)


@wine_unbound_socket_quirk
def test_unconnected_socket_is_refused_and_stays_the_callers() -> None:
    with socket.socket(getattr(socket, "AF_UNIX", socket.AF_INET), socket.SOCK_STREAM) as s:
        with pytest.raises(OSError) as info:
            Channel.from_fd(s.fileno())
        assert info.value.errno == errno.ENOTCONN
        _still_open(s)  # still ours


def _datagram_pair() -> tuple[socket.socket, socket.socket]:
    if hasattr(socket, "AF_UNIX"):
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    # Windows' socketpair() makes stream pairs only: two UDP sockets connected to each other.
    a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    return a, b


def test_datagram_socket_is_refused_and_stays_the_callers() -> None:
    a, b = _datagram_pair()
    with a, b:
        with pytest.raises(ValueError, match="SOCK_STREAM"):
            Channel.from_fd(a.fileno())
        _still_open(a)


def test_adopted_fd_becomes_non_inheritable_and_owned() -> None:
    a, b = socket.socketpair(getattr(socket, "AF_UNIX", socket.AF_INET), socket.SOCK_STREAM)
    a.set_inheritable(True)
    fd = a.detach()
    with b, Channel.from_fd(fd) as ch:
        assert ch.fileno() == fd
        assert not ch._sock.get_inheritable()
    if sys.platform == "win32":
        # A SOCKET, not a CRT fd: closed means Winsock no longer knows it.
        with pytest.raises(OSError) as info:
            socket.socket(fileno=fd).detach()
        assert info.value.errno in (errno.ENOTSOCK, errno.EBADF)
        return
    with pytest.raises(OSError) as info:
        os.fstat(fd)  # closed with the channel
    assert info.value.errno == errno.EBADF
