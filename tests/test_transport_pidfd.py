"""PidfdGetfd: pulls, acknowledgements, and every ordering of close and death.

All with real processes and the real kernel; waits are polls with timeouts.
"""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import sys

import pytest

if sys.platform == "win32":
    pytest.skip(
        "PidfdGetfd needs Linux >= 5.6 (pidfd_open, pidfd_getfd) and fork; Windows has neither",
        allow_module_level=True,
    )

import ctypes
import errno
import os
import platform
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fdchannel import Channel, ChannelClosed, FdsWithdrawn, ProtocolError, UnverifiedSender
from fdchannel.transports import PidfdGetfd, UnixRights, _pidfd_linux
from fdchannel.transports._pidfd import DEFAULT_WINDOW

from ._aio import loop_kind, run  # noqa: F401 - fixtures
from ._proc import TIMEOUT, fork_child, limit_fds_to_free_slots, run_child, wait_child
from ._transports import PIDFD_UNAVAILABLE, tcp_socketpair

Run = Callable[..., Any]

pytestmark = pytest.mark.skipif(PIDFD_UNAVAILABLE is not None, reason=PIDFD_UNAVAILABLE or "")

Pair = Callable[[], tuple[Channel, Channel]]


def _unix() -> tuple[Channel, Channel]:
    return Channel.pair(transport=PidfdGetfd())


def _tcp() -> tuple[Channel, Channel]:
    x, y = tcp_socketpair()
    return Channel(x, transport=PidfdGetfd()), Channel(y, transport=PidfdGetfd())


@pytest.fixture(params=[_unix, _tcp], ids=["unix", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Channel, Channel]]:
    a, b = request.param()
    try:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        yield a, b
    finally:
        a.close()
        b.close()


def eof_within(fd: int, timeout: float = TIMEOUT) -> bool:
    """True if pipe read end *fd* reaches EOF within *timeout* (nothing is written to it)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    if not poller.poll(int(timeout * 1000)):
        return False
    return os.read(fd, 1) == b""


def still_open(fd: int) -> bool:
    """True if pipe read end *fd* has no EOF right now (some write end lives)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return not poller.poll(0)


def signal_ready(w: int) -> None:
    os.write(w, b"!")


def wait_ready(r: int) -> None:
    poller = select.poll()
    poller.register(r, select.POLLIN)
    assert poller.poll(int(TIMEOUT * 1000)), "the other process never signalled"
    assert os.read(r, 1) == b"!"


# -- the basics ---------------------------------------------------------------


def test_round_trip_between_processes(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    r, w = os.pipe()

    def child() -> None:
        a.close()
        with b.recv() as msg:
            assert msg.payload == b"pipe"
            (fd,) = msg.fds
            assert not os.get_inheritable(fd.fileno())
            os.write(fd.fileno(), b"via pidfd_getfd")
        b.send(b"done")

    try:
        pid = fork_child(child)
        a.send(b"pipe", fds=[w])
        assert a.recv().payload == b"done"
        assert wait_child(pid) == 0
        assert os.read(r, 100) == b"via pidfd_getfd"
    finally:
        os.close(r)
        os.close(w)


def test_sender_keeps_copies_until_acknowledged(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        a.send(b"x", fds=[w])
        os.close(w)  # the caller may close at once: the session holds a copy
        w = -1
        with b.recv() as msg:
            assert len(msg.fds) == 1
        # The receiver's copy is closed; the sender's copy keeps the pipe
        # open until the acknowledgement is processed on the sender's side.
        assert still_open(r)
        a.send(b"y")  # processes the acknowledgement that arrived meanwhile
        assert eof_within(r)
        assert b.recv().payload == b"y"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_send_never_waits_for_acknowledgements(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.setblocking(False)  # would raise BlockingIOError if send had to wait
    r, w = os.pipe()
    try:
        for i in range(50):
            a.send(b"%d" % i, fds=[w, r])
        for i in range(50):
            with b.recv() as msg:
                assert msg.payload == b"%d" % i
                assert len(msg.fds) == 2
    finally:
        os.close(r)
        os.close(w)


def test_many_fds_in_one_message(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        a.send(b"many", fds=[w] * 1000)
        with b.recv() as msg:
            assert len(msg.fds) == 1000
            assert {os.fstat(f.fileno()).st_ino for f in msg.fds} == {os.fstat(w).st_ino}
    finally:
        os.close(r)
        os.close(w)


def test_a_socket_crosses_and_works(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    x, y = socket.socketpair()
    with x, y:
        a.send(b"sock", fds=[x])
        with b.recv() as msg, msg.fds[0].socket() as s:
            s.sendall(b"ping")
            assert y.recv(4) == b"ping"


# -- the orderings ------------------------------------------------------------


def test_receiver_closes_first_releases_the_senders_copies(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()

    def receiver() -> None:
        a.close()
        os.close(ready_r)
        wait_for_fd = b  # never reads: closes with the message unread
        wait_for_fd.close()
        signal_ready(ready_w)

    try:
        a.send(b"never taken", fds=[w])
        os.close(w)
        w = -1
        pid = fork_child(receiver)
        b.close()
        os.close(ready_w)
        ready_w = -1
        wait_ready(ready_r)
        assert still_open(r)  # the sender still holds its copy...
        # ...until it reads the EOF (AF_UNIX reports a peer that closed with
        # unread data as a reset)
        with pytest.raises((ChannelClosed, ConnectionResetError)):
            a.recv()
        assert eof_within(r)
        assert wait_child(pid) == 0
    finally:
        for fd in (r, w, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)


def test_receiver_dies_releases_the_senders_copies(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    r, w = os.pipe()

    def receiver() -> None:
        os._exit(0)  # dies without closing anything

    try:
        a.send(b"never taken", fds=[w])
        os.close(w)
        w = -1
        assert wait_child(fork_child(receiver)) == 0
        b.close()
        with pytest.raises((ChannelClosed, ConnectionResetError)):
            a.recv()
        assert eof_within(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _reuse_numbers(n: int = 64) -> list[int]:
    """Open *n* decoy files; the kernel hands out the lowest free numbers,
    so every number the session just released is now a different file."""
    decoys = [os.open("/dev/zero", os.O_RDONLY) for _ in range(n)]
    return decoys


def test_sender_closes_with_messages_in_flight_never_misdelivers(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()

    def sender() -> None:
        b.close()
        r, w = os.pipe()
        for i in range(5):
            a.send(b"in flight %d" % i, fds=[w, r])
        os.close(r)
        os.close(w)
        a.close()  # lease first, then the unacknowledged copies
        _reuse_numbers()  # the released numbers now name /dev/zero
        signal_ready(ready_w)
        wait_ready(done_r)  # stay alive: this is "closed", not "exited"

    pid = fork_child(sender)
    try:
        a.close()
        wait_ready(ready_r)
        for _ in range(5):
            with pytest.raises(FdsWithdrawn, match="closed its channel"):
                b.recv()
        with pytest.raises(ChannelClosed):
            b.recv()
        signal_ready(done_w)
        assert wait_child(pid) == 0
    finally:
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_sender_dies_with_messages_in_flight(pair: tuple[Channel, Channel], reaped: bool) -> None:
    a, b = pair

    def sender() -> None:
        b.close()
        _r, w = os.pipe()
        a.send(b"orphan", fds=[w])
        a.send(b"no fds, still delivered")
        os._exit(0)  # dies holding its copies: the kernel closes them

    pid = fork_child(sender)
    a.close()
    if reaped:
        assert wait_child(pid) == 0
    else:
        # Wait for the exit without reaping: the sender stays a zombie.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    try:
        with pytest.raises(FdsWithdrawn, match="exited"):
            b.recv()
        assert b.recv().payload == b"no fds, still delivered"
        with pytest.raises(ChannelClosed):
            b.recv()
    finally:
        if not reaped:
            assert wait_child(pid) == 0


def test_permission_denied_drops_the_message_and_the_channel_stays_usable() -> None:
    a, b = Channel.pair(transport=PidfdGetfd())
    r, w = os.pipe()

    def unprivileged_receiver() -> None:
        a.close()
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)  # no ptrace rights over root
        b.settimeout(TIMEOUT)
        with pytest.raises(PermissionError, match="not allowed to copy fds") as info:
            b.recv()
        assert info.value.errno == errno.EPERM
        assert b.recv().payload == b"after"  # the channel stays usable
        b.send(b"ok")
        b.close()

    try:
        a.settimeout(TIMEOUT)
        pid = fork_child(unprivileged_receiver)
        b.close()
        a.send(b"denied", fds=[w])
        os.close(w)
        w = -1
        a.send(b"after")
        assert a.recv().payload == b"ok"
        assert wait_child(pid) == 0
        # The refusal was acknowledged, so the sender released its copy.
        with pytest.raises(ChannelClosed):
            a.recv()
        assert eof_within(r)
    finally:
        a.close()
        os.close(r)
        if w >= 0:
            os.close(w)


# -- mismatches and support -------------------------------------------------------


@pytest.mark.parametrize("sender_is_pidfd", [True, False])
def test_transport_mismatch_is_a_protocol_error_on_the_first_message(sender_is_pidfd: bool) -> None:
    x, y = socket.socketpair()
    ends = (PidfdGetfd(), UnixRights()) if sender_is_pidfd else (UnixRights(), PidfdGetfd())
    a, b = Channel(x, transport=ends[0]), Channel(y, transport=ends[1])
    r, w = os.pipe()
    try:
        b.settimeout(TIMEOUT)
        a.send(b"first", fds=[w, r])
        with pytest.raises(ProtocolError, match="both ends must use the same transport"):
            b.recv()
        with pytest.raises(ProtocolError, match="same transport"):
            b.recv()  # unusable, and says why
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_peer_naming_an_fd_it_lacks_is_a_protocol_error() -> None:
    a, b = Channel.pair(transport=PidfdGetfd())
    r, w = os.pipe()
    try:
        b.settimeout(TIMEOUT)
        a.send(b"ok", fds=[w])  # establishes the lease
        b.recv().fds[0].close()
        out = a._session.outgoing([w])
        a._session.discard(out)  # the sender released that copy: the number is free
        x = a._sock
        from fdchannel._codec import pack_header

        x.sendall(pack_header(PidfdGetfd.wire_id, 1, len(out.aux), 0) + out.aux)
        with pytest.raises(ProtocolError, match="an fd it does not have"):
            b.recv()
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


_NR = {
    "x86_64": {"pidfd_getfd": 438, "kcmp": 312, "socket": 41},
    "aarch64": {"pidfd_getfd": 438, "kcmp": 272, "socket": 198},
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def deny_syscall(name: str, err: int = errno.ENOSYS) -> None:
    """Make system call *name* fail with *err* in this process, for good (seccomp).

    A real kernel mechanism: the way a container or an old kernel looks.
    """
    machine = platform.machine()
    filt = [  # struct sock_filter: code, jt, jf, k
        (0x20, 0, 0, 4),  # ld [arch]
        (0x15, 1, 0, _AUDIT_ARCH[machine]),  # jeq arch, skip the allow
        (0x06, 0, 0, 0x7FFF0000),  # ret ALLOW
        (0x20, 0, 0, 0),  # ld [nr]
        (0x15, 0, 1, _NR[machine][name]),  # jeq nr
        (0x06, 0, 0, 0x00050000 | err),  # ret ERRNO(err)
        (0x06, 0, 0, 0x7FFF0000),  # ret ALLOW
    ]

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    prog_filters = (SockFilter * len(filt))(*(SockFilter(*f) for f in filt))
    prog = SockFprog(len(filt), prog_filters)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


@pytest.mark.skipif(platform.machine() not in _NR, reason="seccomp numbers known for x86_64/aarch64")
def test_kernel_without_pidfd_getfd_fails_at_construction() -> None:
    def body() -> None:
        deny_syscall("pidfd_getfd")
        assert PidfdGetfd.unavailable_reason() is not None
        with pytest.raises(OSError, match="pidfd_getfd") as info:
            Channel.pair(transport=PidfdGetfd())
        assert info.value.errno == errno.ENOSYS
        Channel.pair()[0].close()  # the in-band default still works

    run_child(body)


def test_python_without_pidfd_open_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "pidfd_open")
    with pytest.raises(OSError, match=r"os\.pidfd_open"):
        Channel.pair(transport=PidfdGetfd())


@pytest.mark.skipif(platform.machine() not in _NR, reason="seccomp numbers known for x86_64/aarch64")
def test_without_kcmp_the_lease_is_compared_by_pulling_it_again() -> None:
    def body() -> None:
        deny_syscall("kcmp")
        _pidfd_linux._kcmp_works = None
        a, b = Channel.pair(transport=PidfdGetfd())
        r, w = os.pipe()
        try:
            b.settimeout(TIMEOUT)
            a.send(b"one", fds=[w])
            with b.recv() as msg:
                assert os.fstat(msg.fds[0].fileno()).st_ino == os.fstat(w).st_ino
            assert _pidfd_linux._kcmp_works is False
            a.send(b"two", fds=[w])
            a.close()
            decoys = _reuse_numbers()
            with pytest.raises(FdsWithdrawn):
                b.recv()
            for fd in decoys:
                os.close(fd)
        finally:
            a.close()
            b.close()
            os.close(r)
            os.close(w)

    run_child(body)


@pytest.mark.skipif(platform.machine() not in _NR, reason="seccomp numbers known for x86_64/aarch64")
def test_a_sender_that_cannot_be_proven_the_peer_is_refused_clearly() -> None:
    # A socketpair this process made, its other end in a child: the child is
    # proven the peer through its socket, which for AF_UNIX asks the
    # kernel's socket diagnostics (a netlink socket).  Where that is
    # unavailable the receiver must refuse, saying why, and pull nothing.
    def body() -> None:
        a, b = Channel.pair(transport=PidfdGetfd())
        r, w = os.pipe()

        def sender() -> None:
            b.close()
            a.send(b"unprovable", fds=[w])
            a.settimeout(TIMEOUT)
            with pytest.raises((ChannelClosed, ConnectionResetError)):
                a.recv()  # until the receiver is done

        pid = fork_child(sender)
        a.close()
        deny_syscall("socket", errno.EPERM)
        b.settimeout(TIMEOUT)
        with pytest.raises(UnverifiedSender, match="cannot prove that process") as info:
            b.recv()
        assert isinstance(info.value, ProtocolError)
        b.close()
        assert wait_child(pid) == 0
        os.close(r)
        os.close(w)

    run_child(body)


# -- reading for acknowledgements never buffers data nobody asked for ---------------


def _send_until_full(ch: Channel, big: bytes) -> int:
    """Push big messages until the socket is full; return how many were taken."""
    try:
        ch.flush()
    except BlockingIOError:
        return 0  # still busy with the last one
    taken = 0
    try:
        while True:
            ch.send(big)
            taken += 1
    except BlockingIOError as exc:
        taken += exc.characters_written > 0  # taken, the rest pending
    return taken


def test_send_does_not_pull_unasked_data_into_memory() -> None:
    # send() reads what arrived to see acknowledgements; if it read on past
    # data frames, a peer streaming to a process that only sends would fill
    # that process's memory and never feel backpressure.
    a, b = Channel.pair(transport=PidfdGetfd())
    with a, b:
        a.setblocking(False)
        big = b"x" * (1 << 20)
        taken = _send_until_full(a, big)
        for _ in range(50):
            b.send(b"tick")
            taken += _send_until_full(a, big)
        # What the socket holds plus the one message b started to buffer.
        assert taken <= 4
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        flusher = threading.Thread(target=a.flush)
        flusher.start()
        try:
            for _ in range(taken):  # nothing was lost either
                assert b.recv().payload == big
        finally:
            flusher.join(TIMEOUT)
        assert not flusher.is_alive()


def test_async_send_does_not_pull_unasked_data_into_memory(run: Run) -> None:
    import asyncio

    from fdchannel.aio import AsyncChannel

    async def main() -> None:
        a, b = AsyncChannel.pair(transport=PidfdGetfd())
        async with a, b:
            big = b"x" * (1 << 20)
            taken = 0

            async def stream() -> None:
                nonlocal taken
                while True:
                    await a.send(big)
                    taken += 1

            task = asyncio.create_task(stream())
            for _ in range(50):
                await b.send(b"tick")
                for _ in range(3):  # let the streamer take what it can
                    await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await task
            taken += getattr(info.value, "characters_written", 0) > 0  # taken, the rest pending
            assert taken <= 4
            async with asyncio.timeout(TIMEOUT):
                flushed = asyncio.create_task(a.flush())
                for _ in range(taken):  # nothing was lost either
                    assert (await b.recv()).payload == big
                await flushed

    run(main())


def test_acknowledgements_behind_an_unread_message_still_arrive() -> None:
    # send() reads ahead of recv() for acknowledgements; one message the
    # application has not asked for yet must not stop that, or every fd
    # sent afterwards stays duplicated in the sender (EMFILE in the end).
    a, b = Channel.pair(transport=PidfdGetfd())
    r, w = os.pipe()
    with a, b, open(r, "rb"), open(w, "wb"):
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        b.send(b"not asked for yet")
        base = len(os.listdir("/proc/self/fd"))
        peak = 0
        for _ in range(20):  # in lockstep, so the figure does not depend on scheduling
            for _ in range(100):
                a.send(b"m", fds=[w])
            peak = max(peak, len(os.listdir("/proc/self/fd")) - base)
            for _ in range(100):
                b.recv().close()  # pulls the fds and acknowledges them
        # Acknowledged batch by batch (at most two batches held), not all 2000.
        assert peak <= 200
        assert a.recv().payload == b"not asked for yet"


# -- close() from another thread while recv() pulls ------------------------------------


@pytest.mark.parametrize("make", [_unix, _tcp], ids=["unix", "tcp"])
def test_close_from_another_thread_during_recv_leaks_nothing_and_says_closed(make: Pair) -> None:
    # The receiving thread may be anywhere in recv() (reading, pulling,
    # acknowledging) when close() lands: every fd pulled is either delivered
    # or closed (the autouse leak check), and recv() says the channel is
    # closed, never a bare EBADF from the socket close() just released.
    import random
    import time

    r, w = os.pipe()
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + 20.0
    try:
        for _ in range(300):
            if time.monotonic() > deadline:
                break
            a, b = make()
            with a:
                b.settimeout(TIMEOUT)
                for _ in range(2):
                    a.send(b"x", fds=[w] * 20)
                started = threading.Event()

                def receive(b: Channel = b, started: threading.Event = started) -> None:
                    started.set()
                    try:
                        for _ in range(2):
                            b.recv().close()
                        outcome = "delivered"
                    except ValueError as exc:
                        outcome = f"ValueError: {exc}"
                    except BaseException as exc:
                        outcome = f"{type(exc).__name__}: {exc}"
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1

                thread = threading.Thread(target=receive)
                thread.start()
                assert started.wait(TIMEOUT)
                spin = time.perf_counter() + random.random() * 0.002  # land anywhere in recv()
                while time.perf_counter() < spin:
                    pass
                b.close()
                thread.join(TIMEOUT)
                assert not thread.is_alive()
    finally:
        os.close(r)
        os.close(w)
    allowed = {"delivered", "ValueError: I/O operation on a closed Channel"}
    assert set(outcomes) <= allowed, outcomes


# -- the window: a peer that never acknowledges ------------------------------------------


def _silent_reader(sock: socket.socket, *others: socket.socket) -> int:
    """Fork a peer that reads every frame on *sock* and never acknowledges (*others*: sockets it drops)."""

    def body() -> None:
        for other in others:
            other.close()
        sock.settimeout(TIMEOUT)
        while sock.recv(1 << 16):
            pass

    return fork_child(body)


@pytest.mark.parametrize("sockets", [socket.socketpair, tcp_socketpair], ids=["unix", "tcp"])
def test_a_peer_that_never_acknowledges_leaves_the_sender_room(sockets: Callable[[], Any]) -> None:
    # The review's receiver read every frame and never acknowledged: the
    # sender held 4,087 duplicates, then even open() failed (EMFILE).
    def body() -> None:
        x, y = sockets()
        peer = _silent_reader(y, x)
        y.close()
        r, w = os.pipe()
        # The usual soft limit: what the default window must stay well below.
        limit_fds_to_free_slots(1024 - len(os.listdir("/proc/self/fd")))
        with Channel(x, transport=PidfdGetfd()) as a:
            # Long enough for the reader to drain a full socket, short
            # enough to end the test soon once the window is full.
            a.settimeout(0.5)
            sent = 0
            with pytest.raises(TimeoutError) as info:
                for _ in range(2000):
                    a.send(b"m", fds=[w])
                    sent += 1
            assert info.value.characters_written == 0  # not taken: send it again later
            assert sent == DEFAULT_WINDOW
            session: Any = a._session
            assert session.held == DEFAULT_WINDOW
            # The rest of the process still has room.
            files = [open(os.devnull, "rb") for _ in range(500)]  # noqa: SIM115 - closed below
            for f in files:
                f.close()
            a.setblocking(False)
            with pytest.raises(BlockingIOError) as refused:
                a.send(b"m", fds=[w])
            assert refused.value.characters_written == 0
            assert session.held == DEFAULT_WINDOW
            a.settimeout(TIMEOUT)
            a.send(b"messages without fds never wait")
        os.close(r)
        os.close(w)
        assert wait_child(peer) == 0

    run_child(body)


def test_peers_that_never_acknowledge_hold_at_most_half_the_fd_table_together() -> None:
    # One window per channel is not enough: a server sending fds to a few
    # clients that never acknowledge would still fill its fd table.
    import resource

    def body() -> None:
        r, w = os.pipe()
        ends = [socket.socketpair() for _ in range(4)]
        every = [s for pair in ends for s in pair]
        peers = [_silent_reader(y, *(s for s in every if s is not y)) for _, y in ends]
        for _, y in ends:
            y.close()
        limit = 600
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        channels = [Channel(x, transport=PidfdGetfd()) for x, _ in ends]
        held: list[int] = []
        for ch in channels:
            ch.settimeout(0.5)
            with pytest.raises(TimeoutError) as info:
                for _ in range(DEFAULT_WINDOW + 1):
                    ch.send(b"m", fds=[w])
            assert info.value.characters_written == 0
            session: Any = ch._session
            held.append(session.held)
        # The first channel filled its window; the rest shared what was left
        # of half the table, one message each beyond it at most.
        assert held[0] == DEFAULT_WINDOW
        assert sum(held) <= limit // 2 + len(channels)
        assert all(h >= 1 for h in held)  # every channel still made progress
        files = [open(os.devnull, "rb") for _ in range(200)]  # noqa: SIM115 - closed below
        for f in files:
            f.close()
        for ch in channels:
            ch.close()
        os.close(r)
        os.close(w)
        for pid in peers:
            assert wait_child(pid) == 0

    run_child(body)


def test_the_window_is_configurable_and_reopens_on_acknowledgement() -> None:
    a, b = Channel.pair(transport=PidfdGetfd(window=3))
    r, w = os.pipe()
    with a, b, open(r, "rb"), open(w, "wb"):
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"1", fds=[w, w])
        a.send(b"2", fds=[w])
        a.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            a.send(b"3", fds=[w])  # 4 > 3
        assert info.value.characters_written == 0
        for payload in (b"1", b"2"):
            with b.recv() as msg:
                assert msg.payload == payload
        a.send(b"3", fds=[w])  # the acknowledgements arrived: room again
        with pytest.raises(BlockingIOError):
            a.send(b"4", fds=[w] * 10)  # waits for 3's acknowledgement
        with b.recv() as msg:
            assert msg.payload == b"3"
        a.send(b"4", fds=[w] * 10)  # more than the window goes once nothing else is held
        with b.recv() as msg:
            assert len(msg.fds) == 10
    with pytest.raises(ValueError, match="window"):
        PidfdGetfd(window=0)
    assert repr(PidfdGetfd(window=3)) == "PidfdGetfd(window=3)"


def test_acknowledgements_behind_too_much_unread_data_fail_the_send_instead_of_spinning() -> None:
    # The sender reads ahead of recv() for acknowledgements only up to a
    # bound; an acknowledgement queued behind more unread data than that
    # cannot be seen, so a send waiting for it says so instead of polling a
    # readable socket until its timeout.
    a, b = Channel.pair(transport=PidfdGetfd(window=1))
    r, w = os.pipe()
    big = b"x" * (3 << 20)
    with a, b, open(r, "rb"), open(w, "wb"):
        a.settimeout(TIMEOUT)
        a.send(b"held", fds=[w])
        b.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            b.send(big)
        assert info.value.characters_written > 0  # taken, its rest pending
        b.settimeout(TIMEOUT)
        b.recv().close()  # acknowledged, but the acknowledgement queues behind big's rest
        flusher = threading.Thread(target=b.flush)
        flusher.start()
        try:
            with pytest.raises(BlockingIOError, match="recv\\(\\) them") as refused:
                a.send(b"more", fds=[w])
            assert refused.value.errno == errno.ENOBUFS
            assert refused.value.characters_written == 0
            assert a.recv().payload == big
        finally:
            flusher.join(TIMEOUT)
        assert not flusher.is_alive()
        a.send(b"more", fds=[w])  # the acknowledgement was behind big: now seen
        with b.recv() as msg:
            assert msg.payload == b"more"


def test_async_send_waits_for_the_window(run: Run) -> None:
    import asyncio

    from fdchannel.aio import AsyncChannel

    async def main() -> None:
        a, b = AsyncChannel.pair(transport=PidfdGetfd(window=1))
        r, w = os.pipe()
        async with a, b:
            try:
                async with asyncio.timeout(TIMEOUT):
                    await a.send(b"held", fds=[w])
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.05):  # the window is full: it waits
                            await a.send(b"next", fds=[w])
                    waiting = asyncio.create_task(a.send(b"next", fds=[w]))
                    with await b.recv() as msg:  # acknowledges, and so opens the window
                        assert msg.payload == b"held"
                    await waiting
                    with await b.recv() as msg:
                        assert msg.payload == b"next"
            finally:
                os.close(r)
                os.close(w)

    run(main())
