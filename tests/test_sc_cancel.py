"""TrioChannel and AnyioChannel under cancellation, timeouts and backpressure.

The sweeps of test_aio_cancel.py, per structured kind (``trio``,
``anyio-asyncio``, ``anyio-uvloop``, ``anyio-trio``), with cancel scopes instead of
``Task.cancel()``: a ``recv()`` or ``send()`` is cancelled after N trips
round the run, for every N until it completes on its own, with a peer that
reads or writes a large message (payload and 1,000 fds) over many trips.
After each cut the stream must still deliver every message exactly once,
whole, with the right fds, and nothing may leak.
"""

# The kind fixture is imported from tests/_structured.py; test parameters
# naming it are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import gc
import os
import socket
import sys
import tracemalloc
from typing import Any

import pytest

from fdchannel import Message
from fdchannel._codec import HEADER_SIZE, pack_header
from fdchannel.transports import PidfdGetfd, Transport, UnixRights

from ._portable import more_than_a_socket_holds, read_fd
from ._structured import TIMEOUT, anyio, cancel_after, channel_class, run_kind, sc_kind, written  # noqa: F401
from ._transports import needs_pidfd, needs_unix_rights
from .conftest import open_fds


def check(msg: Message, payload: bytes, nfds: int, r: int) -> None:
    """*msg* is *payload* with *nfds* fds, each the write end of the pipe read through *r*."""
    with msg:
        assert msg.payload == payload
        assert len(msg.fds) == nfds
        for fd in msg.fds:
            os.write(fd.fileno(), b"w")
    got = b""
    while len(got) < nfds:
        got += read_fd(r, nfds - len(got))
    assert got == b"w" * nfds


BIG_SIZE = 1 << 20 if hasattr(socket, "AF_UNIX") else 3 * more_than_a_socket_holds(1 << 20)
BIG = bytes(range(256)) * (BIG_SIZE // 256)
NFDS = 1000


def test_cancelled_recv_loses_nothing(sc_kind: str) -> None:
    """Cancel recv() after N trips while a large message trickles in."""
    cls = channel_class(sc_kind)

    async def main() -> int:
        a, b = cls.pair()
        r, w = os.pipe()
        cuts = 0
        async with a, b:
            for n in range(400):
                payload = BIG + n.to_bytes(2, "big")
                async with anyio.create_task_group() as group:
                    group.start_soon(a.send, payload, [w] * NFDS)
                    cancelled, msg = await cancel_after(b.recv, n)
                    if cancelled is not None:
                        cuts += 1
                        with anyio.fail_after(10):
                            msg = await b.recv()
                    assert msg is not None
                    check(msg, payload, NFDS, r)
                if cancelled is None:
                    break  # from here on recv completes before the cut
        os.close(r)
        os.close(w)
        return cuts

    assert run_kind(sc_kind, main) > 5


def test_cancelled_recv_with_small_messages(sc_kind: str) -> None:
    """Many small 1-fd messages: every cut point between and inside frames."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        r, w = os.pipe()

        async def produce() -> None:
            for i in range(300):
                await a.send(b"m%d" % i, fds=[w])
                if i % 7 == 0:
                    await anyio.lowlevel.checkpoint()

        async with a, b, anyio.create_task_group() as group:
            group.start_soon(produce)
            for i in range(300):
                cancelled, msg = await cancel_after(b.recv, i % 3)
                if cancelled is not None:
                    with anyio.fail_after(10):
                        msg = await b.recv()
                assert msg is not None
                check(msg, b"m%d" % i, 1, r)
        os.close(r)
        os.close(w)

    run_kind(sc_kind, main)


def test_cancelled_send_never_corrupts(sc_kind: str) -> None:
    """Cancel send() after N trips: not sent, or delivered whole before the next message."""
    cls = channel_class(sc_kind)

    async def main() -> int:
        a, b = cls.pair()
        r, w = os.pipe()
        taken_cuts = 0
        put, get = anyio.create_memory_object_stream[Message](1000)

        async def reader() -> None:
            # Reads as the run lets it, so a large send needs many trips.
            async with put:
                async for msg in b:
                    await put.send(msg)

        async with b, get, anyio.create_task_group() as group:
            group.start_soon(reader)
            async with a:
                for n in range(400):
                    payload = BIG + n.to_bytes(2, "big")
                    mine = [os.dup(w) for _ in range(NFDS)]
                    cancelled, _ = await cancel_after(lambda p=payload, f=mine: a.send(p, fds=f), n)
                    # Whatever happened, the caller may close its fds at once.
                    for fd in mine:
                        os.close(fd)
                    taken = cancelled is None or written(cancelled) > 0
                    if cancelled is not None and taken:
                        taken_cuts += 1
                    marker = b"marker %d" % n
                    # The next send finishes a taken remainder first.
                    await a.send(marker, fds=[w] * NFDS)
                    assert not a.pending
                    if taken:
                        check(await get.receive(), payload, NFDS, r)
                    check(await get.receive(), marker, NFDS, r)
                    if cancelled is None:
                        break
            # a is closed: the reader ends, and nothing else arrived.
            async for extra in get:
                extra.close()
                raise AssertionError(f"an extra message arrived: {extra!r}")
        os.close(r)
        os.close(w)
        return taken_cuts

    assert run_kind(sc_kind, main) > 5


SMALL_FRAME_BODY = b"s"


def _fill_with_small_frames(ch: Any, wire_id: int) -> int:
    """Write 1-byte frames into *ch*'s socket behind its back until it is full; how many."""
    small = pack_header(wire_id, 0, 0, len(SMALL_FRAME_BODY)) + SMALL_FRAME_BODY
    count = 0
    with ch._sock.dup() as raw:
        raw.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                raw.send(small)
                count += 1
    return count


@pytest.mark.skipif(
    sys.platform == "win32",
    reason="cancels between two SCM_RIGHTS fd batches of one frame (UnixRights, AF_UNIX): Windows lacks them",
)
def test_cancelled_send_keeps_its_own_duplicates_of_fds_still_to_go(sc_kind: str) -> None:
    """Cancelled between two fd batches of a 1,000-fd message: the channel holds
    duplicates of the batches still to go; the caller's numbers are reused
    for other files and the peer still gets the original pipe."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        async with a, b:
            a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # a few skbs fill it
            count = _fill_with_small_frames(a, UnixRights.wire_id)
            with b._sock.dup() as peek:  # room for exactly one more small write
                size = HEADER_SIZE + len(SMALL_FRAME_BODY)
                assert len(peek.recv(size)) == size
            count -= 1
            r, w = os.pipe()
            mine = [os.dup(w) for _ in range(NFDS)]
            outcome: list[BaseException] = []
            scope = anyio.CancelScope()

            async def sending() -> None:
                with scope:
                    try:
                        await a.send(b"big", fds=mine)
                    except anyio.get_cancelled_exc_class() as exc:
                        outcome.append(exc)
                        raise

            async with anyio.create_task_group() as group:
                group.start_soon(sending)
                while not a.pending:  # the first batch left, the rest waits for room
                    await anyio.lowlevel.checkpoint()
                scope.cancel()
            assert written(outcome[0]) > 0
            for fd in [w, *mine]:  # r stays open: check() reads through it
                os.close(fd)
            decoys = [os.open(os.devnull, os.O_RDONLY) for _ in range(NFDS + 2)]  # reuse the numbers
            try:
                with anyio.fail_after(TIMEOUT):
                    async with anyio.create_task_group() as group:
                        group.start_soon(a.flush)
                        for _ in range(count):
                            assert (await b.recv()).payload == b"s"
                        check(await b.recv(), b"big", NFDS, r)
            finally:
                for fd in decoys:
                    os.close(fd)
                os.close(r)

    run_kind(sc_kind, main)


def test_cancel_before_any_byte_means_not_sent(sc_kind: str) -> None:
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        big = b"f" * (4 * 1024 * 1024)
        async with a, b:
            # Fill the socket so the next send cannot write its first byte.
            await cancel_after(lambda: a.send(big), 2)
            assert a.pending  # the filler was taken: its remainder is queued
            cancelled, _ = await cancel_after(lambda: a.send(b"never", fds=[0]), 3)
            assert cancelled is not None
            assert written(cancelled) == 0
            assert a.pending  # still the filler's remainder, untouched
            got: list[bytes] = []

            async def read_two() -> None:
                for _ in range(2):
                    got.append(bytes((await b.recv()).payload))

            async with anyio.create_task_group() as group:
                group.start_soon(read_two)
                await a.send(b"after")
            assert got == [big, b"after"]

    run_kind(sc_kind, main)


def test_send_in_a_cancelled_scope_is_not_taken(sc_kind: str) -> None:
    """The checkpoint comes first: an already cancelled send takes nothing, even with room."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        async with a, b:
            outcome: list[BaseException] = []
            with anyio.CancelScope() as scope:
                scope.cancel()
                try:
                    await a.send(b"never", fds=[0])
                except anyio.get_cancelled_exc_class() as exc:
                    outcome.append(exc)
                    raise
            assert written(outcome[0]) == 0
            assert not a.pending
            await a.send(b"after")
            assert (await b.recv()).payload == b"after"

    run_kind(sc_kind, main)


def test_a_cancellation_never_hides_a_send_that_completed(sc_kind: str) -> None:
    """Small sends that fit the socket, cancelled after 0, 1, 2 ... trips: the
    cancellation says "not taken" only for a message that never arrives."""
    cls = channel_class(sc_kind)

    async def main() -> int:
        a, b = cls.pair()
        not_taken = 0
        async with a, b:
            for n in range(60):
                cancelled, _ = await cancel_after(lambda n=n: a.send(b"%d" % n, fds=[0]), n % 4)
                await a.send(b"marker")
                if cancelled is None or written(cancelled) > 0:
                    with await b.recv() as msg:
                        assert msg.payload == b"%d" % n
                else:
                    not_taken += 1
                assert (await b.recv()).payload == b"marker"
        return not_taken

    assert run_kind(sc_kind, main) >= 15  # the cuts before the send began


def test_a_cancellation_never_hides_a_received_message(sc_kind: str) -> None:
    """A message already in the socket, recv() cancelled after 0, 1, 2 ... trips:
    either it returns the message or the next recv() does."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        async with a, b:
            for n in range(60):
                await a.send(b"%d" % n, fds=[0])
                cancelled, msg = await cancel_after(b.recv, n % 4)
                if cancelled is not None:
                    msg = await b.recv()
                assert msg is not None
                with msg:
                    assert (msg.payload, len(msg.fds)) == (b"%d" % n, 1)

    run_kind(sc_kind, main)


@pytest.mark.parametrize(
    "transport",
    [
        pytest.param(UnixRights, id="UnixRights", marks=needs_unix_rights),
        pytest.param(PidfdGetfd, id="PidfdGetfd", marks=needs_pidfd),
    ],
)
def test_send_cancelled_before_any_byte_keeps_no_fd(sc_kind: str, transport: type[Transport]) -> None:
    """Not taken means nothing stays behind: a duplication transport's copies are closed at once."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair(transport=transport())
        async with a, b:
            with anyio.fail_after(TIMEOUT):
                # Settle what a transport keeps for the channel's life and the
                # acknowledgement of a first message.
                await a.send(b"first", fds=[0])
                (await b.recv()).close()
                await b.send(b"carries the acknowledgement")
                await a.recv()
            count = _fill_with_small_frames(a, transport.wire_id)
            r, w = os.pipe()
            before = open_fds()
            cancelled, _ = await cancel_after(lambda: a.send(b"never", fds=[r, w] * 5), 3)
            assert cancelled is not None
            assert written(cancelled) == 0
            assert not a.pending
            assert open_fds() == before
            os.close(r)
            os.close(w)
            with anyio.fail_after(TIMEOUT):
                got: list[bytes] = []

                async def read_all() -> None:
                    for _ in range(count + 1):
                        got.append(bytes((await b.recv()).payload))

                async with anyio.create_task_group() as group:
                    group.start_soon(read_all)
                    await a.send(b"after")
                assert got == [b"s"] * count + [b"after"]

    run_kind(sc_kind, main)


def test_timeout_behaves_like_cancellation(sc_kind: str) -> None:
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        r, w = os.pipe()
        async with a, b:
            # recv: nothing there yet, then half a message: TimeoutError, and
            # the half stays buffered.
            with pytest.raises(TimeoutError), anyio.fail_after(0.01):
                await b.recv()
            async with anyio.create_task_group() as group:
                group.start_soon(a.send, BIG, [w] * NFDS)
                await anyio.lowlevel.checkpoint()
                with anyio.move_on_after(0):
                    await b.recv()
                with anyio.fail_after(10):
                    msg = await b.recv()
                check(msg, BIG, NFDS, r)
            # send: the peer does not read, the socket fills up, the deadline
            # passes; the message was taken and finishes before the next one.
            big = b"s" * (3 * more_than_a_socket_holds(8 * 1024 * 1024))
            outcome: list[BaseException] = []
            with pytest.raises(TimeoutError), anyio.fail_after(0.05):
                try:
                    await a.send(big, fds=[w])
                except anyio.get_cancelled_exc_class() as exc:
                    outcome.append(exc)
                    raise
            assert written(outcome[0]) > 0
            assert a.pending
            os.close(w)  # ours; the channel holds its own duplicate
            async with anyio.create_task_group() as group:
                group.start_soon(a.send, b"after")
                with await b.recv() as m1:
                    assert m1.payload == big
                    os.write(m1.fds[0].fileno(), b"!")  # the duplicate is the pipe
            assert (await b.recv()).payload == b"after"
        assert os.read(r, 1) == b"!"
        os.close(r)

    run_kind(sc_kind, main)


def test_backpressure_bounds_memory(sc_kind: str) -> None:
    """A peer that stops reading: send() waits, and memory stays bounded."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        chunk = b"p" * 65536
        most = more_than_a_socket_holds(8 * 1024 * 1024)
        sent = 0
        async with a, b:
            gc.collect()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                stalls = 0
                for _ in range(most // len(chunk) + 10):
                    with anyio.move_on_after(0.02) as scope:
                        await a.send(chunk, fds=[0])
                    if scope.cancelled_caught:
                        stalls += 1
                        if stalls == 5:
                            break
                        await anyio.sleep(0.05)
                        continue
                    stalls = 0
                    sent += 1
                assert stalls == 5, "the socket never filled up"
                for _ in range(20):
                    with anyio.move_on_after(0.005) as scope:
                        await a.send(chunk, fds=[0])
                    assert scope.cancelled_caught
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            assert sent * len(chunk) < most
            assert peak < 4 * len(chunk) + 256 * 1024, peak

    run_kind(sc_kind, main)
