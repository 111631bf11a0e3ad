"""The sans-IO frame codec on its own: no sockets, fd numbers are plain ints.

The numbers used as "fds" here are never closed by the codec (it only hands
them back), so fake numbers are safe.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdchannel import LimitExceeded, ProtocolError
from fdchannel._codec import HEADER_SIZE, INLINE_LIMIT, MAGIC, Decoder, Frame, pack_header

WIRE = 0


def decoder(**kw: int) -> Decoder:
    opts = {"max_payload": 1 << 24, "max_fds": 1024, "max_aux": 16}
    opts.update(kw)
    return Decoder(wire_id=WIRE, in_band=True, transport_name="UnixRights", **opts)


def frame_bytes(payload: bytes, nfds: int = 0, aux: bytes = b"", control: bool = False) -> bytes:
    return pack_header(WIRE, nfds, len(aux), len(payload), control=control) + aux + payload


def feed(dec: Decoder, data: bytes, fds: list[int] | None = None) -> None:
    """Feed *data* as one read (several reads if the buffer offers less)."""
    fds = list(fds or [])
    view = memoryview(data)
    while view:
        buf = dec.get_buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        dec.buffer_updated(n, fds)
        fds = []
        view = view[n:]


def frames(dec: Decoder) -> list[Frame]:
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


def test_header_layout_is_documented() -> None:
    header = pack_header(2, 3, 4, 5, control=True)
    assert len(header) == HEADER_SIZE == 24
    assert struct.unpack("<4sBBHIIQ", header) == (MAGIC, 1, 2, 1, 3, 4, 5)


def test_one_frame_with_fds() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"hello", nfds=2), [7, 8])
    (f,) = frames(dec)
    assert (f.payload, f.fds, f.nfds, f.control) == (b"hello", [7, 8], 2, False)
    assert dec.at_boundary


def test_several_frames_in_one_read() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"a") + frame_bytes(b"") + frame_bytes(b"ccc", nfds=1), [9])
    got = frames(dec)
    assert [(f.payload, f.fds) for f in got] == [(b"a", []), (b"", []), (b"ccc", [9])]


def test_byte_by_byte() -> None:
    dec = decoder()
    data = frame_bytes(b"xyz", nfds=1)
    for i, byte in enumerate(data):
        assert dec.next_frame() is None
        dec.get_buffer()[:1] = bytes([byte])
        dec.buffer_updated(1, [5] if i == 0 else [])
    (f,) = frames(dec)
    assert (f.payload, f.fds) == (b"xyz", [5])


def test_large_payload_goes_to_its_own_buffer() -> None:
    dec = decoder()
    payload = bytes(range(256)) * (3 * INLINE_LIMIT // 256)
    data = frame_bytes(payload, nfds=1)
    feed(dec, data[:100], [4])
    buf = dec.get_buffer()
    # After the header the decoder offers the payload's own buffer, sized
    # to exactly what is missing, so reads land in place.
    assert len(buf) == len(data) - 100
    feed(dec, data[100:])
    (f,) = frames(dec)
    assert isinstance(f.payload, bytearray)
    assert f.payload == payload
    assert f.fds == [4]


def test_control_frames_are_marked_and_can_be_taken_out_of_order() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"data1") + frame_bytes(b"ack", control=True) + frame_bytes(b"data2"))
    (ctl,) = dec.take_control_frames()
    assert (ctl.control, ctl.payload) == (True, b"ack")
    assert [f.payload for f in frames(dec)] == [b"data1", b"data2"]


class _NoFullScan(deque[Frame]):
    """A frame queue that fails when iterated as a whole (indexing and popping at the ends are fine)."""

    def __iter__(self) -> Any:
        raise AssertionError("take_control_frames() scanned the whole frame queue")


def test_taking_control_frames_looks_only_at_frames_since_the_first_new_control_frame() -> None:
    # A peer streaming data frames nobody receives yet (a send-only process
    # reading ahead for acknowledgements) made every send() scan them all.
    dec = decoder()
    feed(dec, b"".join(frame_bytes(b"d%d" % i) for i in range(1000)))
    dec.frames = _NoFullScan(dec.frames)
    assert dec.take_control_frames() == []
    feed(dec, frame_bytes(b"d1000") + frame_bytes(b"ack1", control=True) + frame_bytes(b"d1001"))
    feed(dec, frame_bytes(b"ack2", control=True) + frame_bytes(b"d1002"))
    assert [f.payload for f in dec.take_control_frames()] == [b"ack1", b"ack2"]
    assert dec.take_control_frames() == []
    assert len(dec.frames) == 1003
    assert [dec.frames[i].payload for i in (0, 999, 1000, 1001, 1002)] == [
        b"d0",
        b"d999",
        b"d1000",
        b"d1001",
        b"d1002",
    ]
    # A control frame the channel already took in stream order (recv) is
    # simply gone; the data after it stays in order.
    dec.frames = deque(deque.__iter__(dec.frames))
    feed(dec, frame_bytes(b"ack3", control=True) + frame_bytes(b"d1003"))
    for _ in range(1003):
        dec.frames.popleft()
    assert dec.frames.popleft().payload == b"ack3"
    assert dec.take_control_frames() == []
    assert [f.payload for f in dec.frames] == [b"d1003"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"XXXX" + bytes(20), "bad magic"),
        (struct.pack("<4sBBHIIQ", MAGIC, 9, WIRE, 0, 0, 0, 0), "wire version 9"),
        (struct.pack("<4sBBHIIQ", MAGIC, 1, 1, 0, 0, 0, 0), "same transport"),
        (struct.pack("<4sBBHIIQ", MAGIC, 1, WIRE, 0x80, 0, 0, 0), "unknown frame flags"),
        (struct.pack("<4sBBHIIQ", MAGIC, 1, WIRE, 1, 1, 0, 0), "malformed control frame"),
    ],
)
def test_malformed_headers(data: bytes, message: str) -> None:
    dec = decoder()
    feed(dec, data)
    with pytest.raises(ProtocolError, match=message):
        dec.next_frame()
    with pytest.raises(ProtocolError, match=message):  # and it stays failed
        dec.next_frame()


def test_limits_are_checked_on_the_header_before_any_buffer() -> None:
    dec = decoder(max_payload=10, max_fds=2)
    # A header that declares 2**60 bytes must fail without allocating them.
    feed(dec, pack_header(WIRE, 0, 0, 1 << 60))
    with pytest.raises(LimitExceeded, match="max_payload is 10"):
        dec.next_frame()
    dec = decoder(max_fds=2)
    feed(dec, pack_header(WIRE, 3, 0, 0))
    with pytest.raises(LimitExceeded, match="max_fds is 2"):
        dec.next_frame()
    dec = decoder(max_aux=0)
    feed(dec, pack_header(WIRE, 0, 1, 0) + b"\0")
    with pytest.raises(LimitExceeded, match="transport data"):
        dec.next_frame()


def test_exactly_at_the_limits_is_allowed() -> None:
    dec = decoder(max_payload=10, max_fds=2)
    feed(dec, frame_bytes(b"x" * 10, nfds=2), [3, 4])
    (f,) = frames(dec)
    assert len(f.payload) == 10
    assert f.fds == [3, 4]


def test_good_frames_before_a_bad_one_are_delivered_first() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"good", nfds=1) + b"garbage!" * 3, [6])
    f = dec.next_frame()
    assert f is not None
    assert (f.payload, f.fds) == (b"good", [6])
    with pytest.raises(ProtocolError):
        dec.next_frame()


def test_too_few_fds() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"x", nfds=2), [3])
    with pytest.raises(ProtocolError, match="declared 2 fds but 1"):
        dec.next_frame()
    assert dec.take_fds() == [3]


def test_too_many_fds() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"x", nfds=1), [3, 4])
    with pytest.raises(ProtocolError, match="more fds arrived"):
        dec.next_frame()
    assert sorted(dec.take_fds()) == [3, 4]


@pytest.mark.parametrize("payload_len", [1000, INLINE_LIMIT * 4], ids=["inline", "big"])
def test_fds_beyond_the_declared_count_fail_before_the_frame_completes(payload_len: int) -> None:
    # A peer declaring one fd and dripping batches of 253 with the payload
    # must not make the receiver hold them until the frame ends.
    dec = decoder()
    data = frame_bytes(b"x" * payload_len, nfds=1)
    feed(dec, data[: HEADER_SIZE + 1], [1])
    assert dec.error is None
    feed(dec, data[HEADER_SIZE + 1 : HEADER_SIZE + 2], list(range(100, 353)))
    with pytest.raises(ProtocolError, match=r"more fds arrived than the frame declared \(1\)"):
        dec.next_frame()
    assert sorted(dec.take_fds()) == [1, *range(100, 353)]


def test_fds_ahead_of_a_header_are_bounded_by_max_fds() -> None:
    dec = decoder(max_fds=4)
    feed(dec, frame_bytes(b"", nfds=4)[:5], [1, 2, 3, 4])
    assert dec.error is None  # the header may still declare 4
    dec2 = decoder(max_fds=4)
    feed(dec2, frame_bytes(b"", nfds=4)[:5], [1, 2, 3, 4, 5])
    with pytest.raises(LimitExceeded, match="5 fds for one frame; max_fds is 4"):
        dec2.next_frame()
    assert sorted(dec2.take_fds()) == [1, 2, 3, 4, 5]


def test_fds_on_a_frame_that_declares_none() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"x"), [3])
    with pytest.raises(ProtocolError, match="more fds arrived"):
        dec.next_frame()
    assert dec.take_fds() == [3]


def test_fds_that_arrived_with_an_earlier_frame_are_not_given_to_a_later_one() -> None:
    dec = decoder()
    first = frame_bytes(b"first")  # declares no fds, but one came with it
    feed(dec, first, [3])
    feed(dec, frame_bytes(b"second", nfds=1))
    with pytest.raises(ProtocolError):
        frames(dec)
    assert dec.take_fds() == [3]


def test_fds_read_with_the_next_frames_bytes_wait_for_it() -> None:
    # One read: all of frame 1 (no fds) and the start of frame 2, plus frame 2's fd.
    dec = decoder()
    data = frame_bytes(b"one") + frame_bytes(b"two", nfds=1)
    feed(dec, data[: len(data) - 2], [9])
    (f1,) = frames(dec)
    assert f1.fds == []
    feed(dec, data[len(data) - 2 :])
    (f2,) = frames(dec)
    assert (f2.payload, f2.fds) == (b"two", [9])


def test_non_inband_transport_refuses_inband_fds() -> None:
    dec = Decoder(wire_id=1, in_band=False, max_payload=100, max_fds=10, max_aux=100, transport_name="Pidfd")
    feed(dec, pack_header(1, 1, 4, 0) + b"\1\2\3\4", [5])
    with pytest.raises(ProtocolError, match="carries no in-band fds"):
        dec.next_frame()
    assert dec.take_fds() == [5]


def test_eof_between_frames_is_clean_and_mid_frame_is_not() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"x"))
    dec.receive_eof()
    assert frames(dec)[0].payload == b"x"
    dec = decoder()
    feed(dec, frame_bytes(b"xyz")[:-1])
    dec.receive_eof()
    with pytest.raises(ProtocolError, match="middle of a message"):
        dec.next_frame()
    dec = decoder()
    feed(dec, frame_bytes(b"big" * INLINE_LIMIT)[: INLINE_LIMIT + 100])
    dec.receive_eof()
    with pytest.raises(ProtocolError, match="middle of a message"):
        dec.next_frame()


def test_take_fds_returns_fds_of_queued_frames() -> None:
    dec = decoder()
    feed(dec, frame_bytes(b"a", nfds=1), [3])
    feed(dec, frame_bytes(b"b", nfds=2)[:10], [4, 5])
    assert sorted(dec.take_fds()) == [3, 4, 5]
    assert dec.next_frame() is None


def test_buffer_updated_needs_bytes() -> None:
    dec = decoder()
    dec.get_buffer()
    with pytest.raises(ValueError, match="receive_eof"):
        dec.buffer_updated(0)


# -- properties -----------------------------------------------------------------

# Large payloads come from a seed: random bytes of that size would exceed
# hypothesis's entropy budget without testing anything more.
large = st.tuples(st.integers(0, 2**32), st.integers(INLINE_LIMIT - 40, INLINE_LIMIT + 3000)).map(
    lambda seed_size: random.Random(seed_size[0]).randbytes(seed_size[1])
)
messages = st.lists(
    st.tuples(st.one_of(st.binary(max_size=300), large), st.integers(min_value=0, max_value=600)),
    max_size=8,
)
read_sizes = st.sampled_from([1, 2, 23, 24, 25, 100, 4096, 1 << 20])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages, st.data())
def test_any_messages_round_trip_whatever_the_read_sizes(
    msgs: list[tuple[bytes, int]], data: st.DataObject
) -> None:
    """However the stream is cut into reads, and wherever the kernel puts
    each frame's fds (on any byte of that frame), every frame comes out
    whole, in order, with exactly its own fds."""
    stream = b""
    fd_at: dict[int, list[int]] = {}  # stream offset -> fds attached there
    expected = []
    next_fd = 100
    for payload, nfds in msgs:
        frame = frame_bytes(payload, nfds)
        fds = list(range(next_fd, next_fd + nfds))
        next_fd += nfds
        # Split the fds into batches on distinct bytes of the frame, as the
        # channel does for more than SCM_MAX_FD of them.
        batches = [fds[i : i + 253] for i in range(0, len(fds), 253)]
        for i, batch in enumerate(batches):
            fd_at.setdefault(len(stream) + i, []).extend(batch)
        stream += frame
        expected.append((payload, fds))
    dec = decoder()
    got = []
    pos = 0
    while pos < len(stream):
        buf = dec.get_buffer()
        limit = min(len(buf), len(stream) - pos)
        n = min(limit, data.draw(read_sizes))
        # A recvmsg stops after the first byte range that carries fds.
        carriers = [off for off in fd_at if pos <= off < pos + n]
        fds: list[int] = []
        if carriers:
            first = min(carriers)
            n = first - pos + 1
            fds = fd_at.pop(first)
        buf[:n] = stream[pos : pos + n]
        dec.buffer_updated(n, fds)
        pos += n
        got.extend(frames(dec))
    dec.receive_eof()
    got.extend(frames(dec))
    assert [(bytes(f.payload), f.fds) for f in got] == expected
    assert dec.at_boundary


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=200), st.lists(st.integers(0, 5), max_size=3))
def test_garbage_never_escapes_as_anything_but_protocol_error(junk: bytes, fdcounts: list[int]) -> None:
    dec = decoder(max_payload=1000, max_fds=4)
    fd = 1000
    try:
        for count in fdcounts or [0]:
            feed(dec, junk, list(range(fd, fd + count)))
            fd += count
            frames(dec)
        dec.receive_eof()
        frames(dec)
    except ProtocolError:
        pass
    handed_back = dec.take_fds()
    assert len(set(handed_back)) == len(handed_back)


class _NoRoomLeft(deque):  # type: ignore[type-arg]
    """Held batches that cannot take one more (out of memory as fds are given back)."""

    def appendleft(self, item: Any) -> None:
        raise MemoryError


def test_fds_neither_queued_nor_given_back_are_held_once() -> None:
    """Out of memory making two frames and again giving their fds back: each
    number is held exactly once (in _stray), never also in _taking as a
    second list that take_fds() would return twice."""

    def no_frame(*args: Any) -> Frame:
        raise MemoryError

    dec = Decoder(wire_id=0, in_band=True, max_payload=1 << 20, max_fds=8, max_aux=16, lone_frames=False)
    dec._fds = _NoRoomLeft()
    dec._frame = no_frame  # type: ignore[assignment]
    frame = pack_header(0, 1, 0, 1) + b"x"
    for fd in (100, 101):
        buf = dec.get_buffer()
        buf[: len(frame)] = frame
        with pytest.raises(MemoryError):
            dec.buffer_updated(len(frame), [fd])
    assert sorted(n for fds in dec.fd_lists() for n in fds) == [100, 101]
    assert sorted(dec.take_fds()) == [100, 101]
