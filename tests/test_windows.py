"""Windows only: what differs there, with real Windows processes (the PSF's CPython; CI runs it under Wine).

CRT fds and SOCKETs are numbered apart, so an `OwnedFd` knows which it holds;
the WinDuplicate transport carries both between processes; IO::FDPass's
Win32 wire format moves a handle from one process to another; the named
endpoints that need AF_UNIX say so.  The shared channel suite runs here too
(tests/_transports.py gives it WinDuplicate pairs).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

if sys.platform != "win32":
    pytest.skip("Windows only: CRT fds, SOCKETs and DuplicateHandle", allow_module_level=True)

import msvcrt

import fdchannel
from fdchannel import Channel, Listener, OwnedFd
from fdchannel._fdutil import SocketHandle
from fdchannel.transports import WinDuplicate, default_transport
from fdchannel.transports._win32 import Win32Api

from ._proc import finish_process

TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent


def test_the_default_transport_is_windows_duplication() -> None:
    assert isinstance(default_transport(), WinDuplicate)
    a, b = Channel.pair()
    with a, b:
        assert isinstance(a.transport, WinDuplicate)
        assert a._sock.family == socket.AF_INET  # Python's socketpair() on Windows: TCP on loopback


def test_a_received_socket_is_a_socket_and_a_received_file_is_an_fd() -> None:
    a, b = Channel.pair()
    x, y = socket.socketpair()
    r, w = os.pipe()
    with a, b, y:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"both", fds=[x, w])
        x.close()
        os.close(w)
        with b.recv() as msg:
            sock_fd, file_fd = msg.fds
            assert sock_fd.is_socket
            assert isinstance(sock_fd.fileno(), SocketHandle)
            assert not file_fd.is_socket
            msvcrt.get_osfhandle(file_fd.fileno())  # a CRT fd: the CRT knows it
            with pytest.raises(ValueError, match="cannot be opened as a file"):
                sock_fd.open("rb")
            copy = sock_fd.dup()
            assert copy.is_socket
            with copy.socket() as s:
                s.sendall(b"ping")
                y.settimeout(TIMEOUT)
                assert y.recv(10) == b"ping"
            with file_fd.open("wb", buffering=0) as f:
                f.write(b"pipe")
        assert sock_fd.closed  # leaving `with msg` closed it (closesocket)
    assert os.read(r, 10) == b"pipe"
    os.close(r)


def test_a_crt_fd_with_the_number_of_the_channels_socket_is_not_the_socket() -> None:
    """The two number spaces overlap: an fd numbered like the channel's SOCKET is sendable."""
    a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        with pytest.raises(ValueError, match="own socket"):
            a.send(b"x", fds=[a._sock])  # the socket object: refused
        r, w = os.pipe()
        a.send(b"fd", fds=[w])
        os.close(w)
        with b.recv() as msg:
            assert not msg.fds[0].is_socket
        os.close(r)


def test_is_socket_answers_false_for_a_number_that_is_neither() -> None:
    api = Win32Api()
    assert not api.is_socket(123457)  # not a CRT fd, not a SOCKET: False, not WinError 10038
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # Wine wraps only bound sockets in socket objects
        assert api.is_socket(s.fileno())


def test_named_endpoints_say_they_need_af_unix() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sock")
        with pytest.raises(OSError, match="AF_UNIX") as info:
            Listener(path)
        assert info.value.errno == errno.EAFNOSUPPORT
        with pytest.raises(OSError, match="AF_UNIX"):
            Channel.connect(path)


def test_the_async_endpoints_say_they_need_af_unix() -> None:
    import asyncio

    from fdchannel import aio

    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sock")
            with pytest.raises(OSError, match="AF_UNIX") as info:
                await aio.connect(path)
            assert info.value.errno == errno.EAFNOSUPPORT
            with pytest.raises(OSError, match="AF_UNIX"):
                await aio.start_server(lambda ch: asyncio.sleep(0), path)

    asyncio.run(main())


def test_other_transports_say_what_they_need() -> None:
    from fdchannel.transports import PidfdGetfd, UnixRights

    x, y = socket.socketpair()
    with x, y:
        with pytest.raises(ValueError, match="AF_UNIX"):
            Channel(x, transport=UnixRights())
        with pytest.raises(OSError, match="Linux"):
            Channel(x, transport=PidfdGetfd())


def test_peer_credentials_say_they_are_not_supported() -> None:
    a, b = Channel.pair()
    with a, b, pytest.raises((NotImplementedError, OSError)):
        a.peer_credentials()


CHILD = textwrap.dedent(
    """
    import os, sys
    from fdchannel import Channel
    ch = Channel.from_environ()
    ch.settimeout(30)
    with ch:
        ch.send(b"ready")
        with ch.recv() as msg:
            pipe, sock = msg.fds[0], msg.fds[-1]
            assert len(msg.fds) == int(msg.payload), (len(msg.fds), msg.payload)
            with pipe.open("wb", buffering=0) as f:
                f.write(b"child " + str(os.getpid()).encode())
            with sock.socket() as s:
                s.sendall(b"over the shared socket")
        r, w = os.pipe()
        ch.send(b"back", fds=[w])
        os.close(w)
        assert os.read(r, 10) == b"parent"
        ch.send(b"done")
    """
)


@pytest.mark.parametrize("nfds", [2, 300], ids=["2-fds", "300-fds"])
def test_spawn_carries_files_and_sockets_between_two_windows_processes(nfds: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    info = subprocess.STARTUPINFO()
    before = repr(info.lpAttributeList)
    # close_fds=True and a STARTUPINFO of the caller's are accepted (and the latter left as it was).
    proc, ch = fdchannel.spawn([sys.executable, "-c", CHILD], env=env, close_fds=True, startupinfo=info)
    assert repr(info.lpAttributeList) == before
    r, w = os.pipe()
    x, y = socket.socketpair()
    try:
        with ch, y:
            ch.settimeout(TIMEOUT)
            # A socket is shared for the peer's pid, which its channel
            # announces: receive from it first (docs/transports.md).
            assert ch.recv().payload == b"ready"
            fds = [w] * (nfds - 1) + [x]
            ch.send(str(nfds).encode(), fds=fds)
            os.close(w)
            w = -1
            x.close()
            assert os.read(r, 100) == f"child {proc.pid}".encode()
            y.settimeout(TIMEOUT)
            assert y.recv(100) == b"over the shared socket"
            with ch.recv() as msg, msg.fds[0].open("wb", buffering=0) as f:
                f.write(b"parent")
            assert ch.recv().payload == b"done"
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r)
        if w >= 0:
            os.close(w)


FDPASS_CHILD = textwrap.dedent(
    """
    import os, socket, sys
    from fdchannel import fdpass
    sock = socket.fromshare(bytes.fromhex(sys.stdin.readline()))
    sock.settimeout(30)
    fd = fdpass.recv(sock)
    os.write(fd, b"moved")
    os.close(fd)
    sock.sendall(b"k")
    sock.close()
    """
)


def test_fdpass_moves_a_handle_to_another_windows_process() -> None:
    """IO::FDPass's Win32 format: the sender's pid and handle; the receiver duplicates with
    DUPLICATE_CLOSE_SOURCE (it needs PROCESS_DUP_HANDLE on the sender only)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    a, b = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", FDPASS_CHILD], stdin=subprocess.PIPE, env=env, text=True)
    r, w = os.pipe()
    try:
        with a:
            assert proc.stdin is not None
            proc.stdin.write(b.share(proc.pid).hex() + "\n")
            proc.stdin.flush()
            b.close()
            a.settimeout(TIMEOUT)
            fdchannel.fdpass.send(a, w)
            os.close(w)
            w = -1
            assert a.recv(1) == b"k"
            assert os.read(r, 10) == b"moved"
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        os.close(r)
        if w >= 0:
            os.close(w)


def test_an_owned_socket_closes_with_closesocket_not_os_close() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    handle = SocketHandle(s.detach())
    fd = OwnedFd(handle)
    assert fd.is_socket
    fd.close()
    with pytest.raises(OSError):
        socket.socket(fileno=int(handle))  # gone: WinError 10038


def _mp_child(ch: Channel) -> None:
    ch.settimeout(TIMEOUT)
    with ch:
        ch.send(b"ready")  # the parent learns this process's pid from the channel's hello first
        with ch.recv() as msg, msg.fds[0].open("wb", buffering=0) as f:
            f.write(b"via multiprocessing " + msg.payload)
        ch.send(b"done")


def test_multiprocessing_spawn_hands_a_channel_to_the_child() -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = Channel.pair()
    r, w = os.pipe()
    try:
        with ours:
            proc = ctx.Process(target=_mp_child, args=(theirs,))
            proc.start()
            theirs.close()
            try:
                ours.settimeout(TIMEOUT)
                assert ours.recv().payload == b"ready"
                ours.send(b"spawn", fds=[w])
                assert ours.recv().payload == b"done"
            finally:
                finish_process(proc)
        assert os.read(r, 100) == b"via multiprocessing spawn"
    finally:
        os.close(r)
        os.close(w)
