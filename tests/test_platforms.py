"""macOS's and the BSDs' branches, run on Linux (issue #10).

Each platform difference lives in `fdchannel._platform.Facts`; these tests
hand the code another platform's record and, where that platform's kernel
answers with an errno Linux never gives, make the real socket give it
through `tests._errno_socket.ErrnoSocket` (everything else is the real
kernel: the bytes, the fds, the waiting).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from fdchannel import Channel, Listener, ProtocolError, TruncatedControlData, _listener, _peer
from fdchannel._codec import pack_header
from fdchannel._peer import parse_credentials, unix_address
from fdchannel._platform import FACTS, facts_for
from fdchannel.transports import UnixRights

from ._errno_socket import ErrnoSocket, install
from ._proc import needs_fork
from ._transports import needs_unix_rights

pytestmark = needs_unix_rights

_posixio: Any = None
if sys.platform != "win32":
    from fdchannel import _posixio

TIMEOUT = 10.0
DARWIN = facts_for("darwin")
FREEBSD = facts_for("freebsd13")
LINUX = facts_for("linux")


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    a, b = Channel.pair(transport=UnixRights(acknowledge=False))
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        yield a, b


def same_file(fd: int, other: int) -> bool:
    x, y = os.fstat(fd), os.fstat(other)
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


def test_every_platform_has_its_facts() -> None:
    assert FACTS is facts_for(sys.platform)
    assert LINUX.refused_means_dead
    assert LINUX.abstract_names
    assert LINUX.sun_path_max == 107
    assert DARWIN.ack_fds
    assert DARWIN.emsgsize_is_backpressure
    assert DARWIN.sun_path_max == 103
    assert not DARWIN.abstract_names
    assert not DARWIN.refused_means_dead
    names = ("linux", "darwin", "freebsd14", "openbsd7", "netbsd10")
    assert [facts_for(n).credentials for n in names] == [
        "ucred",
        "xucred",
        "xucred",
        "sockpeercred",
        "unpcbid",
    ]
    assert facts_for("sunos5").credentials is None


# -- 2. macOS: EMSGSIZE from sendmsg with fds is backpressure -----------------


def test_darwin_emsgsize_on_send_waits_and_retries(
    pair: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_posixio, "FACTS", DARWIN)
    a, b = pair
    double = ErrnoSocket(a._sock, fail_send=lambda n: errno.EMSGSIZE if n <= 3 else None)
    install(a, double)
    r, w = os.pipe()
    try:
        a.send(b"hello", [r])
        assert double.failed == 3
        with b.recv() as msg:
            assert msg.payload == b"hello"
            assert same_file(msg.fds[0].fileno(), r)
    finally:
        os.close(r)
        os.close(w)


def test_darwin_emsgsize_mid_frame_does_not_break_the_channel(
    pair: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 300 fds go in two batches; the second meets a full peer buffer twice.
    monkeypatch.setattr(_posixio, "FACTS", DARWIN)
    a, b = pair
    double = ErrnoSocket(a._sock, fail_send=lambda n: errno.EMSGSIZE if n in (2, 3) else None)
    install(a, double)
    r, w = os.pipe()
    try:
        a.send(b"many", [r] * 300)
        assert double.failed == 2
        with b.recv() as msg:
            assert len(msg.fds) == 300
            assert all(same_file(f.fileno(), r) for f in msg.fds)
        a.send(b"after")
        with b.recv() as msg:
            assert msg.payload == b"after"
    finally:
        os.close(r)
        os.close(w)


def test_darwin_emsgsize_backs_off_instead_of_spinning(
    pair: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The peer's buffer never takes the control data (for 0.3 s): the socket
    # polls writable all along.  Without a pause the wait retried ~10^4 times.
    monkeypatch.setattr(_posixio, "FACTS", DARWIN)
    a, _b = pair
    double = ErrnoSocket(a._sock, fail_send=lambda n: errno.EMSGSIZE)
    install(a, double)
    a.settimeout(0.3)
    r, w = os.pipe()
    try:
        with pytest.raises(TimeoutError) as info:
            a.send(b"x", [r])
        assert getattr(info.value, "characters_written", None) == 0
        assert 3 <= double.sends_with_fds <= 20, double.sends_with_fds
    finally:
        os.close(r)
        os.close(w)


def test_darwin_emsgsize_backs_off_in_asyncio_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from fdchannel.aio import AsyncChannel

    monkeypatch.setattr(_posixio, "FACTS", DARWIN)

    async def main() -> int:
        a, b = AsyncChannel.pair(transport=UnixRights(acknowledge=False))
        async with a, b:
            double = ErrnoSocket(a._sock, fail_send=lambda n: errno.EMSGSIZE)
            install(a, double)
            r, w = os.pipe()
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await a.send(b"x", [r])
            finally:
                os.close(r)
                os.close(w)
            return double.sends_with_fds

    tries = asyncio.run(main())
    assert 3 <= tries <= 20, tries


def test_elsewhere_emsgsize_on_send_is_an_error_and_nothing_is_taken(
    pair: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_posixio, "FACTS", LINUX)
    a, b = pair
    install(a, ErrnoSocket(a._sock, fail_send=lambda n: errno.EMSGSIZE if n == 1 else None))
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            a.send(b"x", [r])
        assert info.value.errno == errno.EMSGSIZE
        assert getattr(info.value, "characters_written", None) == 0
        a.send(b"y", [r])  # the channel is still usable
        with b.recv() as msg:
            assert msg.payload == b"y"
    finally:
        os.close(r)
        os.close(w)


# -- 5. a full fd table on receive: EMSGSIZE (macOS), EMFILE (FreeBSD) ---------


@pytest.mark.parametrize(
    ("facts", "err", "words"), [(DARWIN, errno.EMSGSIZE, "macOS"), (FREEBSD, errno.EMFILE, "FreeBSD")]
)
def test_receive_failure_for_fds_fails_the_channel_like_msg_ctrunc(
    pair: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch, facts: Any, err: int, words: str
) -> None:
    monkeypatch.setattr(_posixio, "FACTS", facts)
    a, b = pair
    install(b, ErrnoSocket(b._sock, fail_recv=lambda n: err if n == 1 else None))
    r, w = os.pipe()
    try:
        a.send(b"x", [r])
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(TruncatedControlData, match=f"{words}.*RLIMIT_NOFILE"):
        b.recv()
    # As after MSG_CTRUNC: unusable, and it says why.
    with pytest.raises(ProtocolError, match=words):
        b.recv()


def test_linux_passes_other_receive_errors_through(
    pair: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_posixio, "FACTS", LINUX)
    a, b = pair
    install(b, ErrnoSocket(b._sock, fail_recv=lambda n: errno.EMSGSIZE if n == 1 else None))
    a.send(b"x")
    with pytest.raises(OSError) as info:
        b.recv()
    assert not isinstance(info.value, TruncatedControlData)
    with b.recv() as msg:  # nothing was read: the message is still there
        assert msg.payload == b"x"


# -- 6. macOS installs fds beyond the receive buffer: size it for all ---------------


def test_darwin_receive_buffer_holds_the_most_a_peer_can_send() -> None:
    assert _posixio.ancbuf_size(DARWIN) >= socket.CMSG_SPACE(2048)
    assert _posixio.ancbuf_size(LINUX) == socket.CMSG_SPACE(253 * 4)


def test_excess_fds_from_a_foreign_peer_are_received_and_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_posixio, "ANCBUF", _posixio.ancbuf_size(DARWIN))
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with x, Channel(y, transport=UnixRights(acknowledge=False)) as ch:
        ch.settimeout(TIMEOUT)
        r, w = os.pipe()
        try:
            # A frame that declares one fd, with 253 on its bytes.
            x.sendmsg(
                [pack_header(0, 1, 0, 0)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("253i", *[r] * 253))],
            )
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(ProtocolError, match="fds"):
            ch.recv()
    # The autouse leak check proves the 253 were closed.


# -- 4. credentials: each OS's layout, and an OS with none -------------------------


def test_linux_ucred() -> None:
    assert parse_credentials("ucred", struct.pack("=iII", 42, 1000, 100)) == _peer.PeerCredentials(
        42, 1000, 100
    )


def test_openbsd_sockpeercred_is_uid_gid_pid() -> None:
    creds = parse_credentials("sockpeercred", struct.pack("=IIi", 1000, 100, 4242))
    assert (creds.uid, creds.gid, creds.pid) == (1000, 100, 4242)


def test_netbsd_unpcbid() -> None:
    creds = parse_credentials("unpcbid", struct.pack("=iII", 4242, 1000, 100))
    assert (creds.uid, creds.gid, creds.pid) == (1000, 100, 4242)


def _xucred(version: int, uid: int, groups: list[int], pid: int | None) -> bytes:
    raw = struct.pack("=IIh2x16I", version, uid, len(groups), *(groups + [0] * (16 - len(groups))))
    assert len(raw) == 76
    if pid is not None:  # FreeBSD 13+: a union of a pointer and cr_pid, at 80
        raw += bytes(4) + struct.pack("=iI", pid, 0)
    return raw


def test_macos_xucred_with_local_peerpid() -> None:
    creds = parse_credentials("xucred", _xucred(0, 501, [20, 12, 61], None), pid=777)
    assert (creds.uid, creds.gid, creds.pid) == (501, 20, 777)


def test_freebsd_xucred_carries_the_pid() -> None:
    creds = parse_credentials("xucred", _xucred(0, 1001, [1001, 0], 31337))
    assert (creds.uid, creds.gid, creds.pid) == (1001, 1001, 31337)


def test_xucred_of_another_version_or_too_short_is_refused() -> None:
    with pytest.raises(OSError, match="version 7") as info:
        parse_credentials("xucred", _xucred(7, 1001, [1001], None))
    assert info.value.errno == errno.EPROTO
    with pytest.raises(OSError, match="bytes"):
        parse_credentials("sockpeercred", b"\0" * 8)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ep.sock"


def test_no_credentials_on_this_os_fails_accept_clearly_and_closes_the_peer(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_peer, "FACTS", attrs.evolve(FACTS, credentials=None))
    with Listener(sock_path, allow_uids={os.getuid()}) as lst:
        lst.settimeout(TIMEOUT)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(TIMEOUT)
            client.connect(str(sock_path))
            with pytest.raises(NotImplementedError, match=r"checks peers.*closed"):
                lst.accept()
            assert client.recv(1) == b""  # closed at once, not left to the GC
    # Without peer checks nothing needs the credentials.
    with Listener(sock_path) as lst:
        lst.settimeout(TIMEOUT)
        with Channel.connect(sock_path, timeout=TIMEOUT) as client, lst.accept() as server:
            client.send(b"hi")
            with server.recv() as msg:
                assert msg.payload == b"hi"


# -- 7. abstract names, sun_path ---------------------------------------------------


def test_abstract_names_are_refused_clearly_off_linux() -> None:
    with pytest.raises(OSError, match="only on Linux, not on macOS") as info:
        unix_address("\0fdchannel-test", DARWIN)
    assert info.value.errno == errno.EAFNOSUPPORT
    assert unix_address("\0fdchannel-test", LINUX) == "\0fdchannel-test"


# -- 3. the stale-socket check cannot take a busy listener for a dead one ------------


def _fill_backlog(path: Path) -> list[socket.socket]:
    clients = []
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        clients.append(c)
        if c.connect_ex(str(path)) != 0:
            return clients


def _bsd_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes get macOS's/the BSDs' answer for a full backlog (or a dead socket): ECONNREFUSED."""
    monkeypatch.setattr(_listener, "FACTS", DARWIN)
    real = _listener.unix_socket
    monkeypatch.setattr(
        _listener, "unix_socket", lambda: ErrnoSocket(real(), connect_answer=errno.ECONNREFUSED)
    )


def test_live_listener_with_full_backlog_is_kept_where_refused_is_ambiguous(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Listener(sock_path, backlog=0) as live:
        clients = _fill_backlog(sock_path)
        try:
            _bsd_probe(monkeypatch)
            with pytest.raises(OSError, match="live socket") as info:
                Listener(sock_path)
            assert info.value.errno == errno.EADDRINUSE
            assert sock_path.exists()
            live.settimeout(TIMEOUT)
            with live.accept():  # still the live listener's socket
                pass
        finally:
            for c in clients:
                c.close()


@needs_fork
def test_dead_fdchannel_listener_is_replaced_everywhere(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            # Held until the exit, which runs no finalizer: dropped, it
            # would be closed (and its file removed) unless warnings are errors.
            held = Listener(sock_path)  # and die without closing it
            os._exit(0 if held.fileno() >= 0 else 1)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sock_path.exists()
    _bsd_probe(monkeypatch)
    with Listener(sock_path) as lst:
        lst.settimeout(TIMEOUT)
        with Channel.connect(sock_path, timeout=TIMEOUT), lst.accept():
            pass


def test_foreign_socket_that_refuses_is_not_removed_where_that_is_ambiguous(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as foreign:
        foreign.bind(str(sock_path))  # a socket file nobody listens on
    _bsd_probe(monkeypatch)
    with pytest.raises(OSError, match="not an fdchannel Listener's") as info:
        Listener(sock_path)
    assert info.value.errno == errno.EADDRINUSE
    assert sock_path.exists()
    monkeypatch.setattr(_listener, "FACTS", LINUX)  # where ECONNREFUSED means dead
    with Listener(sock_path):
        pass


def test_a_successor_may_take_the_path_of_a_live_listener_whose_file_it_removed(sock_path: Path) -> None:
    with Listener(sock_path) as old:
        os.unlink(sock_path)
        with Listener(sock_path) as new:
            old.close()
            assert sock_path.exists()
            assert Path(f"{sock_path}.lock").exists()
            new.settimeout(TIMEOUT)
            with Channel.connect(sock_path, timeout=TIMEOUT), new.accept():
                pass
    assert not sock_path.exists()
    assert not Path(f"{sock_path}.lock").exists()


# -- 1. the acknowledged UnixRights mode (macOS's default; the shared suite runs it too) ----


def _held(ch: Channel) -> int:
    return int(ch._session._held_fds)


def test_default_mode_is_the_platforms() -> None:
    assert UnixRights().acknowledge is FACTS.ack_fds
    assert UnixRights(acknowledge=True).acknowledge is True
    assert repr(UnixRights()) == "UnixRights()"
    with pytest.raises(ValueError):
        UnixRights(window=0)


def test_acked_sender_keeps_duplicates_until_the_receiver_acknowledges() -> None:
    a, b = Channel.pair(transport=UnixRights(acknowledge=True, window=8))
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        r, w = os.pipe()
        try:
            for i in range(3):
                a.send(b"m%d" % i, [r])
        finally:
            os.close(r)  # the caller closes at once, as promised it may
            os.close(w)
        assert _held(a) == 3  # below half the window: no acknowledgement asked yet
        a.send(b"urgent", [0])  # 4 held = half the window: asks for one
        for _ in range(4):
            b.recv().close()
        a.send(b"no fds")  # reads the acknowledgement before writing
        assert _held(a) == 0
        b.recv().close()


def test_acked_window_bounds_what_a_sender_holds_for_a_peer_that_does_not_read() -> None:
    a, b = Channel.pair(transport=UnixRights(acknowledge=True, window=4))
    with a, b:
        a.settimeout(0.2)
        for _ in range(4):
            a.send(b"x", [0])
        with pytest.raises(TimeoutError) as info:
            a.send(b"too many", [0])
        assert getattr(info.value, "characters_written", None) == 0  # not taken
        assert _held(a) == 4
        b.settimeout(TIMEOUT)
        for _ in range(4):
            b.recv().close()
        a.send(b"now it goes", [0])  # the acknowledgement made room
        with b.recv() as msg:
            assert msg.payload == b"now it goes"


def test_acked_sender_releases_everything_when_the_peer_closes() -> None:
    a, b = Channel.pair(transport=UnixRights(acknowledge=True, window=64))
    with a:
        a.settimeout(TIMEOUT)
        a.send(b"x", [0, 1, 2])
        b.close()
        assert _held(a) == 3
        with pytest.raises(Exception):  # noqa: B017 - EOF or a reset: either ends it
            a.recv()
        assert _held(a) == 0


@pytest.mark.parametrize(("sender", "receiver"), [(True, False), (False, True)])
def test_ends_of_different_modes_fail_clearly(sender: bool, receiver: bool) -> None:
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a = Channel(x, transport=UnixRights(acknowledge=sender))
    with a, Channel(y, transport=UnixRights(acknowledge=receiver)) as b:
        b.settimeout(TIMEOUT)
        a.send(b"x", [0])
        with pytest.raises(ProtocolError, match="same mode"):
            b.recv()


def test_acked_message_larger_than_the_window_goes_after_small_unacknowledged_ones() -> None:
    # Three small messages stay below half the window, so nobody asked for
    # an acknowledgement; a message of more fds than the window must still go.
    a, b = Channel.pair(transport=UnixRights(acknowledge=True, window=8))
    with a, b:
        a.settimeout(2.0)
        b.settimeout(TIMEOUT)
        for _ in range(3):
            a.send(b"small", [0])
        a.send(b"big", [0] * 10)
        for _ in range(4):
            b.recv().close()
        a.send(b"after", [0])  # the big one asked for an acknowledgement: room again
        assert _held(a) == 1
        with b.recv() as msg:
            assert msg.payload == b"after"
