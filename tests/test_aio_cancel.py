"""AsyncChannel under cancellation, timeouts and backpressure.

The sweeps cancel a ``recv()`` or ``send()`` after N event-loop iterations,
for every N until the operation completes on its own, with a peer that reads
or writes a large message (payload and 1,000 fds) over many iterations.
After each cut the stream must still deliver every message exactly once,
whole, with the right fds, and nothing may leak.
"""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import functools
import gc
import os
import socket
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from fdchannel import Message
from fdchannel._codec import HEADER_SIZE, pack_header
from fdchannel.aio import AsyncChannel
from fdchannel.transports import PidfdGetfd, Transport, UnixRights

from ._aio import TIMEOUT, cancel_after, loop_kind, run  # noqa: F401 - fixtures
from ._portable import more_than_a_socket_holds, read_fd
from ._transports import needs_pidfd, needs_unix_rights
from .conftest import open_fds

Run = Callable[..., Any]


def check(msg: Message, payload: bytes, nfds: int, r: int) -> None:
    """*msg* is *payload* with *nfds* fds, each the write end of the pipe read through *r*.

    Identity by use, not by fstat (Windows gives pipes no inode numbers):
    a byte written through each fd arrives at *r*.
    """
    with msg:
        assert msg.payload == payload
        assert len(msg.fds) == nfds
        for fd in msg.fds:
            os.write(fd.fileno(), b"w")
    got = b""
    while len(got) < nfds:
        got += read_fd(r, nfds - len(got))
    assert got == b"w" * nfds


# Big enough to span many socket-buffer fills, with 1,000 fds (in 4 batches
# with SCM_RIGHTS): 1 MiB where the pair is AF_UNIX (about 200 KiB a fill on
# Linux); TCP on loopback (Windows) takes megabytes at once: several times that.
BIG_SIZE = 1 << 20 if hasattr(socket, "AF_UNIX") else 3 * more_than_a_socket_holds(1 << 20)
BIG = bytes(range(256)) * (BIG_SIZE // 256)
NFDS = 1000


def test_cancelled_recv_loses_nothing(run: Run) -> None:
    """Cancel recv() after N iterations while a large message trickles in."""

    async def main() -> int:
        a, b = AsyncChannel.pair()
        r, w = os.pipe()
        cuts = 0
        async with a, b:
            for n in range(400):
                sender = asyncio.create_task(a.send(BIG + n.to_bytes(2, "big"), fds=[w] * NFDS))
                cancelled, msg = await cancel_after(asyncio.create_task(b.recv()), n)
                if cancelled is not None:
                    cuts += 1
                    async with asyncio.timeout(10):
                        msg = await b.recv()
                assert msg is not None
                check(msg, BIG + n.to_bytes(2, "big"), NFDS, r)
                await sender
                if cancelled is None:
                    break  # from here on recv completes before the cut
        os.close(r)
        os.close(w)
        return cuts

    assert run(main()) > 5


def test_cancelled_recv_with_small_messages(run: Run) -> None:
    """Many small 1-fd messages: every cut point between and inside frames."""

    async def main() -> None:
        a, b = AsyncChannel.pair()
        r, w = os.pipe()
        async with a, b:

            async def produce() -> None:
                for i in range(300):
                    await a.send(b"m%d" % i, fds=[w])
                    if i % 7 == 0:
                        await asyncio.sleep(0)

            producer = asyncio.create_task(produce())
            for i in range(300):
                cancelled, msg = await cancel_after(asyncio.create_task(b.recv()), i % 3)
                if cancelled is not None:
                    async with asyncio.timeout(10):
                        msg = await b.recv()
                assert msg is not None
                check(msg, b"m%d" % i, 1, r)
            await producer
        os.close(r)
        os.close(w)

    run(main())


def test_cancelled_send_never_corrupts(run: Run) -> None:
    """Cancel send() after N iterations: not sent, or delivered whole before the next message."""

    async def main() -> int:
        a, b = AsyncChannel.pair()
        r, w = os.pipe()
        taken_cuts = 0
        received: asyncio.Queue[Message] = asyncio.Queue()

        async def reader() -> None:
            # Reads as the loop lets it, so a large send needs many iterations.
            async for msg in b:
                await received.put(msg)

        async with b:
            reading = asyncio.create_task(reader())
            async with a:
                for n in range(400):
                    payload = BIG + n.to_bytes(2, "big")
                    mine = [os.dup(w) for _ in range(NFDS)]
                    send_task = asyncio.create_task(a.send(payload, fds=mine))
                    cancelled, _ = await cancel_after(send_task, n)
                    # Whatever happened, the caller may close its fds at once.
                    for fd in mine:
                        os.close(fd)
                    taken = cancelled is None or _written(cancelled) > 0
                    if cancelled is not None and taken:
                        taken_cuts += 1
                    marker = b"marker %d" % n
                    # The next send finishes a taken remainder first.
                    await a.send(marker, fds=[w] * NFDS)
                    assert not a.pending
                    if taken:
                        check(await received.get(), payload, NFDS, r)
                    check(await received.get(), marker, NFDS, r)
                    if cancelled is None:
                        break
            await reading
            assert received.empty()
        os.close(r)
        os.close(w)
        return taken_cuts

    # A bound against hangs, not a timing check: under Wine each round sends
    # 3 MiB and duplicates 1000 handles, and the proactor loop took 24-32 s
    # (on the previous commit too) against the default 30.
    assert run(main(), timeout=120) > 5


def _written(exc: asyncio.CancelledError) -> int:
    """``characters_written`` of a send's CancelledError.

    A task cancelled before it ever ran has none: it took nothing.
    """
    return int(getattr(exc, "characters_written", 0))


SMALL_FRAME_BODY = b"s"


def _fill_with_small_frames(ch: AsyncChannel, wire_id: int) -> int:
    """Write 1-byte frames into *ch*'s socket behind its back until it is full; how many."""
    small = pack_header(wire_id, 0, 0, len(SMALL_FRAME_BODY)) + SMALL_FRAME_BODY
    count = 0
    with ch._sock.dup() as raw:  # not os.dup: a Windows SOCKET is no CRT fd
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
def test_cancelled_send_keeps_its_own_duplicates_of_fds_still_to_go(run: Run) -> None:
    """A send cancelled between two fd batches of a 1,000-fd message holds
    duplicates of the batches still to go: the caller closes its fds at
    once, the numbers are reused for other files, and the peer still gets
    the original pipe."""

    async def main() -> None:
        a, b = AsyncChannel.pair()
        async with a, b:
            a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # a few skbs fill it
            count = _fill_with_small_frames(a, UnixRights.wire_id)
            # Make room for exactly one more small write: read one frame raw.
            with b._sock.dup() as peek:
                size = HEADER_SIZE + len(SMALL_FRAME_BODY)
                assert len(peek.recv(size)) == size
            count -= 1
            r, w = os.pipe()
            mine = [os.dup(w) for _ in range(NFDS)]
            task = asyncio.create_task(a.send(b"big", fds=mine))
            while not a.pending:  # the first batch left, the rest waits for room
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await task
            assert _written(info.value) > 0
            for fd in [w, *mine]:  # r stays open: check() reads through it
                os.close(fd)
            decoys = [os.open(os.devnull, os.O_RDONLY) for _ in range(NFDS + 2)]  # reuse the numbers
            try:
                flushing = asyncio.create_task(a.flush())
                async with asyncio.timeout(TIMEOUT):
                    for _ in range(count):
                        assert (await b.recv()).payload == b"s"
                    check(await b.recv(), b"big", NFDS, r)
                    await flushing
            finally:
                for fd in decoys:
                    os.close(fd)
                os.close(r)

    run(main())


def test_cancel_before_any_byte_means_not_sent(run: Run) -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        async with a, b:
            # Fill the socket so the next send cannot write its first byte.
            filler = asyncio.create_task(a.send(b"f" * (4 * 1024 * 1024)))
            await cancel_after(filler, 2)
            assert a.pending  # the filler was taken: its remainder is queued
            blocked = asyncio.create_task(a.send(b"never", fds=[0]))
            cancelled, _ = await cancel_after(blocked, 3)
            assert cancelled is not None
            assert _written(cancelled) == 0
            assert a.pending  # still the filler's remainder, untouched

            async def read_all() -> list[bytes]:
                return [bytes((await b.recv()).payload) for _ in range(2)]

            reading = asyncio.create_task(read_all())
            await a.send(b"after")
            assert await reading == [b"f" * (4 * 1024 * 1024), b"after"]

    run(main())


@pytest.mark.parametrize(
    "transport",
    [
        pytest.param(UnixRights, id="UnixRights", marks=needs_unix_rights),
        pytest.param(
            functools.partial(UnixRights, acknowledge=True), id="UnixRights-acked", marks=needs_unix_rights
        ),
        pytest.param(PidfdGetfd, id="PidfdGetfd", marks=needs_pidfd),
    ],
)
def test_send_cancelled_before_any_byte_keeps_no_fd(run: Run, transport: type[Transport]) -> None:
    """Not taken means nothing stays behind: a duplication transport's
    copies of the fds (made for the peer to pull) are closed at once."""

    async def main() -> None:
        a, b = AsyncChannel.pair(transport=transport())
        async with a, b:
            async with asyncio.timeout(TIMEOUT):
                # Settle what a transport keeps for the channel's life (a
                # lease file) and the acknowledgement of a first message.
                await a.send(b"first", fds=[0])
                (await b.recv()).close()
                await b.send(b"carries the acknowledgement")
                await a.recv()
            count = _fill_with_small_frames(a, a.transport.wire_id)
            r, w = os.pipe()
            before = open_fds()
            task = asyncio.create_task(a.send(b"never", fds=[r, w] * 5))
            cancelled, _ = await cancel_after(task, 3)
            assert cancelled is not None
            assert _written(cancelled) == 0
            assert not a.pending
            assert open_fds() == before
            os.close(r)
            os.close(w)
            async with asyncio.timeout(TIMEOUT):
                receiving = asyncio.create_task(b.recv())
                await a.send(b"after")
                for _ in range(count):
                    assert (await receiving).payload == b"s"
                    receiving = asyncio.create_task(b.recv())
                assert (await receiving).payload == b"after"

    run(main())


def test_timeout_behaves_like_cancellation(run: Run) -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        r, w = os.pipe()
        async with a, b:
            # recv: nothing there yet, then half a message: TimeoutError,
            # and the half stays buffered.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.01):
                    await b.recv()
            sender = asyncio.create_task(a.send(BIG, fds=[w] * NFDS))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0):
                    await b.recv()
            async with asyncio.timeout(10):
                msg = await b.recv()
            check(msg, BIG, NFDS, r)
            await sender
            # send: the peer does not read, the socket fills up, the timeout
            # fires; the message was taken (part of it left) and finishes
            # before the next one.
            big = b"s" * (3 * more_than_a_socket_holds(8 * 1024 * 1024))
            with pytest.raises(TimeoutError) as info:
                async with asyncio.timeout(0.05):
                    await a.send(big, fds=[w])
            cause = info.value.__cause__
            assert isinstance(cause, asyncio.CancelledError)
            assert cause.characters_written > 0  # type: ignore[attr-defined]
            assert a.pending
            os.close(w)  # ours; the channel holds its own duplicate
            after = asyncio.create_task(a.send(b"after"))
            with await b.recv() as m1:
                assert m1.payload == big
                os.write(m1.fds[0].fileno(), b"!")  # the duplicate is the pipe
            await after
            assert (await b.recv()).payload == b"after"
        assert os.read(r, 1) == b"!"
        os.close(r)

    run(main())


def test_backpressure_bounds_memory(run: Run) -> None:
    """A peer that stops reading: send() waits, and memory stays bounded."""

    async def main() -> None:
        a, b = AsyncChannel.pair()
        chunk = b"p" * 65536
        most = more_than_a_socket_holds(8 * 1024 * 1024)
        sent = 0
        async with a, b:
            gc.collect()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                # Until sends time out several times in a row: over TCP on
                # loopback (Windows) the kernel still moves a little more
                # along to the peer shortly after a first stall.
                stalls = 0
                for _ in range(most // len(chunk) + 10):
                    try:
                        async with asyncio.timeout(0.02):
                            await a.send(chunk, fds=[0])
                    except TimeoutError:
                        stalls += 1
                        if stalls == 5:
                            break
                        await asyncio.sleep(0.05)
                        continue
                    stalls = 0
                    sent += 1
                assert stalls == 5, "the socket never filled up"
                # Blocked: further attempts time out and take nothing, or
                # leave at most one message pending.
                for _ in range(20):
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.005):
                            await a.send(chunk, fds=[0])
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            # The kernel holds a few hundred KiB; we hold at most one message.
            assert sent * len(chunk) < most
            assert peak < 4 * len(chunk) + 256 * 1024, peak

    run(main())
