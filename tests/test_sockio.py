"""The socket-I/O layer: one system call per function, the same functions in both modules.

Real sockets: an AF_UNIX pair for `_posixio` (SCM_RIGHTS), TCP on loopback
for `_streamio`.  Also the waiting helper, with poll and with select.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fdchannel import TruncatedControlData, _streamio, _wait
from fdchannel._codec import HEADER_SIZE, Decoder, pack_header
from fdchannel._outbox import Outbox
from fdchannel._sockio import io_for, write_pending

from ._portable import more_than_a_socket_holds, stream_socketpair
from ._proc import limit_fds_to_free_slots, run_child
from ._transports import needs_unix_rights, tcp_socketpair
from .conftest import open_fds

_posixio: Any
if sys.platform == "win32":
    _posixio = None  # POSIX only (it asserts so); the tests of it are skipped
else:
    from fdchannel import _posixio

TIMEOUT = 10.0


def decoder(in_band: bool = True, lone: bool = True) -> Decoder:
    return Decoder(
        wire_id=0, in_band=in_band, max_payload=1 << 24, max_fds=1024, max_aux=64, lone_frames=lone
    )


@pytest.fixture
def unix_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.settimeout(TIMEOUT)
    with a, b:
        yield a, b


@pytest.fixture
def any_io_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The pair `Channel.pair` would use: AF_UNIX, or loopback TCP on Windows."""
    a, b = stream_socketpair()
    for s in (a, b):
        s.settimeout(TIMEOUT)
    with a, b:
        yield a, b


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = tcp_socketpair()
    for s in (a, b):
        s.settimeout(TIMEOUT)
    with a, b:
        yield a, b


@needs_unix_rights
def test_io_for_picks_ancillary_io_only_for_af_unix(
    unix_pair: tuple[socket.socket, socket.socket], tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    assert io_for(unix_pair[0]) is _posixio
    assert io_for(tcp_pair[0]) is _streamio


@needs_unix_rights
def test_posix_write_and_read_a_lone_frame_with_fds(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix_pair
    r, w = os.pipe()
    frame = [pack_header(0, 2, 0, 5), b"hello"]
    assert _posixio.write(a, frame, [r, w]) == HEADER_SIZE + 5
    one = _posixio.read(b, decoder())
    assert one is not None
    payload, fds = one
    assert payload == b"hello"
    assert len(fds) == 2
    for fd in fds:
        assert not os.get_inheritable(fd)  # MSG_CMSG_CLOEXEC
        os.close(fd)
    os.close(r)
    os.close(w)


@needs_unix_rights
def test_posix_read_queues_when_lone_frames_are_off(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix_pair
    _posixio.write(a, [pack_header(0, 0, 0, 3), b"abc"], [])
    dec = decoder(lone=False)
    assert _posixio.read(b, dec) is None
    frame = dec.next_frame()
    assert frame is not None
    assert bytes(frame.payload) == b"abc"


@needs_unix_rights
def test_posix_read_reports_eof_and_a_reset_to_the_decoder(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = unix_pair
    a.close()
    dec = decoder()
    assert _posixio.read(b, dec) is None
    assert dec.eof
    assert dec.error is None  # clean: between frames


@needs_unix_rights
def test_posix_read_would_block_consumes_nothing(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = unix_pair
    b.setblocking(False)
    dec = decoder()
    with pytest.raises(BlockingIOError):
        _posixio.read(b, dec, _posixio.DONTWAIT)
    assert not dec.eof
    assert dec.received == 0


@needs_unix_rights
def test_posix_read_of_a_truncated_control_message_closes_what_arrived(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = unix_pair
    r, w = os.pipe()
    a.sendmsg([pack_header(0, 2, 0, 1) + b"x"], _posixio.rights([r, w]))
    os.close(r)
    os.close(w)

    def child() -> None:
        # Room for one more fd only: the kernel installs one of two and sets MSG_CTRUNC.
        limit_fds_to_free_slots(1)
        before = open_fds()
        with pytest.raises(TruncatedControlData, match="RLIMIT_NOFILE"):
            _posixio.read(b, decoder())
        assert open_fds() == before  # the fd that did arrive was closed

    run_child(child)


@needs_unix_rights
def test_posix_write_returns_0_when_the_socket_is_full(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = unix_pair
    a.setblocking(False)
    block = b"z" * 65536
    while _posixio.write(a, [block], []):
        pass
    assert _posixio.write(a, [b"more"], []) == 0


@needs_unix_rights
def test_posix_write_to_a_vanished_peer_is_epipe_without_sigpipe(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = unix_pair
    b.close()
    with pytest.raises(BrokenPipeError):
        _posixio.write(a, [b"x"], [])


def test_stream_write_joins_small_frames_into_one_send(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    assert _streamio.write(a, [b"abc", b"", memoryview(b"def")], []) == 6
    assert b.recv(16) == b"abcdef"


def test_stream_write_refuses_fds(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(ValueError, match="cannot carry fds"):
        _streamio.write(tcp_pair[0], [b"x"], [1])


def test_stream_write_of_a_large_frame_stops_at_the_first_short_send(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = tcp_pair
    a.setblocking(False)
    big = bytes(more_than_a_socket_holds(8 << 20))
    header = pack_header(1, 0, 0, len(big))
    sent = _streamio.write(a, [header, big], [])
    assert HEADER_SIZE <= sent < HEADER_SIZE + len(big)  # the socket took part of it, no copy
    assert _streamio.write(a, [b"more"], []) == 0 or sent  # full now, or took a little more
    # What left is exactly the frame's first *sent* bytes.
    got = bytearray()
    b.settimeout(TIMEOUT)
    while len(got) < sent:
        got += b.recv(1 << 20)
    assert bytes(got[:HEADER_SIZE]) == header
    assert not any(got[HEADER_SIZE:sent])


def test_stream_read_delivers_a_lone_frame_and_eof(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    a.sendall(pack_header(0, 0, 0, 2) + b"hi")
    dec = decoder(in_band=False)
    assert _streamio.read(b, dec) == (b"hi", ())
    a.close()
    assert _streamio.read(b, dec) is None
    assert dec.eof


def test_stream_read_treats_a_reset_as_end_of_stream(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    b.sendall(b"unread")  # a close with unread data sends a reset
    time.sleep(0)  # (nothing to wait for: the data is in a's buffer already)
    # struct linger {l_onoff = 1, l_linger = 0}: two ints, two u_shorts on Windows.
    a.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
    )
    a.close()
    dec = decoder(in_band=False)
    assert _stream_read_until_eof(b, dec)
    assert dec.eof


def _stream_read_until_eof(sock: socket.socket, dec: Decoder) -> bool:
    for _ in range(100):
        _streamio.read(sock, dec)
        if dec.eof:
            return True
    return False


def test_write_pending_drains_the_outbox_and_stops_when_full(
    any_io_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = any_io_pair
    io = io_for(a)  # _posixio on AF_UNIX, _streamio where there is none (Windows)
    a.setblocking(False)
    outbox = Outbox(0)
    payload = bytes(more_than_a_socket_holds(1 << 20))
    bufs = outbox.frame(b"", 0, payload, len(payload))
    outbox.add_frame(bufs, [], payload, len(payload))
    written = write_pending(io, a, outbox, io.SEND_FLAGS)
    assert 0 < written < HEADER_SIZE + len(payload)
    assert outbox.pending
    assert outbox.nbytes == HEADER_SIZE + len(payload) - written

    def reader() -> None:
        left = HEADER_SIZE + len(payload)
        while left:
            left -= len(b.recv(1 << 20))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    total = written
    while outbox.pending:
        assert _wait.wait_ready((a.fileno(),), write=True, deadline=time.monotonic() + TIMEOUT)
        total += write_pending(io, a, outbox, io.SEND_FLAGS)
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert total == HEADER_SIZE + len(payload)


@pytest.mark.parametrize(
    "use_poll",
    [
        pytest.param(
            True,
            id="poll",
            marks=pytest.mark.skipif(
                sys.platform == "win32", reason="select.poll, which Windows lacks (wait_ready selects there)"
            ),
        ),
        pytest.param(False, id="select"),
    ],
)
def test_wait_ready_honours_readiness_and_deadlines(
    use_poll: bool, any_io_pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_wait, "_HAVE_POLL", use_poll)
    a, b = any_io_pair
    start = time.monotonic()
    assert not _wait.wait_ready((b.fileno(),), deadline=start + 0.05)
    assert time.monotonic() >= start + 0.05  # not before the deadline (the same sum)
    assert not _wait.wait_ready((b.fileno(),), deadline=start - 1)  # already passed
    assert _wait.wait_ready((a.fileno(),), write=True, deadline=time.monotonic() + TIMEOUT)
    a.send(b"x")
    assert _wait.wait_ready((b.fileno(),), deadline=None)
    # Any of several fds: the listener waits on its socket and a wake-up fd,
    # a pipe.  (Windows has no listener, and its select() takes only sockets.)
    if sys.platform == "win32":
        x, y = socket.socketpair()
        with x, y:
            x.send(b"!")
            assert _wait.wait_ready((y.fileno(), a.fileno()), deadline=time.monotonic() + TIMEOUT)
        return
    r, w = os.pipe()
    try:
        os.write(w, b"!")
        assert _wait.wait_ready((r, a.fileno()), deadline=time.monotonic() + TIMEOUT)
    finally:
        os.close(r)
        os.close(w)


@needs_unix_rights
def test_errno_of_a_bad_fd_write_is_kept(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = unix_pair
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        _posixio.write(a, [b"x"], [w])
    assert info.value.errno == errno.EBADF
