"""The shared core, on both channel classes: one behaviour wherever only the waiting differs.

Each test runs the same scenario on `Channel` and on `AsyncChannel` (on
each loop kind) and expects the same outcome: the error raised after a
failure, whose fault it says it is, and what it chains to.
"""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest

import fdchannel._channel
from fdchannel import Channel, ChannelBroken, ChannelClosed, LimitExceeded, ProtocolError
from fdchannel._codec import HEADER_SIZE, pack_header
from fdchannel.aio import AsyncChannel
from fdchannel.transports import UnixRights

from ._aio import loop_kind, run, run_on  # noqa: F401 - fixtures
from ._portable import more_than_a_socket_holds
from ._proc import run_child

Run = Callable[..., Any]
TIMEOUT = 10.0


def test_a_peer_error_is_raised_again_with_its_class_chained_to_the_original() -> None:
    a, b = Channel.pair()
    with a, b:
        b.settimeout(TIMEOUT)
        with a._sock.dup() as raw:  # not os.dup: a Windows SOCKET is no CRT fd
            raw.sendall(pack_header(a.transport.wire_id, 0, 0, b.max_payload + 1))
        with pytest.raises(LimitExceeded) as first:
            b.recv()
        with pytest.raises(LimitExceeded, match="unusable after an earlier error") as later:
            b.recv()
        assert later.value.__cause__ is first.value
        assert not isinstance(first.value, ChannelBroken)  # the peer's fault
        with pytest.raises(LimitExceeded) as on_send:
            b.send(b"x")
        assert on_send.value.__cause__ is first.value


def test_the_async_channel_chains_the_same_way(run: Run) -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        async with a, b:
            with a._sock.dup() as raw:
                raw.sendall(pack_header(a.transport.wire_id, 0, 0, b.max_payload + 1))
            with pytest.raises(LimitExceeded) as first:
                await b.recv()
            with pytest.raises(LimitExceeded, match="unusable after an earlier error") as later:
                await b.recv()
            assert later.value.__cause__ is first.value
            with pytest.raises(LimitExceeded) as on_send:
                await b.send(b"x")
            assert on_send.value.__cause__ is first.value

    run(main())


def _fill(sock: socket.socket) -> None:
    """Fill *sock*'s send buffer behind the channel's back (small SO_SNDBUF first)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    small = pack_header(UnixRights.wire_id, 0, 0, 0)
    with sock.dup() as raw:
        raw.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                raw.send(small)


def _room_for_one_small_write(peer: socket.socket) -> None:
    with peer.dup() as peek:
        assert len(peek.recv(HEADER_SIZE)) == HEADER_SIZE


def _no_new_fd() -> tuple[int, int]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    while True:  # fill the gaps below the limit too
        try:
            os.open("/dev/null", os.O_RDONLY)
        except OSError:
            return soft, hard


@pytest.mark.skipif(
    sys.platform == "win32", reason="needs os.fork(), SCM_RIGHTS and RLIMIT_NOFILE, which Windows lacks"
)
def test_async_rest_that_cannot_be_kept_is_a_local_break(loop_kind: str) -> None:
    """A send cancelled between two fd batches must keep the rest (dup); with no fd
    left it cannot: the OSError says how much left, the channel is broken by
    this end (`ChannelBroken`, chained to the EMFILE), nothing stays queued.
    The blocking twin: test_channel_edges.py's EMFILE test."""

    def body() -> None:
        async def main() -> None:
            a, b = AsyncChannel.pair()
            _fill(a._sock)
            _room_for_one_small_write(b._sock)
            r, _w = os.pipe()
            task = asyncio.ensure_future(a.send(b"P" * 100, fds=[r] * 300))
            # The first batch rides on a byte that fits; then send() waits.
            for _ in range(100):
                await asyncio.sleep(0)
                if a.pending:
                    break
            assert not task.done()
            _no_new_fd()
            task.cancel()
            with pytest.raises(OSError) as info:
                await task
            assert info.value.errno == errno.EMFILE
            assert info.value.characters_written > 0  # type: ignore[attr-defined]
            assert not a.pending
            with pytest.raises(ChannelBroken, match="could not be kept") as later:
                await a.send(b"more")
            assert isinstance(later.value.__cause__, ChannelBroken)
            assert later.value.__cause__.__cause__ is info.value

        run_on(loop_kind, main())

    run_child(body)


def test_blocking_interrupt_is_a_local_break_chained_to_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal handler's exception while send() waits for room, with part of the
    frame written: the stream is cut by this end (`ChannelBroken`, chained).
    The async twin: test_async_recv_interrupt_is_a_local_break and
    test_channel_edges.py's interrupted-recv tests."""

    class Interrupt(Exception):
        pass

    def interrupted(*args: Any, **kwargs: Any) -> bool:
        raise Interrupt

    a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        monkeypatch.setattr(fdchannel._channel, "wait_ready", interrupted)
        with pytest.raises(Interrupt):
            a.send(b"x" * more_than_a_socket_holds(4 << 20))  # send() waits
        with pytest.raises(ChannelBroken, match=r"cut short|interrupted") as later:
            a.send(b"more")
        assert isinstance(later.value, ProtocolError)
        assert isinstance(later.value.__cause__, ChannelBroken)
        assert isinstance(later.value.__cause__.__cause__, Interrupt)


def test_async_recv_interrupt_is_a_local_break(run: Run) -> None:
    class Interrupt(Exception):
        pass

    async def main() -> None:
        a, b = AsyncChannel.pair()
        async with a, b:
            original = b._read

            def boom(flags: int) -> None:
                raise Interrupt

            b._read = boom  # type: ignore[method-assign]
            with pytest.raises(Interrupt):
                await b.recv()
            b._read = original  # type: ignore[method-assign]
            with pytest.raises(ChannelBroken, match="interrupted by") as later:
                await b.recv()
            assert isinstance(later.value.__cause__.__cause__, Interrupt)  # type: ignore[union-attr]

    run(main())


@pytest.mark.parametrize("kind", ["blocking", "async"])
def test_a_vanished_peer_mid_frame_does_not_break_receiving(kind: str) -> None:
    """EPIPE in the middle of a frame corrupts nothing (the peer reads no more):
    both classes keep delivering what the peer sent before it went."""
    if kind == "blocking":
        a, b = Channel.pair()
        a.settimeout(TIMEOUT)
        with a:
            b.send(b"before")
            b.close()
            # Over TCP (Windows' pairs) the peer's reset may come first.
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(1000):
                    a.send(b"x" * 65536)
            assert a.recv().payload == b"before"
            with pytest.raises(ChannelClosed):
                a.recv()
        return

    async def main() -> None:
        x, y = AsyncChannel.pair()
        async with x:
            await y.send(b"before")
            y.close()
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(1000):
                    await x.send(b"x" * 65536)
            assert (await x.recv()).payload == b"before"
            with pytest.raises(ChannelClosed):
                await x.recv()

    run_on("asyncio", main())


def test_the_async_gate_survives_a_waiter_cancelled_as_the_holder_leaves(run: Run) -> None:
    """A queued send/recv cancelled in the same loop turn as the holder leaves: the
    cancellation is a CancelledError (not a ValueError), and the gate is free after."""
    from fdchannel.aio import _Gate

    async def main() -> None:
        gate = _Gate()
        assert gate.try_enter()
        queued = asyncio.ensure_future(gate.enter())
        await asyncio.sleep(0)  # queued waits for the gate now
        queued.cancel()
        gate.leave()  # skips the cancelled waiter, frees the gate
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert gate.try_enter()
        # Handed over, then cancelled before it ran: it passes the gate on.
        second = asyncio.ensure_future(gate.enter())
        await asyncio.sleep(0)
        gate.leave()  # hands the gate to `second`
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert gate.try_enter()
        gate.leave()

    run(main())
