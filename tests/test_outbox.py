"""The sans-IO send side on its own: frames to chunks and every partial-write rule, without sockets.

A simulated writer takes any number of bytes per write (hypothesis picks
them); the bytes it collects must decode to exactly the frames queued, with
each fd batch attached once, to a byte of its own frame.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdchannel import ChannelBroken, ProtocolError
from fdchannel._codec import HEADER_SIZE, SCM_MAX_FD, Decoder
from fdchannel._outbox import Chunk, Outbox, split_batches

from ._proc import needs_rlimit

WIRE_ID = 0


class Writer:
    """A peer that takes at most ``sizes[i]`` bytes on the i-th write (0: full)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)
        self.data = bytearray()
        #: (stream offset of the byte the fds rode on, fds)
        self.fds: list[tuple[int, list[int]]] = []

    def write(self, outbox: Outbox) -> int:
        """One write of the head chunk, as a kernel would take it."""
        chunk = outbox.head()
        assert chunk is not None
        room = self.sizes.pop(0) if self.sizes else 1 << 30
        data = b"".join(bytes(memoryview(b).cast("B")) for b in chunk.bufs)[:room]
        if not data:
            return 0
        if chunk.fds:
            self.fds.append((len(self.data), list(chunk.fds)))
        self.data += data
        outbox.wrote(len(data))
        return len(data)

    def drain(self, outbox: Outbox, limit: int = 10_000) -> int:
        written = 0
        for _ in range(limit):
            if outbox.head() is None:
                return written
            written += self.write(outbox)
        raise AssertionError("the outbox never drained")


def queue_message(outbox: Outbox, payload: bytes, fds: list[int]) -> None:
    aux = bytes(max(0, -(-len(fds) // SCM_MAX_FD) - HEADER_SIZE))
    bufs = outbox.frame(aux, len(fds), payload, len(payload))
    outbox.add_frame(bufs, fds, payload, len(payload))


def decode(writer: Writer, max_fds: int = 10_000) -> list[tuple[bytes, list[int]]]:
    """Feed what the writer collected into a real Decoder, read by read at the fd boundaries."""
    decoder = Decoder(
        wire_id=WIRE_ID, in_band=True, max_payload=1 << 24, max_fds=max_fds, max_aux=64, lone_frames=False
    )
    data = bytes(writer.data)
    cuts = sorted({0, len(data), *(off for off, _ in writer.fds)})
    fds_at = dict(writer.fds)
    for start, end in itertools.pairwise(cuts):
        pos = start
        while pos < end:
            buf = decoder.get_buffer()
            n = min(len(buf), end - pos)
            buf[:n] = data[pos : pos + n]
            decoder.buffer_updated(n, fds_at.pop(start, []) if pos == start else [])
            pos += n
    decoder.receive_eof()
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append((bytes(frame.payload), frame.fds))
    return out


messages = st.lists(
    st.tuples(st.binary(max_size=600), st.integers(min_value=0, max_value=600)), min_size=1, max_size=4
)
write_sizes = st.lists(st.integers(min_value=0, max_value=700), max_size=60)


@settings(max_examples=300, deadline=None)
@given(messages, write_sizes)
def test_any_partial_writes_deliver_every_frame_once(msgs: list[tuple[bytes, int]], sizes: list[int]) -> None:
    outbox = Outbox(WIRE_ID)
    expected = []
    next_fd = 1000
    for payload, nfds in msgs:
        fds = list(range(next_fd, next_fd + nfds))
        next_fd += nfds
        queue_message(outbox, payload, fds)
        expected.append((payload, fds))
    writer = Writer(sizes)
    writer.drain(outbox)
    # Every batch rode on a byte of its own, at most SCM_MAX_FD fds each.
    assert all(0 < len(batch) <= SCM_MAX_FD for _, batch in writer.fds)
    assert len({off for off, _ in writer.fds}) == len(writer.fds)
    assert decode(writer) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000), st.integers(min_value=0, max_value=800), write_sizes)
def test_a_paused_message_is_taken_once_anything_left(payload: bytes, nfds: int, sizes: list[int]) -> None:
    """paused(): characters_written is what left; 0 means nothing stays queued, more means the rest
    is detached and completes the frame later."""
    r, w = os.pipe()
    try:
        fds = [w] * nfds
        outbox = Outbox(WIRE_ID)
        queue_message(outbox, payload, fds)
        writer = Writer(sizes)
        written = 0
        # Write until the simulated socket is full (a 0-byte write), then stop waiting.
        while outbox.head() is not None:
            n = writer.write(outbox)
            if not n:
                break
            written += n
        exc = BlockingIOError(errno.EAGAIN, "full")
        assert outbox.paused(exc, 0, written) is None
        assert exc.characters_written == written
        if not written:
            assert not outbox.pending  # not taken: nothing of it stays behind
            return
        # Taken: the rest owns its bytes and fds; the caller's may go now.
        for chunk in outbox.pending:
            assert len(chunk.bufs) == 1
            assert chunk.bufs[0].__class__ is bytes
            assert not chunk.fds or chunk.owns_fds
        writer.sizes = []
        writer.drain(outbox)
        got = decode(writer)
        assert [(p, len(f)) for p, f in got] == [(payload, nfds)]
        # The duplicates rode on bytes that left (the kernel would hold its own
        # reference now): the outbox has closed them already.
        for fd in got[0][1]:
            if fd != w:
                with pytest.raises(OSError) as info:
                    os.fstat(fd)
                assert info.value.errno == errno.EBADF  # (Windows words it "Invalid handle")
    finally:
        os.close(r)
        os.close(w)


def test_paused_while_flushing_counts_this_call_only() -> None:
    outbox = Outbox(WIRE_ID)
    queue_message(outbox, b"x" * 100, [])
    writer = Writer([30, 0])
    written = writer.write(outbox)
    exc = TimeoutError("timed out")
    assert outbox.paused(exc, None, written) is None
    assert exc.characters_written == 30  # type: ignore[attr-defined]
    assert outbox.pending


def test_a_cancelled_message_before_any_byte_is_not_taken() -> None:
    outbox = Outbox(WIRE_ID)
    queue_message(outbox, b"payload", [0, 1, 2])
    exc = asyncio.CancelledError()
    assert outbox.paused(exc, 0, 0) is None
    assert exc.characters_written == 0  # type: ignore[attr-defined]
    assert not outbox.pending


@pytest.fixture
def few_free_fds() -> Iterator[None]:
    """RLIMIT_NOFILE lowered to the fds open now: the next dup() fails with EMFILE."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    # Fill every gap below the limit first, so no slot is left.
    fillers = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@needs_rlimit
def test_a_rest_that_cannot_be_kept_breaks_the_channel_locally(few_free_fds: None) -> None:
    outbox = Outbox(WIRE_ID)
    # Two batches: the first rides on the byte that leaves, the second must be kept.
    queue_message(outbox, b"y" * 100, [0] * (SCM_MAX_FD + 1))
    writer = Writer([1])
    written = writer.write(outbox)
    exc = BlockingIOError(errno.EAGAIN, "full")
    broken = outbox.paused(exc, 0, written)
    assert isinstance(broken, ChannelBroken)
    assert isinstance(broken, ProtocolError)  # existing except clauses keep working
    assert isinstance(broken.__cause__, OSError)
    assert broken.__cause__.errno == errno.EMFILE
    assert broken.__cause__.characters_written == 1  # type: ignore[attr-defined]
    assert not outbox.pending


@pytest.mark.parametrize(
    ("exc", "corrupt"),
    [
        (BrokenPipeError(errno.EPIPE, "gone"), False),
        (ConnectionResetError(errno.ECONNRESET, "reset"), False),
        (OSError(errno.ENOBUFS, "no buffer space"), True),
    ],
)
def test_a_failed_write_mid_frame_corrupts_unless_the_peer_is_gone(exc: OSError, corrupt: bool) -> None:
    outbox = Outbox(WIRE_ID)
    queue_message(outbox, b"z" * 100, [])
    Writer([40]).write(outbox)
    broken = outbox.failed(exc, 0, 40)
    assert exc.characters_written == 40  # type: ignore[attr-defined]
    assert not outbox.pending
    assert (broken is not None) == corrupt
    if broken is not None:
        assert isinstance(broken, ChannelBroken)
        assert broken.__cause__ is exc


def test_a_failure_with_nothing_queued_breaks_nothing() -> None:
    outbox = Outbox(WIRE_ID)
    assert outbox.failed(OSError(errno.EIO, "io"), None, 0) is None


def test_an_interrupt_inside_a_write_breaks_the_stream() -> None:
    outbox = Outbox(WIRE_ID)
    queue_message(outbox, b"w" * 10, [])
    exc = KeyboardInterrupt()
    broken = outbox.interrupted(exc)
    assert isinstance(broken, ChannelBroken)
    assert broken.__cause__ is exc
    assert "unknown" in str(broken)
    assert not outbox.pending


def test_discard_closes_only_owned_fds() -> None:
    r, w = os.pipe()
    dup = os.dup(w)
    outbox = Outbox(WIRE_ID)
    outbox.pending.append(Chunk([b"a"], [w]))  # borrowed: the caller's
    outbox.pending.append(Chunk([b"b"], [dup], owns_fds=True))
    outbox.discard()
    os.fstat(w)  # still open
    with pytest.raises(OSError) as info:
        os.fstat(dup)
    assert info.value.errno == errno.EBADF  # (Windows words it "Invalid handle")
    os.close(r)
    os.close(w)


def test_control_frames_own_their_bytes_and_go_in_order() -> None:
    outbox = Outbox(WIRE_ID)
    outbox.add_control([b"ack1", b"ack2"])
    writer = Writer([5, 3])
    writer.drain(outbox)
    decoder = Decoder(wire_id=WIRE_ID, in_band=True, max_payload=100, max_fds=0, max_aux=0)
    buf = decoder.get_buffer()
    buf[: len(writer.data)] = writer.data
    decoder.buffer_updated(len(writer.data))
    frames = [decoder.next_frame(), decoder.next_frame()]
    assert [(f.control, bytes(f.payload)) for f in frames if f] == [(True, b"ack1"), (True, b"ack2")]


def test_add_unsent_keeps_the_fds_only_when_nothing_left() -> None:
    outbox = Outbox(WIRE_ID)
    bufs = outbox.frame(b"", 1, b"abc", 3)
    outbox.add_unsent(list(bufs), [7], 0)
    assert outbox.pending[0].fds == [7]
    outbox.pending.clear()
    outbox.add_unsent(list(bufs), [7], 5)
    assert outbox.pending[0].fds == []
    assert outbox.nbytes == HEADER_SIZE + 3 - 5


def test_split_batches_refuses_a_frame_too_short_for_its_batches() -> None:
    with pytest.raises(ValueError, match="too short"):
        split_batches([b"x" * 2], b"", 0, list(range(3 * SCM_MAX_FD)))


def test_a_failure_before_any_byte_of_a_message_left_is_not_taken() -> None:
    """A 300-fd frame whose first batch the kernel refuses: nothing left, nothing cut."""
    outbox = Outbox(WIRE_ID)
    queue_message(outbox, b"p" * 10, [0] * 300)
    exc = OSError(errno.ETOOMANYREFS, "too many references")
    assert outbox.failed(exc, 0, 0) is None
    assert exc.characters_written == 0  # type: ignore[attr-defined]
    assert not outbox.pending
