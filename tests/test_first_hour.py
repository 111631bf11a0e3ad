"""What a new user meets first (issue #12): errors that say what to do,
asyncio's conventions, a received socket's blocking mode, close() waking
blocked threads.  Real sockets, real threads."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fdchannel import Channel, aio
from fdchannel.aio import AsyncChannel

from ._portable import stream_socketpair
from ._transports import needs_unix_rights, tcp_socketpair

TIMEOUT = 10.0

needs_af_unix = pytest.mark.skipif(
    sys.platform == "win32", reason="named endpoints need AF_UNIX, which Windows lacks"
)


@pytest.fixture
def pair() -> Any:
    a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        yield a, b


# -- errors that say what to do ------------------------------------------------


def test_text_payload_says_encode_it(pair: Any) -> None:
    a, _ = pair
    with pytest.raises(TypeError, match=r"bytes-like.*not str.*'hello'\.encode\(\)"):
        a.send("hello")


def test_a_bare_int_for_fds_says_use_a_list(pair: Any) -> None:
    a, _ = pair
    with pytest.raises(TypeError, match=r"iterable of fds.*not int.*fds=\[0\]"):
        a.send(b"x", fds=0)  # type: ignore[arg-type]


@needs_unix_rights
def test_a_closed_fd_number_is_named(pair: Any) -> None:
    a, b = pair
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError, match=f"fd {r} is not open") as info:
        a.send(b"x", fds=[0, r])
    assert info.value.errno == errno.EBADF
    assert info.value.characters_written == 0  # type: ignore[attr-defined]
    a.send(b"still fine")
    with b.recv() as msg:
        assert msg.payload == b"still fine"


@needs_unix_rights
def test_tcp_with_the_default_transport_names_the_one_that_works() -> None:
    x, y = tcp_socketpair()
    with x, y, pytest.raises(ValueError, match=r"AF_UNIX.*PidfdGetfd\(\)"):
        Channel(x)


@pytest.mark.parametrize("cls", [Channel, AsyncChannel])
def test_an_fd_number_points_to_from_fd(cls: Any) -> None:
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.from_fd\(0\)"):
        cls(0)


@pytest.mark.parametrize("cls", [Channel, AsyncChannel])
def test_an_unconnected_socket_is_refused_at_construction(cls: Any) -> None:
    family = getattr(socket, "AF_UNIX", socket.AF_INET)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError, match="needs a connected socket") as info:
            cls(s)
        assert info.value.errno in (errno.ENOTCONN, errno.EINVAL, getattr(errno, "WSAENOTCONN", -1))
        assert s.fileno() >= 0  # still the caller's


@needs_af_unix
def test_connect_to_a_missing_path_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with pytest.raises(FileNotFoundError, match="Listener running") as info:
        Channel.connect(path, timeout=TIMEOUT)
    assert info.value.filename == str(path)


@needs_af_unix
def test_start_server_names_itself_for_unknown_options(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match=r"start_server\(\).*limit"):
            await aio.start_server(_echo, tmp_path / "s", limit=10)  # type: ignore[call-arg]

    asyncio.run(main())


# -- asyncio's conventions -------------------------------------------------------


async def _echo(ch: AsyncChannel) -> None:
    async for msg in ch:
        with msg:
            await ch.send(msg.payload)


@needs_af_unix
def test_start_server_takes_the_callback_first_like_asyncio(tmp_path: Path) -> None:
    path = tmp_path / "s"

    async def main() -> None:
        async with asyncio.timeout(TIMEOUT):
            server = await aio.start_server(_echo, path)
            async with server:
                assert server.get_loop() is asyncio.get_running_loop()
                (sock,) = server.sockets
                assert sock.fileno() == server.listener.fileno()
                assert sock.family == socket.AF_UNIX
                async with await AsyncChannel.connect(path) as ch:
                    await ch.send(b"hi")
                    assert (await ch.recv()).payload == b"hi"
                    assert ch.peer_credentials().pid == os.getpid()
            assert server.sockets == ()
            with pytest.warns(DeprecationWarning, match="handler first"):
                old = await aio.start_server(path, _echo)  # type: ignore[arg-type]
            async with old, await aio.connect(path) as ch:
                await ch.send(b"old order")
                assert (await ch.recv()).payload == b"old order"

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="close_other() is for after os.fork()")
def test_async_pair_has_close_other() -> None:
    a, b = AsyncChannel.pair()
    a.close_other()
    assert b.closed
    a.close()
    x, y = stream_socketpair()
    lone = AsyncChannel(x)
    try:
        with y, pytest.raises(ValueError, match="pair"):
            lone.close_other()
    finally:
        lone.close()


# -- a received socket's blocking mode -----------------------------------------------


@needs_unix_rights
@pytest.mark.parametrize(("timeout", "expected"), [(None, None), (2.5, 0.0), (0.0, 0.0)])
def test_received_socket_reports_the_mode_of_its_open_file(pair: Any, timeout: Any, expected: Any) -> None:
    a, b = pair
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(f"\0fdchannel-first-hour-{os.getpid()}")
        listening.listen()
        listening.settimeout(timeout)  # any timeout makes the open file non-blocking
        a.send(b"", [listening])
        with b.recv() as msg, msg.fds[0].socket() as got:
            assert got.gettimeout() == expected
            if expected == 0.0:
                with pytest.raises(BlockingIOError):
                    got.accept()  # agrees with what it says


# -- close() from another thread wakes a blocked call ------------------------------


def _blocked_then_closed(ch: Channel, call: Any) -> BaseException | None:
    started = threading.Event()
    result: list[BaseException | None] = []

    def run() -> None:
        started.set()
        try:
            call()
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=run)
    t.start()
    started.wait(TIMEOUT)
    # The call is inside the channel once it holds the lock.
    lock = ch._recv_lock if call.__name__ == "recv" else ch._send_lock
    give_up = time.monotonic() + TIMEOUT
    while not lock.locked() and time.monotonic() < give_up:
        time.sleep(0.001)  # polls a state no event reports, bounded
    ch.close()
    t.join(TIMEOUT)
    assert not t.is_alive(), "close() did not wake the blocked call"
    return result[0]


def test_close_wakes_a_thread_blocked_in_recv() -> None:
    a, b = Channel.pair()
    with a:
        b.settimeout(None)  # blocked in the kernel's recvmsg, not in poll
        exc = _blocked_then_closed(b, b.recv)
    assert isinstance(exc, ValueError)
    assert "closed" in str(exc)


def test_close_wakes_a_thread_blocked_in_send() -> None:
    a, b = Channel.pair()
    with b:
        a.settimeout(None)
        big = b"x" * (64 << 20)  # more than the socket holds: blocks until b reads
        exc = _blocked_then_closed(a, lambda: a.send(big))
    assert isinstance(exc, ValueError)
