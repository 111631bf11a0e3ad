"""A peer that declares a large payload and then drips costs what it sent, not what it declared.

Many real clients connect to a real `Listener` (threads) or `aio.start_server`,
each sends a 26-byte header declaring a payload of ``max_payload`` and then
only a few bytes.  The memory the server's channels hold is measured with
tracemalloc against a stated bound: before the fix each channel allocated
the whole declared payload at once.
"""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import select
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fdchannel import Budget, ChannelClosed, LimitExceeded, Listener, ProtocolError
from fdchannel._codec import HEADER_SIZE, pack_header
from fdchannel.aio import AsyncChannel, start_server
from fdchannel.transports import UnixRights

from ._aio import loop_kind, run  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="AF_UNIX servers")

Run = Callable[..., Any]

CLIENTS = 16
DECLARED = 16 * 1024 * 1024
DRIP = 1000
#: What all the server's channels may hold together while the clients drip:
#: 1 MiB each.  Before the fix it was CLIENTS x DECLARED (256 MiB).
BOUND = CLIENTS * (1 << 20)


def _drip_clients(path: str) -> list[socket.socket]:
    """Connect CLIENTS raw sockets; each sends a header declaring DECLARED bytes, then DRIP of them."""
    header = pack_header(UnixRights().wire_id, 0, 0, DECLARED)
    assert len(header) == HEADER_SIZE
    clients = []
    try:
        for _ in range(CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(s)
            s.settimeout(10)
            s.connect(path)
            s.sendall(header + bytes(DRIP))
    except BaseException:
        for s in clients:
            s.close()
        raise
    return clients


def test_dripping_clients_cost_a_threaded_listener_what_they_sent(tmp_path: Path) -> None:
    path = str(tmp_path / "srv")
    with Listener(path, max_payload=DECLARED) as listener:
        listener.settimeout(10)
        tracemalloc.start()
        try:
            clients = _drip_clients(path)
            channels = []
            try:
                for _ in range(CLIENTS):
                    ch = listener.accept()
                    channels.append(ch)
                    # One read each takes in everything the client sent
                    # (AF_UNIX: sendall returned, so it is all queued).
                    ch.settimeout(0.0)
                    with pytest.raises(BlockingIOError):
                        ch.recv()
                    assert ch._decoder.received == HEADER_SIZE + DRIP
                held, _peak = tracemalloc.get_traced_memory()
            finally:
                for ch in channels:
                    ch.close()
                for s in clients:
                    s.close()
        finally:
            tracemalloc.stop()
    assert held < BOUND, f"{CLIENTS} dripping clients made the server hold {held / 2**20:.1f} MiB"


def test_dripping_clients_cost_an_async_server_what_they_sent(tmp_path: Path, run: Run) -> None:
    path = str(tmp_path / "srv")

    async def body() -> int:
        channels: list[AsyncChannel] = []
        all_in = asyncio.Event()

        async def handler(ch: AsyncChannel) -> None:
            channels.append(ch)
            if len(channels) == CLIENTS:
                all_in.set()
            try:
                await ch.recv()
            except (ChannelClosed, ProtocolError):
                pass  # the client went away mid-message

        tracemalloc.start()
        try:
            async with await start_server(handler, path, max_payload=DECLARED):
                clients = await asyncio.to_thread(_drip_clients, path)
                try:
                    await all_in.wait()
                    # Yield to the loop until every handler's recv() took in
                    # what its client sent (readiness callbacks, no timer).
                    while not all(ch._decoder.received == HEADER_SIZE + DRIP for ch in channels):
                        await asyncio.sleep(0)
                    held, _peak = tracemalloc.get_traced_memory()
                finally:
                    for s in clients:
                        s.close()
        finally:
            tracemalloc.stop()
        return held

    held = run(body())
    assert held < BOUND, f"{CLIENTS} dripping clients made the server hold {held / 2**20:.1f} MiB"


def test_a_large_payload_still_arrives_whole_as_it_grows() -> None:
    from fdchannel import Channel

    payload = bytes(range(256)) * (3 * 1024 * 1024 // 256 + 7)  # not a multiple of any growth step
    a, b = Channel.pair(max_payload=len(payload))
    with a, b:
        done = threading.Event()

        def send() -> None:
            a.send(payload, [0])
            done.set()

        t = threading.Thread(target=send)
        t.start()
        with b.recv() as msg:
            assert msg.payload == payload
            assert len(msg.fds) == 1
        t.join(30)
        assert done.is_set()


#: The server-wide bound (issue #11): a `Budget` of 1 MiB for all channels
#: together, where each dripping client's buffer starts at 256 KiB.
SERVER_MEMORY = 1 << 20


def test_a_memory_budget_bounds_what_dripping_clients_cost_a_server_together(
    tmp_path: Path, run: Run
) -> None:
    path = str(tmp_path / "srv")
    budget = Budget(fds=None, memory=SERVER_MEMORY)

    async def body() -> tuple[int, int, list[str]]:
        outcomes: list[str] = []
        settled = asyncio.Event()

        async def handler(ch: AsyncChannel) -> None:
            try:
                await ch.recv()
            except LimitExceeded:
                outcomes.append("refused")
            except (ChannelClosed, ProtocolError):
                outcomes.append("gone")  # the test closes the clients at the end
            finally:
                if len(outcomes) == CLIENTS:
                    settled.set()

        tracemalloc.start()
        try:
            async with await start_server(handler, path, max_payload=DECLARED, budget=budget) as server:
                assert server.listener.budget is budget
                clients = await asyncio.to_thread(_drip_clients, path)
                try:
                    # Every channel took in what its client sent, or was refused
                    # (an evicted one lets go when its recv() wakes: the loop's turn).
                    async with asyncio.timeout(10):
                        while (
                            budget.refused + budget.holders != CLIENTS or budget.held_memory > SERVER_MEMORY
                        ):
                            await asyncio.sleep(0)
                    held, _peak = tracemalloc.get_traced_memory()
                    charged = budget.held_memory
                finally:
                    for s in clients:
                        s.close()
                async with asyncio.timeout(10):
                    await settled.wait()
        finally:
            tracemalloc.stop()
        return held, charged, outcomes

    held, charged, outcomes = run(body())
    # Within the budget: the channels that got in before it was full; the
    # others were refused at their first read, their buffers freed.
    assert charged <= SERVER_MEMORY
    assert outcomes.count("refused") == budget.refused == CLIENTS - SERVER_MEMORY // (256 * 1024)
    assert held < 2 * SERVER_MEMORY + CLIENTS * 64 * 1024, f"the server held {held / 2**20:.1f} MiB"
    assert (budget.held_memory, budget.holders) == (0, 0)


def test_an_idle_channel_costs_little() -> None:
    """Each channel used to zero a 128 KiB read buffer up front: 10,000 idle connections, 1.3 GB."""
    from fdchannel import Channel

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pairs = [Channel.pair() for _ in range(200)]
        per_channel = (tracemalloc.get_traced_memory()[0] - base) / 400
    finally:
        tracemalloc.stop()
    for a, b in pairs:
        a.close()
        b.close()
    assert per_channel < 32 * 1024, f"{per_channel / 1024:.1f} KiB per idle channel"


def test_the_read_buffer_grows_for_a_frame_longer_than_it() -> None:
    from fdchannel import Channel
    from fdchannel._codec import FIRST_BUFFER, INLINE_LIMIT

    a, b = Channel.pair()
    with a, b:
        a.settimeout(10)
        b.settimeout(10)
        for size in (FIRST_BUFFER - HEADER_SIZE, FIRST_BUFFER, INLINE_LIMIT - HEADER_SIZE, 3 * FIRST_BUFFER):
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            a.send(payload, [0])
            with b.recv() as msg:
                assert msg.payload == payload
                assert len(msg.fds) == 1


def test_a_grown_read_buffer_goes_back_when_the_channel_waits() -> None:
    """The second review: a buffer grown by one larger message stayed at 128 KiB for good."""
    from fdchannel import Channel
    from fdchannel._codec import FIRST_BUFFER

    a, b = Channel.pair()
    with a, b:
        a.settimeout(10)
        a.send(bytes(40_000))  # more than FIRST_BUFFER, less than a large frame
        b.settimeout(10)
        with b.recv() as msg:
            assert len(msg.payload) == 40_000
        assert b._decoder.grown
        # Blocking (no timeout): the recv below waits in another thread.
        b.settimeout(None)
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(b.recv().payload))
        t.start()
        deadline = time.monotonic() + 10
        while b._decoder.grown and time.monotonic() < deadline:
            select.select([], [], [], 0.001)  # bounded: until the waiting recv gave it back
        assert not b._decoder.grown
        assert len(b._decoder._buf) == FIRST_BUFFER
        a.send(b"after")
        t.join(10)
        assert got == [b"after"]
        # Non-blocking: the wait is the caller's, the buffer goes back at once.
        a.send(bytes(40_000))
        b.settimeout(10)
        b.recv().close()
        assert b._decoder.grown
        b.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            b.recv()
        assert not b._decoder.grown


def test_a_grown_read_buffer_goes_back_when_an_async_channel_waits(run: Run) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair()
        async with a, b:
            await a.send(bytes(40_000))
            (await b.recv()).close()
            assert b._decoder.grown
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await b.recv()
            assert not b._decoder.grown

    run(body())
