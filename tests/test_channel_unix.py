"""UnixRights specifics: SCM_RIGHTS batches, raw peers, MSG_CTRUNC, resets.

A "raw peer" is a plain socket that writes frames by hand, so every
malformed input a real peer could send is tried against a real Channel.
"""

from __future__ import annotations

import sys

import pytest

if sys.platform == "win32":
    pytest.skip(
        "UnixRights specifics: needs AF_UNIX sockets with SCM_RIGHTS (and resource limits), "
        "which Windows lacks",
        allow_module_level=True,
    )

import array
import os
import resource
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

from fdchannel import Channel, ChannelClosed, ProtocolError, TruncatedControlData
from fdchannel._codec import pack_header

from ._async_view import AsyncPairFactory, async_loop_params
from ._proc import limit_fds_to_free_slots, run_child
from .conftest import open_fds

TIMEOUT = 10.0


@pytest.fixture(params=[pytest.param(None, id="Channel"), *async_loop_params()])
def raw_peer(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, Channel]]:
    """(a raw socket, the channel on the other end): a `Channel`, or an
    `AsyncChannel` driven through `BlockingView` on each loop kind."""
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    factory = None if request.param is None else AsyncPairFactory(*request.param)
    try:
        ch: Any = Channel(other) if factory is None else factory.adopt(other)
        ch.settimeout(TIMEOUT)
        raw.settimeout(TIMEOUT)
        yield raw, ch
        raw.close()
        ch.close()
    finally:
        if factory is not None:
            factory.shutdown()


@pytest.fixture
def raw_channel_peer() -> Iterator[tuple[socket.socket, Channel]]:
    """(a raw socket, the `Channel` on the other end): for non-blocking mode."""
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = Channel(other)
    ch.settimeout(TIMEOUT)
    raw.settimeout(TIMEOUT)
    yield raw, ch
    raw.close()
    ch.close()


def send_raw(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    assert sock.sendmsg([data], anc) == len(data)


def frame(payload: bytes, nfds: int = 0) -> bytes:
    return pack_header(0, nfds, 0, len(payload)) + payload


def pipe_closed_everywhere(r: int) -> bool:
    """True when every write end of the pipe is closed (read gives EOF)."""
    ready, _, _ = select.select([r], [], [], TIMEOUT)
    return bool(ready) and os.read(r, 1) == b""


def assert_refused_closing_its_fds(
    raw: socket.socket, ch: Channel, data: bytes, copies: int, match: str
) -> None:
    """Send *data* raw with *copies* of a pipe's write end: recv() must raise
    `ProtocolError` matching *match* and close every copy that arrived."""
    r, w = os.pipe()
    try:
        send_raw(raw, data, [w] * copies)
        os.close(w)
        with pytest.raises(ProtocolError, match=match):
            ch.recv()
        assert pipe_closed_everywhere(r)
    finally:
        os.close(r)


def assert_unusable(ch: Channel, original: str) -> None:
    with pytest.raises(ProtocolError, match="unusable") as info:
        ch.recv()
    assert original in str(info.value)
    with pytest.raises(ProtocolError, match="unusable"):
        ch.send(b"x")


# -- malformed input: a clear error, and every fd that arrived is closed ---------


def test_garbage_is_a_protocol_error(raw_peer: tuple[socket.socket, Channel]) -> None:
    raw, ch = raw_peer
    assert_refused_closing_its_fds(raw, ch, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1, "bad magic")
    assert_unusable(ch, "bad magic")


def test_fewer_fds_than_declared(raw_peer: tuple[socket.socket, Channel]) -> None:
    raw, ch = raw_peer
    assert_refused_closing_its_fds(raw, ch, frame(b"two?", nfds=2), 1, "declared 2 fds but 1")


def test_more_fds_than_declared(raw_peer: tuple[socket.socket, Channel]) -> None:
    raw, ch = raw_peer
    assert_refused_closing_its_fds(raw, ch, frame(b"one", nfds=1), 3, "more fds arrived")


def test_fds_dripped_beyond_the_declared_count_are_refused_at_once(
    raw_peer: tuple[socket.socket, Channel],
) -> None:
    raw, ch = raw_peer
    r, w = os.pipe()
    before = len(open_fds())
    data = frame(b"p" * (1 << 20), nfds=1)  # one fd declared, a long payload to come
    send_raw(raw, data[:25], [w])
    for i in range(3):  # 253 more with each byte: none of them belongs there
        send_raw(raw, data[25 + i : 26 + i], [w] * 253)
    os.close(w)
    with pytest.raises(ProtocolError, match=r"more fds arrived than the frame declared \(1\)"):
        ch.recv()
    # What was read was closed at once; the rest never left the socket.
    assert len(open_fds()) <= before
    ch.close()
    assert pipe_closed_everywhere(r)
    os.close(r)


def test_transport_data_of_unix_rights_must_be_zero_padding() -> None:
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Enough fds allowed for frames that need padding bytes to ride on.
    with raw, Channel(other, max_fds=26 * 253) as ch:
        ch.settimeout(TIMEOUT)
        send_raw(raw, pack_header(0, 0, 1, 2) + b"\0" + b"ok")
        assert ch.recv().payload == b"ok"
        assert_refused_closing_its_fds(raw, ch, pack_header(0, 1, 1, 2) + b"\1" + b"no", 1, "zero padding")


def test_good_message_before_a_bad_one_is_still_delivered(raw_peer: tuple[socket.socket, Channel]) -> None:
    raw, ch = raw_peer
    send_raw(raw, frame(b"fine", 1) + b"\xff" * 24, [0])
    with ch.recv() as msg:
        assert msg.payload == b"fine"
        assert len(msg.fds) == 1
    with pytest.raises(ProtocolError, match="bad magic"):
        ch.recv()


def test_oversized_header_fails_before_allocating(raw_peer: tuple[socket.socket, Channel]) -> None:
    raw, ch = raw_peer
    send_raw(raw, pack_header(0, 0, 0, 1 << 62))  # 4 EiB: allocating it would fail loudly
    with pytest.raises(ProtocolError, match="max_payload"):
        ch.recv()


def test_eof_in_the_middle_of_a_message(raw_peer: tuple[socket.socket, Channel]) -> None:
    raw, ch = raw_peer
    r, w = os.pipe()
    data = frame(b"cut short", 1)
    send_raw(raw, data[:30], [w])
    os.close(w)
    raw.close()
    with pytest.raises(ProtocolError, match="middle of a message"):
        ch.recv()
    assert pipe_closed_everywhere(r)
    os.close(r)


def test_eof_inside_the_header(raw_peer: tuple[socket.socket, Channel]) -> None:
    raw, ch = raw_peer
    send_raw(raw, frame(b"x")[:5])
    raw.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match="middle of a message"):
        ch.recv()


def test_eof_between_messages_is_channel_closed(raw_peer: tuple[socket.socket, Channel]) -> None:
    raw, ch = raw_peer
    send_raw(raw, frame(b"only"))
    raw.shutdown(socket.SHUT_WR)
    assert ch.recv().payload == b"only"
    with pytest.raises(ChannelClosed):
        ch.recv()
    with pytest.raises(ChannelClosed):  # and stays so
        ch.recv()


def test_peer_closing_with_our_data_unread_is_channel_closed(raw_peer: tuple[socket.socket, Channel]) -> None:
    # The kernel reports this as ECONNRESET once the peer's data is drained.
    raw, ch = raw_peer
    send_raw(raw, frame(b"bye"))
    ch.send(b"never read")
    raw.close()
    assert ch.recv().payload == b"bye"
    with pytest.raises(ChannelClosed):
        ch.recv()


def test_merged_and_split_reads() -> None:
    """Plain data merged before a frame with fds, frames split mid-header."""
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with raw, Channel(other) as ch:
        ch.settimeout(TIMEOUT)
        data = frame(b"plain1") + frame(b"withfd", 1) + frame(b"tail")
        cut = len(frame(b"plain1")) + 3
        send_raw(raw, data[:cut], [0])  # fd rides on the 4th byte of frame 2
        send_raw(raw, data[cut:])
        assert ch.recv().payload == b"plain1"
        with ch.recv() as msg:
            assert (msg.payload, len(msg.fds)) == (b"withfd", 1)
        assert ch.recv().payload == b"tail"


# -- the sender side on the wire -----------------------------------------------------


def test_an_empty_message_still_carries_bytes_for_its_fds() -> None:
    a, raw = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with Channel(a) as ch, raw:
        raw.settimeout(TIMEOUT)
        ch.send(b"", fds=[0])
        data, anc, _, _ = raw.recvmsg(100, socket.CMSG_SPACE(16))
        assert data == pack_header(0, 1, 0, 0)  # the header is what the fd rides on
        ((_, _, fdbytes),) = anc
        os.close(array.array("i", fdbytes)[0])


def test_more_fds_than_one_sendmsg_are_split_into_kernel_sized_batches() -> None:
    a, raw = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with Channel(a) as ch, raw:
        raw.settimeout(TIMEOUT)
        ch.send(b"", fds=[0] * 600)
        batches = []
        got = b""
        while len(got) < 24:
            data, anc, flags, _ = raw.recvmsg(100, socket.CMSG_SPACE(4 * 300))
            assert not flags & socket.MSG_CTRUNC
            got += data
            for _, _, fdbytes in anc:
                fds = array.array("i", fdbytes).tolist()
                batches.append(len(fds))
                for fd in fds:
                    os.close(fd)
        assert batches == [253, 253, 94]
        assert got == pack_header(0, 600, 0, 0)


def _stuck_after_the_first_batch(a: Channel, b: Channel, fds: list[int]) -> int:
    """Leave *a* non-blocking with a message of *fds* (over 253) whose first
    batch left; return how many small frames are queued ahead of it."""
    a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # a few skbs fill it
    a.setblocking(False)
    small = 0
    with pytest.raises(BlockingIOError):
        while True:
            a.send(b"s")
            small += 1
    # Make room for exactly one more small frame: read one frame raw.
    with socket.socket(fileno=os.dup(b.fileno())) as peek:
        assert len(peek.recv(25)) == 25
    with pytest.raises(BlockingIOError) as info:
        a.send(b"big", fds=fds)
    assert info.value.characters_written > 0
    assert a.pending
    return small - 1


def test_pending_batches_are_duplicated_so_the_caller_may_close() -> None:
    """A send that blocks between two batches of a 1,000-fd message keeps
    duplicates of the batches still to go; the caller closes its fds at once."""
    a, b = Channel.pair()
    with a, b:
        r, w = os.pipe()
        small = _stuck_after_the_first_batch(a, b, [r, w] * 500)
        os.close(r)  # ours; the channel holds its own duplicates
        os.close(w)
        got = []

        def receive() -> None:
            b.settimeout(TIMEOUT)
            for _ in range(small):
                assert b.recv().payload == b"s"
            got.append(b.recv())

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        a.settimeout(TIMEOUT)
        a.flush()
        t.join(TIMEOUT)
        assert not t.is_alive()
        with got[0] as msg:
            assert msg.payload == b"big"
            assert len(msg.fds) == 1000
            os.write(msg.fds[999].fileno(), b"!")  # a write end, as sent
            assert os.read(msg.fds[0].fileno(), 1) == b"!"


# -- the receiver out of fds: MSG_CTRUNC -------------------------------------------------


@pytest.mark.parametrize("timeout", [None, TIMEOUT], ids=["blocking", "timeout"])
def test_receiver_at_its_fd_limit_gets_truncated_control_data(timeout: float | None) -> None:
    a, b = Channel.pair()

    def body() -> None:
        a.close()
        # Blocking (the default, with its own inlined read) is safe here:
        # the message is in the socket before the child starts.
        b.settimeout(timeout)
        before = set(open_fds())
        # Room for exactly one more fd: the kernel installs 1 of 3 and sets CTRUNC.
        limit_fds_to_free_slots(1)
        with pytest.raises(TruncatedControlData, match="RLIMIT_NOFILE"):
            b.recv()
        assert set(open_fds()) == before  # the fd that did arrive was closed
        with pytest.raises(ProtocolError, match="unusable"):
            b.recv()

    r, w = os.pipe()
    try:
        a.send(b"three", fds=[r, w, r])

        def child() -> None:
            os.close(r)
            os.close(w)
            body()

        run_child(child)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_close_closes_the_duplicates_of_fds_still_to_go() -> None:
    a, b = Channel.pair()
    r, w = os.pipe()
    with b:
        _stuck_after_the_first_batch(a, b, [w] * 1000)
        os.close(w)  # ours; the channel keeps duplicates of the 747 to go
        held = len(open_fds())
        a.close()
        assert len(open_fds()) <= held - 747
    # The first batch was in b's socket: gone with it.
    assert pipe_closed_everywhere(r)
    os.close(r)


def test_close_pushes_pending_output_the_socket_takes_at_once() -> None:
    a, b = Channel.pair()
    payload = os.urandom(300_000)  # more than the socket holds
    with b, socket.socket(fileno=os.dup(b.fileno())) as raw:
        raw.settimeout(TIMEOUT)
        a.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            a.send(payload)
        written = info.value.characters_written
        assert 0 < written < len(payload)
        got = raw.recv(written, socket.MSG_WAITALL)  # empty the socket
        a.close()  # the remainder fits now: close() writes it
        while chunk := raw.recv(1 << 20):
            got += chunk
    assert got == pack_header(0, 0, 0, len(payload)) + payload


def test_receiver_with_no_fd_left_at_all() -> None:
    a, b = Channel.pair()
    r, w = os.pipe()

    def child() -> None:
        a.close()
        os.close(r)
        os.close(w)
        b.settimeout(TIMEOUT)
        before = set(open_fds())
        saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit_fds_to_free_slots(0)
        with pytest.raises(TruncatedControlData):
            b.recv()
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)  # listing /proc needs an fd
        assert set(open_fds()) == before

    try:
        a.send(b"one", fds=[w])
        run_child(child)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


@pytest.mark.parametrize("mode", ["nonblocking", "timeout"])
def test_partial_message_and_its_fds_stay_buffered(
    raw_channel_peer: tuple[socket.socket, Channel], mode: str
) -> None:
    raw, ch = raw_channel_peer
    if mode == "nonblocking":
        ch.setblocking(False)
        expected: type[OSError] = BlockingIOError
    else:
        ch.settimeout(0.01)
        expected = TimeoutError
    r, w = os.pipe()
    data = frame(b"in two parts", 1)
    send_raw(raw, data[:10], [w])  # the fd arrives with the first part
    os.close(w)
    with pytest.raises(expected):
        ch.recv()
    with pytest.raises(expected):  # still incomplete, nothing lost
        ch.recv()
    send_raw(raw, data[10:])
    ch.settimeout(TIMEOUT)
    with ch.recv() as msg:
        assert msg.payload == b"in two parts"
        os.write(msg.fds[0].fileno(), b"w")
    assert os.read(r, 1) == b"w"
    os.close(r)


def test_close_with_a_partial_message_buffered_closes_its_fds(
    raw_peer: tuple[socket.socket, Channel],
) -> None:
    raw, ch = raw_peer
    r, w = os.pipe()
    send_raw(raw, frame(b"never finished", 1)[:10], [w])
    os.close(w)
    ch.settimeout(0.05)
    with pytest.raises(TimeoutError):
        ch.recv()  # read what there is: the part and its fd are buffered
    ch.close()
    assert pipe_closed_everywhere(r)
    os.close(r)
