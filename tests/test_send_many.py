"""`Channel.send_many` and the decoder's groups: many messages in one write, fds in order."""

# The `run` fixture is imported, and each asyncio test takes it as a parameter.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from fdchannel import Channel, ProtocolError
from fdchannel._codec import FLAG_GROUP, HEADER_SIZE, Decoder, header_tag, pack_header, pack_tagged
from fdchannel.aio import AsyncChannel

from ._aio import loop_kind, run  # noqa: F401 - fixtures
from ._portable import in_thread, join_clean, more_than_a_socket_holds
from ._transports import PairFactory, needs_unix_rights

TIMEOUT = 10.0
Runner = Callable[..., Any]  # the `run` fixture


def _pair(make_pair: PairFactory) -> tuple[Channel, Channel]:
    a, b = make_pair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return a, b


def test_messages_arrive_in_order_with_their_fds(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    r, w = os.pipe()
    with a, b:
        # A thread sends: a duplication transport waits for acknowledgements.
        t = in_thread(a.send_many, [(b"m%d" % i, [r, w][: i % 3]) for i in range(100)])
        for i in range(100):
            with b.recv() as msg:
                assert msg.payload == b"m%d" % i
                assert len(msg.fds) == i % 3
        join_clean(t)
    os.close(r)
    os.close(w)


@needs_unix_rights
def test_one_write_carries_many_one_fd_messages() -> None:
    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    with raw, Channel(theirs) as a:
        a.send_many([(b"x", [r])] * 64)
        data, fds, _flags, _ = socket.recv_fds(raw, 1 << 16, 253)
        # The kernel hands all fds of one write to its first read, and never
        # lets a read span two writes that carry fds: one read, all of it.
        assert len(data) == 64 * (HEADER_SIZE + 1)
        assert len(fds) == 64
        for fd in fds:
            os.close(fd)
    os.close(r)
    os.close(w)


def test_three_coalesced_60000_byte_frames_with_fds(make_pair: PairFactory) -> None:
    """The issue's case: frames larger than a read, their fds all on the first one."""
    a, b = _pair(make_pair)
    r, w = os.pipe()
    payloads = [bytes([i]) * 60_000 for i in range(3)]
    with a, b:
        t = in_thread(a.send_many, [(p, [r]) for p in payloads])
        for p in payloads:
            with b.recv() as msg:
                assert msg.payload == p
                assert len(msg.fds) == 1
        join_clean(t)
    os.close(r)
    os.close(w)


@needs_unix_rights
def test_a_message_with_more_fds_than_one_write_goes_on_its_own() -> None:
    # (Over the default transport: an acknowledged window smaller than the
    # message never lets it go, with send() as with send_many().)
    a, b = _pair(Channel.pair)
    r, w = os.pipe()
    with a, b:
        t = in_thread(a.send_many, [(b"before", [r]), (b"many", [w] * 300), (b"after", [r, w])])
        for n in (1, 300, 2):
            with b.recv() as msg:
                assert len(msg.fds) == n
        join_clean(t)
    os.close(r)
    os.close(w)


def test_a_bad_message_is_refused_before_anything_is_written(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    with a, b:
        with pytest.raises(ValueError, match="invalid file descriptor"):
            a.send_many([(b"fine", []), (b"bad", [-1])])
        b.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            b.recv()
        a.send(b"next")
        b.settimeout(TIMEOUT)
        assert b.recv().payload == b"next"


def test_a_full_socket_says_how_many_messages_were_taken(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    messages: list[tuple[bytes, list[int]]] = [(bytes([i % 256]) * 50_000, []) for i in range(200)]
    with a, b:
        a.settimeout(0.0)
        with pytest.raises(BlockingIOError) as info:
            a.send_many(messages)
        taken: int = info.value.messages_taken  # type: ignore[attr-defined]
        assert 0 < taken < len(messages)
        got: list[bytes] = []

        def drain() -> None:
            while len(got) < len(messages):
                got.append(bytes(b.recv().payload))

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        a.settimeout(TIMEOUT)
        a.flush()
        a.send_many(messages[taken:])
        reader.join(TIMEOUT)
        assert not reader.is_alive()
        assert got == [p for p, _ in messages]


@needs_unix_rights
@pytest.mark.parametrize("call", ["send", "send_many"])
def test_a_bytearray_left_pending_can_change_while_the_error_is_handled(call: str) -> None:
    """The rest of a taken message is copied: the caller's buffers are free as the call raises.

    An exception's traceback keeps the frames of the call; the views of the
    caller's bytearrays they held kept those from resizing (BufferError)
    until the exception went.
    """
    a, b = Channel.pair()
    with a, b:
        b.settimeout(TIMEOUT)
        a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        given = [bytearray(bytes([i]) * 40_000) for i in range(5)]
        sent = [bytes(p) for p in given]
        a.settimeout(0.0)
        with pytest.raises(BlockingIOError) as info:
            a.send(given[0]) if call == "send" else a.send_many([(p, []) for p in given])
        taken = 1 if call == "send" else info.value.messages_taken  # type: ignore[attr-defined]
        assert taken >= 1
        assert info.value.characters_written > 0
        for p in given:
            p[:] = b"changed"  # BufferError if still borrowed
        got: list[bytes] = []
        reader = in_thread(lambda: got.extend(bytes(b.recv().payload) for _ in range(taken)))
        a.settimeout(TIMEOUT)
        a.flush()
        join_clean(reader)
        assert got == sent[:taken]


# -- the decoder's rules for groups --------------------------------------------------


def _decoder(max_fds: int = 1024) -> Decoder:
    return Decoder(wire_id=0, in_band=True, max_payload=1 << 20, max_fds=max_fds, max_aux=0)


def _feed(dec: Decoder, data: bytes, fds: list[int], chunk: int = 1 << 16) -> None:
    """Reads of at most *chunk* bytes, the fds with the first (as the kernel hands them)."""
    view = memoryview(data)
    while view:
        buf = dec.get_buffer()
        n = min(len(buf), len(view), chunk)
        buf[:n] = view[:n]
        dec.buffer_updated(n, fds)
        fds = []
        view = view[n:]


def _grouped(payloads: list[bytes], nfds: list[int]) -> bytes:
    tag = header_tag(0)
    out = b""
    for i, (p, n) in enumerate(zip(payloads, nfds, strict=True)):
        flagged = any(nfds[i + 1 :])
        out += pack_tagged(tag | (FLAG_GROUP << 48) if flagged else tag, n, 0, len(p)) + p
    return out


def test_decoder_gives_each_frame_of_a_group_its_fds_in_order() -> None:
    dec = _decoder()
    data = _grouped([b"a" * 60_000, b"b" * 60_000, b"c" * 60_000], [1, 2, 1])
    _feed(dec, data, [10, 11, 12, 13])
    frames = [dec.next_frame() for _ in range(3)]
    assert [f.fds for f in frames if f is not None] == [[10], [11, 12], [13]]
    assert dec.at_boundary


def test_decoder_still_refuses_fds_ahead_without_the_group_flag() -> None:
    dec = _decoder()
    tag = header_tag(0)
    data = b"".join(pack_tagged(tag, 1, 0, 60_000) + bytes(60_000) for _ in range(3))
    _feed(dec, data, [10, 11, 12])
    delivered: list[int] = []
    with pytest.raises(ProtocolError, match="more fds arrived than the frame declared"):
        # A frame that came whole before the surplus was seen is delivered
        # (whether the first did depends on how much the first read took).
        while (frame := dec.next_frame()) is not None:
            assert frame.fds == [10]
            delivered += frame.fds
    assert sorted(delivered + dec.take_fds()) == [10, 11, 12]


def test_decoder_bounds_the_fds_a_group_frame_may_hold_ahead() -> None:
    dec = _decoder()
    header = pack_header(0, 1, 0, 1 << 19, control=False)
    flagged = header[:6] + FLAG_GROUP.to_bytes(2, "little") + header[8:]
    buf = dec.get_buffer()
    buf[: len(flagged)] = flagged
    dec.buffer_updated(len(flagged), list(range(100, 353)))  # one write's worth ahead: allowed
    assert dec.error is None
    buf = dec.get_buffer()
    buf[0] = 0
    dec.buffer_updated(1, list(range(400, 410)))  # more than that: refused
    assert isinstance(dec.error, ProtocolError)
    assert len(dec.take_fds()) == 263


def test_a_control_frame_may_not_be_grouped() -> None:
    dec = _decoder()
    header = pack_header(0, 0, 0, 0, control=True)
    bad = header[:6] + (1 | FLAG_GROUP).to_bytes(2, "little") + header[8:]
    _feed(dec, bad, [])
    with pytest.raises(ProtocolError, match="malformed control frame"):
        dec.next_frame()


# -- AsyncChannel.send_many ------------------------------------------------------------


def test_async_send_many_arrives_in_order_with_its_fds(run: Runner) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair()
        r, w = os.pipe()
        async with a, b:
            sender = asyncio.create_task(a.send_many([(b"m%d" % i, [r, w][: i % 3]) for i in range(100)]))
            for i in range(100):
                with await b.recv() as msg:
                    assert msg.payload == b"m%d" % i
                    assert len(msg.fds) == i % 3
            await sender
        os.close(r)
        os.close(w)

    run(body())


@needs_unix_rights
def test_async_send_many_is_one_write(run: Runner) -> None:
    async def body() -> None:
        raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r, w = os.pipe()
        with raw:
            async with AsyncChannel(theirs) as a:
                await a.send_many([(b"x", [r])] * 64)
                data, fds, _flags, _ = socket.recv_fds(raw, 1 << 16, 253)
                assert len(data) == 64 * (HEADER_SIZE + 1)
                assert len(fds) == 64
                for fd in fds:
                    os.close(fd)
        os.close(r)
        os.close(w)

    run(body())


def test_a_cancelled_async_send_many_says_how_many_were_taken(run: Runner) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair()
        messages: list[tuple[bytes, list[int]]] = [(bytes([i % 256]) * 50_000, []) for i in range(200)]
        async with a, b:
            task = asyncio.create_task(a.send_many(messages))
            while not a.pending:  # until the socket is full and the rest waits
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await task
            taken: int = info.value.messages_taken  # type: ignore[attr-defined]
            assert 0 < taken < len(messages)
            got: list[bytes] = []

            async def drain() -> None:
                while len(got) < len(messages):
                    got.append(bytes((await b.recv()).payload))

            reader = asyncio.create_task(drain())
            await a.flush()
            await a.send_many(messages[taken:])
            await reader
            assert got == [p for p, _ in messages]

    run(body())


@pytest.mark.parametrize("call", ["send", "send_many"])
def test_a_payload_waiting_its_turn_cannot_be_resized_under_its_header(run: Runner, call: str) -> None:
    """Another task grows a bytearray whose send waits for the gate: refused, the stream intact.

    Its size was read as the call began; before, the grown buffer went out
    under the old header and the reader's next frame began inside it.
    """

    async def body() -> None:
        a, b = AsyncChannel.pair()
        big = bytes(range(256)) * (more_than_a_socket_holds(1 << 20) // 256)  # its send waits
        given = bytearray(b"hello")
        async with a, b:
            first = asyncio.create_task(a.send(big))
            while not a.pending:
                await asyncio.sleep(0.001)
            second = asyncio.create_task(a.send(given) if call == "send" else a.send_many([(given, [])]))
            while not a._send_gate._waiters:
                await asyncio.sleep(0.001)
            with pytest.raises(BufferError):
                given.extend(b" world")
            got = [bytes((await b.recv()).payload) for _ in range(2)]
            await first
            await second
            assert got == [big, b"hello"]
            given.extend(b" again")  # free once the call is over

    run(body())


@pytest.mark.parametrize("call", ["send", "send_many"])
def test_a_call_refused_by_a_broken_channel_leaves_the_payload_free(run: Runner, call: str) -> None:
    """The caller may resize its bytearray while it handles the refusal (the asyncio
    send_many held it until the exception went: the check came before its release)."""

    async def body() -> None:
        a, b = AsyncChannel.pair()
        async with a, b:
            b._sock.send(b"garbage that is no frame header: a's next recv breaks the channel")
            with pytest.raises(ProtocolError, match="bad magic"):
                await a.recv()
            given = bytearray(b"hello")
            with pytest.raises(ProtocolError, match="unusable") as info:
                await (a.send(given) if call == "send" else a.send_many([(given, [])]))
            given.extend(b" world")  # free while the error (and the call's frame) is still in hand
            del info

    run(body())


@pytest.mark.parametrize("call", ["send", "send_many"])
def test_a_blocking_call_refused_by_a_broken_channel_leaves_the_payload_free(call: str) -> None:
    a, b = Channel.pair()
    with a, b:
        b._sock.send(b"garbage that is no frame header: a's next recv breaks the channel")
        a.settimeout(10)
        with pytest.raises(ProtocolError, match="bad magic"):
            a.recv()
        given = bytearray(b"hello")
        with pytest.raises(ProtocolError, match="unusable") as info:
            a.send(given) if call == "send" else a.send_many([(given, [])])
        given.extend(b" world")  # free while the error (and the call's frame) is still in hand
        del info
