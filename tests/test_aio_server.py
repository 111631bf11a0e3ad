"""fdchannel.aio.start_server and connect, on the default loop and on uvloop."""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

if sys.platform == "win32":
    pytest.skip(
        "start_server() and connect() need AF_UNIX sockets, which Python on Windows lacks",
        allow_module_level=True,
    )

from fdchannel import ChannelClosed
from fdchannel.aio import AsyncChannel, connect, start_server

from ._aio import loop_kind, run  # noqa: F401 - fixtures

Run = Callable[..., Any]


async def echo(ch: AsyncChannel) -> None:
    """Answer each message with its payload reversed and the same fds."""
    async for msg in ch:
        with msg:
            await ch.send(bytes(msg.payload)[::-1], fds=msg.fds)


def test_serve_connect_and_close(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"

    async def client(i: int, w: int) -> None:
        async with await connect(path) as ch:
            for j in range(5):
                await ch.send(b"%d-%d" % (i, j), fds=[w])
                with await ch.recv() as reply:
                    assert reply.payload == (b"%d-%d" % (i, j))[::-1]
                    assert os.fstat(reply.fds[0].fileno()).st_ino == os.fstat(w).st_ino

    async def main() -> None:
        r, w = os.pipe()
        server = await start_server(echo, path, mode=0o640)
        async with server:
            assert server.is_serving()
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o640
            await asyncio.gather(*(client(i, w) for i in range(10)))
        assert not server.is_serving()
        assert not path.exists()
        os.close(r)
        os.close(w)

    run(main())


def test_serve_forever_and_cancel(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"

    async def main() -> None:
        server = await start_server(echo, path, start_serving=False)
        assert not server.is_serving()
        forever = asyncio.create_task(server.serve_forever())
        async with await connect(path) as ch:
            await ch.send(b"abc")
            assert (await ch.recv()).payload == b"cba"
        forever.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forever
        assert not path.exists()
        await server.wait_closed()

    run(main())


def test_close_ends_serve_forever(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"

    async def main() -> None:
        server = await start_server(echo, path)
        forever = asyncio.create_task(server.serve_forever())
        await asyncio.sleep(0)
        server.close()
        await forever  # returns normally
        await server.wait_closed()

    run(main())


def test_stale_live_and_foreign_paths(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        # A stale socket file (nobody listening) is replaced.
        stale = tmp_path / "stale.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(stale))
        async with await start_server(echo, stale) as server:
            # A live one is not.
            with pytest.raises(OSError, match="live") as info:
                await start_server(echo, stale)
            assert info.value.errno == errno.EADDRINUSE
            assert server.is_serving()
        # Anything but a socket is refused and left alone.
        foreign = tmp_path / "data.txt"
        foreign.write_text("keep me")
        with pytest.raises(FileExistsError):
            await start_server(echo, foreign)
        assert foreign.read_text() == "keep me"

    run(main())


def test_abstract_name(run: Run) -> None:
    name = f"\0fdchannel-test-{os.getpid()}-{id(run)}"

    async def main() -> None:
        async with await start_server(echo, name), await connect(name) as ch:
            await ch.send(b"xy")
            assert (await ch.recv()).payload == b"yx"

    run(main())


def test_handler_errors_are_logged_and_serving_goes_on(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "srv.sock"

    async def picky(ch: AsyncChannel) -> None:
        msg = await ch.recv()
        with msg:
            if msg.payload == b"bad":
                raise RuntimeError("handler failed on purpose")
            await ch.send(b"good")

    async def main() -> None:
        async with await start_server(picky, path):
            async with await connect(path) as ch:
                await ch.send(b"bad")
                # The server closed the handler's channel.
                with pytest.raises(ChannelClosed):
                    await ch.recv()
            async with await connect(path) as ch:
                await ch.send(b"fine")
                assert (await ch.recv()).payload == b"good"

    with caplog.at_level(logging.ERROR, logger="fdchannel.aio"):
        run(main())
    assert "handler failed on purpose" in caplog.text


def test_close_clients_cancels_handlers(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"
    started = []

    async def stuck(ch: AsyncChannel) -> None:
        started.append(ch)
        await ch.recv()  # the client never sends

    async def main() -> None:
        server = await start_server(stuck, path)
        clients = [await connect(path) for _ in range(3)]
        while len(started) < 3:
            await asyncio.sleep(0)
        server.close()
        server.close_clients()
        await server.wait_closed()
        assert all(ch.closed for ch in started)
        for ch in clients:
            with pytest.raises(ChannelClosed):
                await ch.recv()
            await ch.aclose()

    run(main())


def test_handlers_cancelled_before_they_start_still_close_their_channels(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"
    started = []

    async def handler(ch: AsyncChannel) -> None:
        started.append(ch)

    async def main() -> None:
        server = await start_server(handler, path)
        client = await connect(path)
        while not server._tasks:  # accepted; the handler's task has not run a step yet
            await asyncio.sleep(0)
        server.close()
        server.close_clients()  # as at loop shutdown: the task never starts
        await server.wait_closed()
        assert started == []
        with pytest.raises(ChannelClosed):
            await client.recv()
        await client.aclose()

    run(main())


def test_refused_peers_are_closed_and_counted(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"

    async def main() -> None:
        async with await start_server(echo, path, authorize=lambda creds: creds.pid != os.getpid()) as server:
            async with await connect(path) as ch:
                # Closed by the listener before anything was read.
                with pytest.raises(ChannelClosed):
                    await ch.recv()
            assert server.listener.refused == 1

    run(main())


def test_connect_errors(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            await connect(tmp_path / "missing.sock")
        # A stale socket file: nobody listens.
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / "stale.sock"))
        with pytest.raises(ConnectionRefusedError):
            await connect(tmp_path / "stale.sock")

    run(main())


def test_channel_options_reach_accepted_channels(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"
    seen: list[int] = []

    async def limits(ch: AsyncChannel) -> None:
        seen.append(ch.max_payload)

    async def main() -> None:
        async with await start_server(limits, path, max_payload=1234), await connect(path) as ch:
            with pytest.raises(ChannelClosed):
                await ch.recv()
        assert seen == [1234]

    run(main())
