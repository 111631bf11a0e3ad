"""AsyncChannel: the shared channel behaviours, on the default loop and on uvloop.

Each test runs once per transport (the `make_pair` fixture, wrapped with
`AsyncChannel.from_channel`) and once per event loop kind.  The autouse
fixture in conftest.py checks that no fd leaked.
"""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from fdchannel import Channel, ChannelClosed, LimitExceeded, ProtocolError, TruncatedControlData
from fdchannel._codec import pack_header
from fdchannel.aio import AsyncChannel

from ._aio import LOOPS, TIMEOUT, T, loop_kind, run, run_on  # noqa: F401 - fixtures
from ._portable import read_fd, stream_socketpair
from ._proc import fork_child, limit_fds_to_free_slots, needs_fork, wait_child
from ._transports import PairFactory

APair = Callable[..., tuple[AsyncChannel, AsyncChannel]]
Run = Callable[..., Any]


@pytest.fixture
def apair(make_pair: PairFactory) -> APair:
    """Like `make_pair`, but the ends are AsyncChannels (via `from_channel`)."""

    def factory(**kwargs: Any) -> tuple[AsyncChannel, AsyncChannel]:
        a, b = make_pair(**kwargs)
        return AsyncChannel.from_channel(a), AsyncChannel.from_channel(b)

    return factory


def ident(fd: int | Any) -> tuple[int, int]:
    """The file *fd* is, by fstat: POSIX only (Windows gives pipes no inode numbers)."""
    st = os.fstat(fd if isinstance(fd, int) else fd.fileno())
    return st.st_dev, st.st_ino


def _number(fd: int | Any) -> int:
    return fd if isinstance(fd, int) else int(fd.fileno())


def writes_into(fds: Any, r: int) -> None:
    """Each of *fds* is the write end of the pipe read through *r*: a byte
    written through each arrives there (portable, where fstat identity is not)."""
    fds = list(fds)
    for fd in fds:
        os.write(_number(fd), b"w")
    got = b""
    while len(got) < len(fds):
        got += read_fd(r, len(fds) - len(got))
    assert got == b"w" * len(fds)


def reads_from(fd: int | Any, w: int) -> None:
    """*fd* is the read end of the pipe written through *w*."""
    os.write(w, b"r")
    assert read_fd(_number(fd), 1) == b"r"


def bound_socket() -> socket.socket:
    """A fresh TCP socket with an address of its own, which identifies it.

    Bound because Windows (Wine) cannot share an unbound socket (WinError 10022).
    """
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
    except BaseException:
        s.close()
        raise
    return s


class Pipes:
    """Some pipes, closed at the end of the test."""

    def __init__(self, n: int) -> None:
        self.pairs = [os.pipe() for _ in range(n)]

    @property
    def writers(self) -> list[int]:
        return [w for _, w in self.pairs]

    def close(self) -> None:
        for r, w in self.pairs:
            os.close(r)
            os.close(w)


# -- round trips ------------------------------------------------------------------


def test_payload_and_fds_round_trip(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()
        pipes = Pipes(2)
        with tempfile.TemporaryFile() as f, bound_socket() as s:
            async with a, b:
                await a.send(b"payload", fds=[pipes.writers[0], f, s, pipes.writers[1]])
                async with asyncio.timeout(5):
                    msg = await b.recv()
                with msg:
                    assert msg.payload == b"payload"
                    assert len(msg.fds) == 4
                    w0, fobj, sock, w1 = msg.fds
                    for fd in (w0, fobj, w1):
                        assert not os.get_inheritable(fd.fileno())
                    # Each is the file sent: the pipes, the file (one offset), the socket.
                    writes_into([w0], pipes.pairs[0][0])
                    writes_into([w1], pipes.pairs[1][0])
                    os.write(fobj.fileno(), b"through the copy")
                    f.seek(0)
                    assert f.read() == b"through the copy"
                    with sock.socket() as got:
                        assert not got.get_inheritable()
                        assert got.getsockname() == s.getsockname()
        pipes.close()

    run(main())


def test_empty_payload_with_fds_and_bytes_without_fds(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()
        r, w = os.pipe()
        async with a, b:
            await a.send(b"", fds=[r])
            await a.send(b"only bytes")
            await a.send()
            with await b.recv() as m1:
                assert m1.payload == b""
                assert len(m1.fds) == 1
                reads_from(m1.fds[0], w)
            m2 = await b.recv()
            assert (m2.payload, m2.fds) == (b"only bytes", ())
            m3 = await b.recv()
            assert (m3.payload, m3.fds) == (b"", ())
        os.close(r)
        os.close(w)

    run(main())


def test_thousand_fds_in_one_message(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()
        r, w = os.pipe()
        fds = [os.dup(w) for _ in range(1000)]
        async with a, b:
            sender = asyncio.create_task(a.send(b"many", fds=fds))
            msg = await b.recv()
            await sender
            # The caller may close its fds as soon as send() returned.
            for fd in fds:
                os.close(fd)
            with msg:
                assert msg.payload == b"many"
                assert len(msg.fds) == 1000
                writes_into(msg.fds, r)
        os.close(r)
        os.close(w)

    run(main())


@pytest.mark.parametrize("size", [1, 4096, 65_000, 70_000, 8 * 1024 * 1024])
def test_large_payloads(run: Run, apair: APair, size: int) -> None:
    async def main() -> None:
        a, b = apair()
        payload = os.urandom(size)
        async with a, b:
            sender = asyncio.create_task(a.send(payload, fds=[0]))
            msg = await b.recv()
            await sender
            with msg:
                assert msg.payload == payload
                assert len(msg.fds) == 1

    run(main())


def test_many_messages_in_order_and_async_for(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()
        r, w = os.pipe()

        all_seen = asyncio.Event()

        async def produce() -> None:
            for i in range(500):
                await a.send(i.to_bytes(4, "little") * (i % 7), fds=[w] * (i % 3))
            # Pull transports need the sender until the fds were taken.
            await all_seen.wait()
            await a.aclose()

        producer = asyncio.create_task(produce())
        seen = 0
        async with b:
            async for msg in b:
                with msg:
                    assert msg.payload == seen.to_bytes(4, "little") * (seen % 7)
                    assert len(msg.fds) == seen % 3
                seen += 1
                if seen == 500:
                    all_seen.set()
        await producer
        assert seen == 500
        os.close(r)
        os.close(w)

    run(main())


# -- EOF, errors, limits --------------------------------------------------------------


def test_eof_between_messages(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()
        await a.send(b"last")
        await a.aclose()
        async with b:
            assert (await b.recv()).payload == b"last"
            with pytest.raises(ChannelClosed):
                await b.recv()
            with pytest.raises(EOFError):  # still closed, still clean
                await b.recv()

    run(main())


def _raw_pair() -> tuple[socket.socket, AsyncChannel]:
    s, t = stream_socketpair()
    return s, AsyncChannel(t)


@pytest.mark.parametrize("cut", [1, 10, 24, 30])
def test_eof_mid_message_is_protocol_error_and_closes_fds(run: Run, cut: int) -> None:
    async def main() -> None:
        s, b = _raw_pair()
        r, w = os.pipe()
        if sys.platform == "win32":
            # No SCM_RIGHTS: no fd can arrive with the bytes, only the cut frame does.
            frame = pack_header(b.transport.wire_id, 0, 0, 10) + b"0123456789"
            s.sendall(frame[:cut])
        else:
            frame = pack_header(b.transport.wire_id, 1, 0, 10) + b"0123456789"
            s.sendmsg([frame[:cut]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
        s.close()
        os.close(w)
        async with b:
            with pytest.raises(ProtocolError):
                await b.recv()
            # Unusable, and says so; never ChannelClosed.
            with pytest.raises(ProtocolError, match="unusable"):
                await b.recv()
            with pytest.raises(ProtocolError, match="unusable"):
                await b.send(b"x")
        # The fd that arrived was closed: the pipe's write side is gone.
        assert read_fd(r, 1) == b""
        os.close(r)

    run(main())


def test_bad_magic_is_protocol_error(run: Run) -> None:
    async def main() -> None:
        s, b = _raw_pair()
        with s:
            s.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 20)
            async with b:
                with pytest.raises(ProtocolError, match="magic"):
                    await b.recv()

    run(main())


def test_send_limits(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair(max_payload=100, max_fds=3)
        async with a, b:
            with pytest.raises(ValueError, match="max_payload"):
                await a.send(b"x" * 101)
            with pytest.raises(ValueError, match="max_fds"):
                await a.send(b"", fds=[0, 0, 0, 0])
            with pytest.raises(ValueError, match="own socket"):
                await a.send(b"", fds=[a.fileno()])
            # Exactly at the limits is fine, and nothing was written before.
            await a.send(b"y" * 100, fds=[0, 1, 2])
            with await b.recv() as msg:
                assert msg.payload == b"y" * 100
                assert len(msg.fds) == 3

    run(main())


def test_peer_over_limits_gets_limit_exceeded(run: Run) -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        small = AsyncChannel.from_channel(Channel(b._sock.dup(), max_payload=10, max_fds=2))
        b.close()
        async with a, small:
            await a.send(b"", fds=[0, 1, 2])
            with pytest.raises(LimitExceeded):
                await small.recv()
            with pytest.raises(ProtocolError, match="unusable"):
                await small.recv()

    run(main())


def test_peer_over_payload_limit(run: Run) -> None:
    async def main() -> None:
        s, b = _raw_pair()
        b.close()
        t = AsyncChannel(s, max_payload=10)
        x, y = stream_socketpair()
        t.close()
        small = AsyncChannel(y, max_payload=10)
        with x:
            x.sendall(pack_header(small.transport.wire_id, 0, 0, 11) + b"x" * 11)
            async with small:
                with pytest.raises(LimitExceeded, match="max_payload"):
                    await small.recv()

    run(main())


def test_closed_channel_raises_value_error(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()
        await a.aclose()
        await a.aclose()  # idempotent
        b.close()
        assert a.closed
        with pytest.raises(ValueError, match="closed"):
            await a.send(b"x")
        with pytest.raises(ValueError, match="closed"):
            await a.recv()

    run(main())


def test_close_wakes_waiting_tasks(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()

        async def fill() -> None:
            while True:  # until the socket is full and send() waits
                await a.send(b"z" * (1 << 20))

        # Nobody sends to a, nobody reads b: both tasks end up waiting.
        receiver = asyncio.create_task(a.recv())
        filler = asyncio.create_task(fill())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not receiver.done()
        assert not filler.done()
        a.close()
        with pytest.raises(ChannelClosed):
            await receiver
        with pytest.raises(ValueError, match="closed"):
            await filler
        b.close()

    run(main())


def test_close_ends_every_waiting_receiver_with_channel_closed(run: Run) -> None:
    """The task waiting for the gate too (it got ValueError, a review found): ``async for`` ends in both."""

    async def main() -> None:
        a, b = AsyncChannel.pair()
        ended: list[str] = []

        async def reader() -> None:
            async for msg in a:
                msg.close()
            ended.append("ended")

        readers = [asyncio.create_task(reader()) for _ in range(2)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert not any(t.done() for t in readers)
        a.close()
        await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)
        assert ended == ["ended", "ended"]
        b.close()

    run(main())


@pytest.mark.skipif(sys.platform == "win32", reason="UnixRights: SCM_RIGHTS")
def test_close_while_a_send_waits_for_acknowledgements_raises_value_error(run: Run) -> None:
    """Not EBADF from writing to the closed socket (a review): the closed-channel error, as documented."""
    from fdchannel.transports import UnixRights

    async def main() -> None:
        a, b = AsyncChannel.pair(transport=UnixRights(acknowledge=True, window=2))
        r, w = os.pipe()
        try:
            await a.send(b"1", [r])
            await a.send(b"2", [r])  # the window is full: the next send polls for an acknowledgement
            sender = asyncio.create_task(a.send(b"3", [r]))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not sender.done()
            a.close()
            with pytest.raises(ValueError, match="closed"):
                await asyncio.wait_for(sender, TIMEOUT)
        finally:
            a.close()
            b.close()
            os.close(r)
            os.close(w)

    run(main())


class _Alarm(TimeoutError):
    """What a SIGALRM handler raises."""


def _strike_gate(at: str, gate: object) -> None:
    """Raise `_Alarm` where a signal handler runs as *gate* is handed over.

    ``leave``: at `_Gate.leave`'s first instruction (``leave-twice``: at the
    retry's too); ``set_result``: as the waiter's future was just woken (the
    end of that C call).  From trace and profile functions, which CPython
    calls with the running frame: the channel tells it for a handler's error.
    """
    if at == "set_result":

        def profile(frame: Any, event: str, arg: Any) -> None:
            if (
                event == "c_return"
                and getattr(arg, "__name__", "") == "set_result"
                and frame.f_code.co_name == "leave"
                and frame.f_locals.get("self") is gate
            ):
                sys.setprofile(None)
                raise _Alarm("a SIGALRM handler's timeout")

        sys.setprofile(profile)
        return

    def again(frame: Any, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_name == "leave" and frame.f_locals.get("self") is gate:
            sys.setprofile(None)
            raise _Alarm("a second SIGALRM handler's timeout")

    def tracer(frame: Any, event: str, arg: object) -> None:
        if frame.f_code.co_name == "leave" and frame.f_locals.get("self") is gate:
            sys.settrace(None)  # (CPython drops a tracer that raised: a profile function strikes again)
            if at == "leave-twice":
                sys.setprofile(again)
            raise _Alarm("a SIGALRM handler's timeout")

    sys.settrace(tracer)


def _stop_striking() -> None:
    sys.settrace(None)
    sys.setprofile(None)


@pytest.mark.parametrize("at", ["leave", "set_result", "leave-twice"])
def test_a_handlers_error_as_recv_hands_the_gate_over_neither_loses_nor_wedges(run: Run, at: str) -> None:
    """A review: the waiter was taken off the queue before it was woken, and never woken; the gate
    stayed taken, every later recv() waited for good."""

    async def main() -> None:
        a, b = AsyncChannel.pair()
        try:
            first = asyncio.create_task(a.recv())
            for _ in range(5):
                await asyncio.sleep(0)  # the first holds the gate, waiting for data
            second = asyncio.create_task(a.recv())
            for _ in range(5):
                await asyncio.sleep(0)  # the second waits for the gate
            assert a._recv_gate._waiters
            _strike_gate(at, a._recv_gate)
            try:
                await b.send(b"one")
                await b.send(b"two")
                done, _ = await asyncio.wait([first, second], timeout=TIMEOUT)
            finally:
                _stop_striking()
            assert len(done) == 2, "a recv() waits for a gate nobody holds"
            with pytest.raises(_Alarm):
                first.result()
            with pytest.raises(ProtocolError):  # ChannelBroken: the first call's message was lost
                second.result()
            assert not a._recv_gate.locked()
        finally:
            a.close()
            b.close()

    run(main())


@pytest.mark.parametrize("at", ["leave", "set_result", "leave-twice"])
def test_a_handlers_error_as_send_hands_the_gate_over_neither_hides_nor_wedges(run: Run, at: str) -> None:
    """The send that left whole says so (characters_written), and the waiting sender goes on."""

    async def main() -> None:
        a, b = AsyncChannel.pair()
        big = b"z" * (4 << 20)  # more than the socket holds: the first send waits for the reader
        try:
            first = asyncio.create_task(a.send(big))
            for _ in range(5):
                await asyncio.sleep(0)
            second = asyncio.create_task(a.send(b"second"))
            for _ in range(5):
                await asyncio.sleep(0)
            assert a._send_gate._waiters
            _strike_gate(at, a._send_gate)
            try:
                with await asyncio.wait_for(b.recv(), TIMEOUT) as msg:
                    assert len(msg.payload) == len(big)
                done, _ = await asyncio.wait([first], timeout=TIMEOUT)
            finally:
                _stop_striking()
            assert done
            with await asyncio.wait_for(b.recv(), TIMEOUT) as msg:
                assert msg.payload == b"second"
            await asyncio.wait_for(second, TIMEOUT)
            with pytest.raises(_Alarm) as info:
                first.result()
            assert info.value.characters_written == 24 + len(big)  # type: ignore[attr-defined]
            assert not a._send_gate.locked()
        finally:
            a.close()
            b.close()

    run(main())


def test_unread_messages_are_closed_with_the_channel(run: Run) -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        r, w = os.pipe()
        async with a:
            await a.send(b"1", fds=[w])
            await a.send(b"2", fds=[w])
            os.close(w)
            async with b:
                assert (await b.recv()).close() is None  # read both into the buffer
            # The sender closes only now: a pull transport (WinDuplicate)
            # keeps its duplicates until the receiver took them or is gone.
        # b held the second message's fd; closing b closed it.
        assert read_fd(r, 1) == b""
        os.close(r)

    run(main())


def test_bound_to_one_loop(apair: APair) -> None:
    a, b = apair()

    async def bounded(coro: Coroutine[Any, Any, T]) -> T:
        async with asyncio.timeout(TIMEOUT):
            return await coro

    try:
        with asyncio.Runner() as first, asyncio.Runner() as second:
            first.run(bounded(a.send(b"one", fds=[0])))
            first.run(bounded(a.send(b"two", fds=[1])))
            with first.run(bounded(b.recv())) as msg:
                assert msg.payload == b"one"
            # Another loop is refused whether or not a message is buffered,
            # and nothing is lost or broken by the refusal.
            with pytest.raises(RuntimeError, match="another event loop"):
                second.run(bounded(b.recv()))
            with pytest.raises(RuntimeError, match="another event loop"):
                second.run(bounded(a.send(b"three")))
            with first.run(bounded(b.recv())) as msg:
                assert msg.payload == b"two"
                assert len(msg.fds) == 1
        # Both loops are closed now: a new one takes the channels over.
        with asyncio.Runner() as third:
            third.run(bounded(a.send(b"three", fds=[2])))
            with third.run(bounded(b.recv())) as msg:
                assert (msg.payload, len(msg.fds)) == (b"three", 1)

            async def wait_then_send() -> bytes:
                waiting = asyncio.create_task(b.recv())  # waits on the new loop
                await asyncio.sleep(0)
                await a.send(b"four")
                return bytes((await waiting).payload)

            assert third.run(bounded(wait_then_send())) == b"four"
    finally:
        a.close()
        b.close()


def test_a_channel_moves_to_the_next_loop_once_its_loop_is_closed() -> None:
    a, b = AsyncChannel.pair()

    async def two_receivers() -> list[bytes]:
        async with asyncio.timeout(TIMEOUT):
            first = asyncio.create_task(b.recv())
            second = asyncio.create_task(b.recv())
            await asyncio.sleep(0)  # both wait: the receive lock is contended on this loop
            await a.send(b"1")
            await a.send(b"2")
            return sorted([bytes((await first).payload), bytes((await second).payload)])

    try:
        for _ in range(2):  # as two asyncio.run() calls in a row
            with asyncio.Runner() as runner:
                assert runner.run(two_receivers()) == [b"1", b"2"]
    finally:
        a.close()
        b.close()


def test_flush_first_on_the_next_loop_finishes_what_the_closed_one_left() -> None:
    a, b = AsyncChannel.pair()
    big = bytes(4 << 20)  # far more than the socket holds

    async def on_the_first_loop() -> None:
        sending = asyncio.create_task(a.send(big))
        while not a.pending:  # taken, the rest waits for room
            await asyncio.sleep(0)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending

    async def on_the_next_loop() -> None:
        async with asyncio.timeout(TIMEOUT):
            flushes = [asyncio.create_task(a.flush()) for _ in range(2)]  # both wait for room
            await asyncio.sleep(0)
            assert len((await b.recv()).payload) == len(big)
            await asyncio.gather(*flushes)
            assert not a.pending

    try:
        with asyncio.Runner() as runner:
            runner.run(on_the_first_loop())
        with asyncio.Runner() as runner:
            runner.run(on_the_next_loop())
    finally:
        a.close()
        b.close()


# -- concurrency ------------------------------------------------------------------


def test_concurrent_senders_never_interleave(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()
        r, w = os.pipe()

        async def sender(tag: int) -> None:
            for i in range(20):
                # Large enough to need many writes, with enough fds for
                # several batches: any interleaving would corrupt the stream.
                await a.send(bytes([tag]) * (100_000 + i), fds=[w] * (300 + tag))

        async def receiver() -> list[tuple[int, int]]:
            got = []
            for _ in range(80):
                with await b.recv() as msg:
                    tag = msg.payload[0]
                    assert msg.payload == bytes([tag]) * len(msg.payload)
                    assert len(msg.fds) == 300 + tag
                    got.append((tag, len(msg.payload)))
            return got

        async with a, b:
            got, *_ = await asyncio.gather(receiver(), *(sender(t) for t in range(4)))
        for tag in range(4):  # per sender, in order
            assert [n for t, n in got if t == tag] == [100_000 + i for i in range(20)]
        os.close(r)
        os.close(w)

    # A bound against hangs, not a timing check: under Wine the 80 messages
    # duplicate 24,000 handles, 12-19 s measured, 30.7 s once on a slow run.
    run(main(), timeout=120)


def test_concurrent_receivers_never_split_a_message(run: Run, apair: APair) -> None:
    async def main() -> None:
        a, b = apair()

        total: list[int] = []
        all_seen = asyncio.Event()

        async def receiver() -> list[bytes]:
            got = []
            async for msg in b:
                with msg:
                    assert len(msg.fds) == 2
                    assert msg.payload == msg.payload[:1] * len(msg.payload)
                    got.append(bytes(msg.payload))
                total.append(1)
                if len(total) == 60:
                    all_seen.set()
            return got

        async def sender() -> None:
            for i in range(60):
                await a.send(bytes([i]) * (50_000 + 997 * i), fds=[0, 1])
            await all_seen.wait()
            await a.aclose()

        async with b:
            r1, r2, _ = await asyncio.gather(receiver(), receiver(), sender())
        assert sorted(x[0] for x in r1 + r2) == list(range(60))

    run(main())


# -- real processes -----------------------------------------------------------------


def _child_async(kind: str, body: Callable[[], Any]) -> int:
    """Fork a child that runs coroutine function *body* on a fresh loop of *kind*."""
    return fork_child(lambda: run_on(kind, body()))


@needs_fork
def test_fork_async_parent_blocking_child(run: Run, loop_kind: str) -> None:
    parent, child = Channel.pair()
    r, w = os.pipe()

    def body() -> None:
        parent.close()
        child.settimeout(10)
        with child.recv() as msg:
            os.write(msg.fds[0].fileno(), msg.payload[::-1])
        child.send(b"done", fds=[msg.payload and 1])

    pid = fork_child(body)
    child.close()

    async def main() -> None:
        ch = AsyncChannel.from_channel(parent)
        async with ch:
            await ch.send(b"olleh", fds=[w])
            with await ch.recv() as reply:
                assert reply.payload == b"done"
                assert ident(reply.fds[0]) == ident(1)

    try:
        run(main())
        assert os.read(r, 5) == b"hello"
    finally:
        os.close(r)
        os.close(w)
        parent.close()
        assert wait_child(pid) == 0


@needs_fork
def test_fork_blocking_parent_async_child(loop_kind: str) -> None:
    parent, child = Channel.pair()
    r, w = os.pipe()

    async def child_main() -> None:
        parent.close()
        async with AsyncChannel.from_channel(child) as ch:
            async for msg in ch:
                with msg:
                    os.write(msg.fds[0].fileno(), msg.payload)
                await ch.send(b"ack")

    pid = _child_async(loop_kind, child_main)
    child.close()
    try:
        parent.settimeout(10)
        for i in range(50):
            parent.send(b"%d," % i, fds=[w])
            assert parent.recv().payload == b"ack"
        parent.close()
        os.close(w)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        assert data == b"".join(b"%d," % i for i in range(50))
    finally:
        os.close(r)
        if not parent.closed:
            parent.close()
        assert wait_child(pid) == 0


@needs_fork
def test_peer_death_mid_message_and_between(run: Run) -> None:
    parent, child = Channel.pair()
    r, w = os.pipe()

    def body() -> None:
        parent.close()
        child.send(b"whole", fds=[w])
        # A frame cut short: header declares 1000 bytes, 10 arrive, then death.
        os.write(child.fileno(), pack_header(0, 0, 0, 1000) + b"x" * 10)
        os._exit(0)

    pid = fork_child(body)
    child.close()
    os.close(w)

    async def main() -> None:
        async with AsyncChannel.from_channel(parent) as ch:
            with await ch.recv() as msg:
                assert msg.payload == b"whole"
            with pytest.raises(ProtocolError, match="middle"):
                await ch.recv()

    try:
        run(main())
    finally:
        os.close(r)
        assert wait_child(pid) == 0


def test_send_to_dead_peer_is_broken_pipe(run: Run) -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        b.close()
        async with a:
            if sys.platform != "win32":
                with pytest.raises(BrokenPipeError):
                    await a.send(b"x" * 1000, fds=[0])
                return
            # TCP on loopback: the first send may still be taken; the peer's
            # reset fails a later one, as ConnectionResetError (or aborted).
            with pytest.raises((BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
                for _ in range(100):
                    await a.send(b"x" * 1000, fds=[0])
                    await asyncio.sleep(0.01)

    run(main())


@pytest.mark.skipif(
    sys.platform == "win32", reason="needs os.fork(), SCM_RIGHTS and RLIMIT_NOFILE, which Windows lacks"
)
def test_msg_ctrunc_in_child_at_fd_limit(loop_kind: str) -> None:
    a, b = AsyncChannel.pair()

    async def child_main() -> None:
        a.close()
        try:
            # Room for two more fds: the message's 5 cannot all be installed
            # and the kernel sets MSG_CTRUNC.
            limit_fds_to_free_slots(2)
            with pytest.raises(TruncatedControlData):
                await b.recv()
            with pytest.raises(ProtocolError, match="unusable"):
                await b.recv()
            # The fds that did arrive were closed: both slots are free again.
            for _ in range(2):
                os.open(os.devnull, os.O_RDONLY)  # the child exits: no need to close
        finally:
            b.close()

    pid = _child_async(loop_kind, child_main)

    async def main() -> None:
        async with a:
            await a.send(b"too many", fds=[0, 1, 2, 0, 1])

    try:
        b.close()
        run_on(loop_kind, main())
    finally:
        a.close()
        assert wait_child(pid) == 0


def test_subprocess_with_uvloop_or_default_loop(loop_kind: str) -> None:
    """A separate interpreter receives fds from an async parent and answers."""
    script = textwrap.dedent(
        """
        import asyncio, os, socket, sys
        from fdchannel.aio import AsyncChannel

        async def main():
            if sys.argv[1] == "share":  # Windows: a socket.share() blob on stdin
                fd = socket.fromshare(sys.stdin.buffer.read()).detach()
            else:
                fd = int(sys.argv[1])
            async with AsyncChannel.from_fd(fd) as ch:
                async for msg in ch:
                    with msg:
                        os.write(msg.fds[0].fileno(), msg.payload.upper())
                    await ch.send(b"ok")

        if sys.argv[2] == "uvloop":
            import uvloop
            factory = uvloop.new_event_loop
        elif sys.argv[2] == "selector":  # Windows' other loop
            factory = asyncio.SelectorEventLoop
        else:
            factory = asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
        """
    )
    mine, theirs = stream_socketpair()
    r, w = os.pipe()
    if sys.platform == "win32":
        # No pass_fds, and a SOCKET does not survive inheritance under Wine:
        # the child gets a socket.share() blob (as in test_channel_from_fd.py).
        proc = subprocess.Popen([sys.executable, "-c", script, "share", loop_kind], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        with proc.stdin:
            proc.stdin.write(theirs.share(proc.pid))
    else:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(theirs.fileno()), loop_kind], pass_fds=[theirs.fileno()]
        )
    theirs.close()

    async def main() -> None:
        async with AsyncChannel(mine) as ch:
            for word in (b"abc", b"def"):
                await ch.send(word, fds=[w])
                assert (await ch.recv()).payload == b"ok"

    try:
        run_on(loop_kind, main())
        os.close(w)
        got = b""
        while len(got) < 6 and (chunk := read_fd(r, 100)):
            got += chunk
        assert got == b"ABCDEF"
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- from_channel ------------------------------------------------------------------


def test_from_channel_takes_buffered_messages_and_pending_send(run: Run) -> None:
    a, b = Channel.pair()
    r, w = os.pipe()
    a.send(b"first", fds=[w])
    a.send(b"second", fds=[w])
    with b.recv() as m:  # reads both into b's buffer
        assert m.payload == b"first"
    # A non-blocking send that fills the socket leaves a remainder pending.
    a.setblocking(False)
    big = b"B" * (4 * 1024 * 1024)
    with pytest.raises(BlockingIOError) as info:
        a.send(big, fds=[w])
    assert info.value.characters_written > 0  # type: ignore[attr-defined]
    assert a.pending
    os.close(w)

    async def main() -> None:
        aa = AsyncChannel.from_channel(a)
        bb = AsyncChannel.from_channel(b)
        assert a.closed
        assert b.closed
        a.close()  # a no-op now: the socket is aa's
        with pytest.raises(ValueError, match="closed"):
            b.recv()
        async with aa, bb:
            assert aa.pending
            with await bb.recv() as m2:
                assert m2.payload == b"second"
                writes_into(m2.fds, r)
            receiver = asyncio.create_task(bb.recv())
            await aa.flush()
            assert not aa.pending
            with await receiver as m3:
                assert m3.payload == big
                writes_into(m3.fds, r)

    try:
        run(main())
    finally:
        os.close(r)


def test_from_channel_refuses_closed(run: Run) -> None:
    a, b = Channel.pair()
    a.close()
    with pytest.raises(ValueError, match="closed"):
        AsyncChannel.from_channel(a)
    b.close()


def test_from_fd_rejects_non_socket() -> None:
    r, w = os.pipe()
    try:
        if sys.platform == "win32":
            import msvcrt

            # from_fd takes a SOCKET value there: give it the pipe's handle,
            # not a CRT fd number that may or may not happen to be a handle.
            with pytest.raises(OSError) as info:
                AsyncChannel.from_fd(msvcrt.get_osfhandle(r))
            # Wine answers getsockopt on a handle that is no socket with
            # WSAEOPNOTSUPP, Windows itself with WSAENOTSOCK.
            assert info.value.errno in (errno.ENOTSOCK, errno.WSAEOPNOTSUPP)
        else:
            with pytest.raises(OSError) as info:
                AsyncChannel.from_fd(r)
            assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)


def test_unclosed_channel_warns() -> None:
    a, b = AsyncChannel.pair()
    a.close()
    with pytest.warns(ResourceWarning, match="unclosed"):
        del b  # no reference cycle: collected (and warned about) at once


def test_always_ready_peer_does_not_starve_the_loop(run: Run) -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        async with a, b:
            for _ in range(200):  # all queued in the socket before reading
                await a.send(b"x", fds=[0])
            ticking = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            start = ticks
            for _ in range(200):
                (await b.recv()).close()  # never has to wait
            ticking.cancel()
            # The receiver yielded now and then (every 64 operations).
            assert ticks - start >= 200 // 64 - 1

    run(main())
