"""`Channel.recv_into`: a message's payload written into the caller's buffer."""

from __future__ import annotations

import array
import os
import threading
import tracemalloc

import pytest

from fdchannel import BufferTooShort, Channel

from ._transports import PairFactory

TIMEOUT = 10.0
BIG = 8 * 1024 * 1024


def _pair(make_pair: PairFactory) -> tuple[Channel, Channel]:
    a, b = make_pair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return a, b


def _send_in_thread(ch: Channel, payload: bytes, fds: list[int]) -> threading.Thread:
    t = threading.Thread(target=ch.send, args=(payload, fds), daemon=True)
    t.start()
    return t


def test_small_payload_and_fds(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    r, w = os.pipe()
    buf = bytearray(100)
    with a, b:
        a.send(b"hello", [w])
        n, fds = b.recv_into(buf)
        assert n == 5
        assert buf[:5] == b"hello"
        assert len(fds) == 1
        with fds[0].open("wb", buffering=0) as f:
            f.write(b"!")
        assert os.read(r, 1) == b"!"
    os.close(r)
    os.close(w)


def test_a_large_payload_goes_straight_into_the_buffer(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    payload = os.urandom(BIG)
    buf = bytearray(BIG + 10)
    with a, b:
        sender = _send_in_thread(a, payload, [])
        tracemalloc.start()
        try:
            n, fds = b.recv_into(buf)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        sender.join(TIMEOUT)
        assert n == BIG
        assert fds == ()
        assert buf[:BIG] == payload
        # recv() would allocate the 8 MiB payload; recv_into nothing like it.
        assert peak < BIG // 8, f"recv_into allocated {peak} bytes"


def test_a_payload_that_does_not_fit_loses_nothing(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    r, w = os.pipe()
    with a, b:
        a.send(b"x" * 200_000, [r])
        a.send(b"next")
        small = bytearray(1000)
        with pytest.raises(BufferTooShort, match="200000 bytes does not fit a buffer of 1000") as info:
            b.recv_into(small)
        assert isinstance(info.value, ValueError)
        with info.value.message as msg:
            assert msg.payload == b"x" * 200_000
            assert len(msg.fds) == 1
        # The channel goes on.
        assert b.recv_into(small) == (4, ())
        assert small[:4] == b"next"
    os.close(r)
    os.close(w)


def test_a_queued_message_is_copied_in(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    with a, b:
        a.send(b"first")
        a.send(b"second")
        assert b.recv().payload == b"first"
        buf = bytearray(10)
        assert b.recv_into(buf) == (6, ())
        assert buf[:6] == b"second"


def test_bad_buffers_are_refused_before_anything_is_read(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    with a, b:
        a.send(b"kept")
        with pytest.raises(TypeError, match="writable"):
            b.recv_into(b"read-only bytes")
        with pytest.raises(BufferError, match="contiguous"):
            b.recv_into(memoryview(bytearray(20))[::2])
        assert b.recv().payload == b"kept"


def test_buffers_of_other_item_types_are_filled_bytewise(make_pair: PairFactory) -> None:
    a, b = _pair(make_pair)
    with a, b:
        a.send(b"\x01\x00\x00\x00\x02\x00\x00\x00")
        ints = array.array("i", [0, 0, 0])
        assert b.recv_into(ints) == (8, ())
        assert ints.tolist() == [1, 2, 0]


def test_a_receive_that_times_out_mid_payload_leaves_the_buffer_free(make_pair: PairFactory) -> None:
    """Half a large payload read into the caller's buffer moves out when recv_into gives up."""
    a, b = _pair(make_pair)
    payload = os.urandom(BIG)
    buf = bytearray(BIG)
    with a, b:
        a.settimeout(0.0)
        try:
            a.send(payload)  # the socket takes part of it; the rest is pending
        except BlockingIOError as exc:
            assert exc.characters_written > 0
        b.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            b.recv_into(buf)
        buf[:] = bytes(BIG)  # the caller reuses its buffer at once
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        flusher = threading.Thread(target=a.flush, daemon=True)
        flusher.start()
        got = b.recv()
        flusher.join(TIMEOUT)
        assert got.payload == payload
