"""The Channel's behaviour, run against every transport in PAIR_FACTORIES.

What the blocking and the async channel share (the tests taking `chans` or
`any_pair`) runs against `AsyncChannel` too, on each loop kind, through
`tests/_async_view.py`; what only the blocking channel has (non-blocking
mode, send timeouts, fork) takes `blocking_chans` or `make_pair`.

Transport-specific checks (SCM_RIGHTS batches, raw frames on the socket,
MSG_CTRUNC) live in test_channel_unix.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
import threading
from collections.abc import Iterator

import pytest

from fdchannel import (
    Channel,
    ChannelClosed,
    FdChannelError,
    FdsWithdrawn,
    LimitExceeded,
    Message,
    OwnedFd,
    ProtocolError,
)
from fdchannel.aio import AsyncChannel

from ._async_view import AsyncPairFactory, async_pair_params
from ._portable import read_fd
from ._proc import fork_child, needs_fork, run_child, wait_child
from ._transports import PAIR_FACTORIES, PairFactory

TIMEOUT = 10.0


class NoTimeout:
    """A blocking-channel factory whose pairs keep the default: no timeout at all.

    So the shared tests also run the paths a timeout never takes (the
    blocking fast paths of send and recv, where the kernel itself waits).
    A watchdog shuts both sockets down after TIMEOUT, so a hang still fails
    the test (the blocked call returns EOF or EPIPE) instead of CI.
    """

    def __init__(self, factory: PairFactory) -> None:
        self.factory = factory

    def __call__(self, **kwargs: object) -> tuple[Channel, Channel]:
        return self.factory(**kwargs)


def _no_timeout_params() -> list[object]:
    params = []
    for p in PAIR_FACTORIES:
        factory: PairFactory = p.values[0]  # type: ignore[assignment]
        params.append(pytest.param(NoTimeout(factory), id=f"{p.id}-no-timeout", marks=p.marks))
    return params


@pytest.fixture(params=[*PAIR_FACTORIES, *_no_timeout_params(), *async_pair_params()])
def any_pair(request: pytest.FixtureRequest) -> Iterator[PairFactory]:
    """Pairs of every transport, of `Channel` (with a timeout and without one) and of
    `AsyncChannel` (driven through `BlockingView`, on each loop kind): for the
    behaviour both share."""
    param = request.param
    if not isinstance(param, tuple):
        yield param
        return
    factory = AsyncPairFactory(*param)
    try:
        yield factory  # type: ignore[misc]
    finally:
        factory.shutdown()


def _with_timeouts(factory: PairFactory) -> Iterator[tuple[Channel, Channel]]:
    a, b = factory()
    if not isinstance(factory, NoTimeout):
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        yield a, b
        a.close()
        b.close()
        return
    assert a.gettimeout() is None
    assert b.gettimeout() is None
    fired = threading.Event()

    def watchdog() -> None:
        fired.set()
        for ch in (a, b):
            with contextlib.suppress(OSError, ValueError):
                ch._sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(TIMEOUT, watchdog)
    timer.daemon = True
    timer.start()
    try:
        yield a, b
    finally:
        timer.cancel()
        a.close()
        b.close()
    assert not fired.is_set(), f"a blocking call hung for {TIMEOUT}s (the watchdog shut the sockets down)"


@pytest.fixture
def chans(any_pair: PairFactory) -> Iterator[tuple[Channel, Channel]]:
    """A connected pair of either channel, with timeouts (or, for `NoTimeout` pairs, a
    watchdog), so a bug fails instead of hanging."""
    yield from _with_timeouts(any_pair)


@pytest.fixture
def blocking_chans(make_pair: PairFactory) -> Iterator[tuple[Channel, Channel]]:
    """A connected `Channel` pair with timeouts: for what only the blocking channel has
    (non-blocking mode, send timeouts, fork)."""
    yield from _with_timeouts(make_pair)


def in_thread(target: object, *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def join(t: threading.Thread) -> None:
    t.join(TIMEOUT)
    assert not t.is_alive(), "thread did not finish in time"


def read(fd: int, n: int = 100) -> bytes:
    """os.read with a timeout: a bug fails the test instead of hanging it."""
    return read_fd(fd, n, TIMEOUT)


# -- messages ------------------------------------------------------------------


def test_payload_and_fds_of_every_kind_arrive_usable(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    r, w = os.pipe()
    listener = socket.create_server(("127.0.0.1", 0))
    with tempfile.TemporaryFile() as f:
        f.write(b"file contents")
        f.flush()
        a.send(b"three kinds", fds=[f, w, listener])
    os.close(w)  # the caller may close its fds as soon as send() returns
    port = listener.getsockname()[1]
    listener.close()
    with b.recv() as msg:
        assert msg.payload == b"three kinds"
        assert len(msg.fds) == 3
        fobj, wfd, lsock = msg.fds
        with fobj.open("rb") as got:
            got.seek(0)
            assert got.read() == b"file contents"
        os.write(wfd.fileno(), b"through the pipe")
        with lsock.socket() as srv, socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
            assert srv.family == socket.AF_INET
            assert srv.type == socket.SOCK_STREAM
            conn, _ = srv.accept()
            with conn:
                c.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    assert read(r) == b"through the pipe"
    os.close(r)


def test_empty_payload_with_fds_and_bytes_without_fds(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    a.send(b"", fds=[0])
    a.send(b"only bytes")
    a.send(b"")
    a.send()
    with b.recv() as m1:
        assert (m1.payload, len(m1.fds)) == (b"", 1)
        assert os.path.sameopenfile(m1.fds[0].fileno(), 0)
    assert (b.recv().payload, b.recv().payload, b.recv().payload) == (b"only bytes", b"", b"")


def test_payload_types(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    a.send(bytearray(b"ba"))
    a.send(memoryview(b"xmvx")[1:3])
    assert b.recv().payload == b"ba"
    assert b.recv().payload == b"mv"


def test_many_messages_keep_order_and_boundaries(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    r, w = os.pipe()
    count = 300

    def sender() -> None:
        for i in range(count):
            a.send(str(i).encode() * (i % 7), fds=[r, w][: i % 3])

    t = in_thread(sender)
    for i in range(count):
        with b.recv() as msg:
            assert msg.payload == str(i).encode() * (i % 7)
            assert len(msg.fds) == min(i % 3, 2)
    join(t)
    os.close(r)
    os.close(w)


def test_fds_arrive_in_the_order_sent(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    pipes = [os.pipe() for _ in range(5)]
    a.send(b"", fds=[w for _, w in pipes])
    with b.recv() as msg:
        for i, fd in enumerate(msg.fds):
            os.write(fd.fileno(), bytes([i]))
    for i, (r, w) in enumerate(pipes):
        assert read(r, 1) == bytes([i])
        os.close(r)
        os.close(w)


def test_one_thousand_fds_in_one_message(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    r, w = os.pipe()
    fds = [r, w] * 500
    t = in_thread(a.send, b"many", fds)
    with b.recv() as msg:
        assert msg.payload == b"many"
        assert len(msg.fds) == 1000
        # Each fd is the one sent at that position.
        for i in (0, 1, 252, 253, 254, 505, 998, 999):
            assert os.path.sameopenfile(msg.fds[i].fileno(), fds[i])
        assert len({fd.fileno() for fd in msg.fds}) == 1000
    join(t)
    os.close(r)
    os.close(w)


def test_large_payload_arrives_whole(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    payload = os.urandom(1 << 16) * 160  # 10 MiB
    t = in_thread(a.send, payload, [0])
    with b.recv() as msg:
        assert len(msg.payload) == len(payload)
        assert msg.payload == payload
        assert len(msg.fds) == 1
    join(t)


def test_iteration_ends_when_the_peer_closes(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    for i in range(3):
        a.send(bytes([i]))
    a.close()
    assert [m.payload for m in b] == [b"\0", b"\1", b"\2"]
    with pytest.raises(ChannelClosed) as info:
        b.recv()
    assert isinstance(info.value, EOFError)
    assert isinstance(info.value, FdChannelError)


# -- ownership -------------------------------------------------------------------


def test_received_fds_are_close_on_exec(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    r, w = os.pipe()
    os.set_inheritable(r, True)
    a.send(b"", fds=[r])
    a.send(b"", fds=[r])
    with b.recv() as msg:
        assert not os.get_inheritable(msg.fds[0].fileno())
    b.settimeout(None)  # the default blocking read too (the message is there already)
    with b.recv() as msg:
        assert not os.get_inheritable(msg.fds[0].fileno())
    os.close(r)
    os.close(w)


def test_leaving_the_with_block_closes_what_nobody_took(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    r, w = os.pipe()
    a.send(b"", fds=[w, w])
    os.close(w)
    with b.recv() as msg:
        kept = msg.fds[0].detach()
    a.close()  # a duplication transport's sender keeps copies until then
    # The detached write end is still open, the other one was closed.
    os.write(kept, b"k")
    assert read(r, 1) == b"k"
    os.close(kept)
    assert read(r, 1) == b""  # all write ends gone: EOF
    os.close(r)


def test_exception_inside_the_with_block_closes_the_fds(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    r, w = os.pipe()
    a.send(b"", fds=[w])
    os.close(w)
    with pytest.raises(RuntimeError), b.recv():
        raise RuntimeError("boom")
    a.close()
    assert read(r, 1) == b""
    os.close(r)


def test_message_close_is_idempotent(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    a.send(b"x", fds=[0])
    msg = b.recv()
    assert isinstance(msg, Message)
    msg.close()
    msg.close()
    assert msg.fds[0].closed


def test_fd_objects_of_every_kind_are_accepted(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    s1, s2 = socket.socketpair()
    owned = OwnedFd(os.dup(0))
    with open(os.devnull, "rb") as f:
        a.send(b"", fds=[f, s1, owned, 0])
    s1.close()
    s2.close()
    owned.close()
    with b.recv() as msg:
        assert len(msg.fds) == 4


def test_bad_fds_are_refused_before_anything_is_written(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    f = open(os.devnull, "rb")  # noqa: SIM115
    f.close()
    with pytest.raises(ValueError, match="closed"):
        a.send(b"x", fds=[f])
    with pytest.raises(TypeError):
        a.send(b"x", fds=["not an fd"])
    with pytest.raises(ValueError, match="own socket"):
        a.send(b"x", fds=[a])
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        a.send(b"x", fds=[r])  # closed number: the kernel refuses the whole message
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        # Past the first batch of 253 too: refused before the first one leaves.
        # (A number no process can have open: r's may be reused by now.)
        a.send(b"x", fds=[0] * 299 + [1_000_000])
    assert info.value.errno == errno.EBADF
    # Nothing of any of these reached the peer.
    a.send(b"after")
    assert b.recv().payload == b"after"


# -- limits -----------------------------------------------------------------------


def test_send_limits_are_checked_before_writing(make_pair: PairFactory) -> None:
    a, b = make_pair(max_payload=10, max_fds=2)
    with a, b:
        b.setblocking(False)
        with pytest.raises(ValueError, match="max_payload"):
            a.send(b"x" * 11)
        with pytest.raises(ValueError, match="max_fds"):
            a.send(b"", fds=[0, 0, 0])
        with pytest.raises(BlockingIOError):
            b.recv()  # nothing was written
        a.send(b"x" * 10, fds=[0, 0])  # exactly at the limits is fine
        b.settimeout(TIMEOUT)
        with b.recv() as msg:
            assert (len(msg.payload), len(msg.fds)) == (10, 2)


@pytest.mark.parametrize("cls", [Channel, AsyncChannel])
def test_default_limits(cls: type[Channel] | type[AsyncChannel]) -> None:
    a, b = cls.pair()
    try:
        assert a.max_payload == 64 * 1024 * 1024
        assert a.max_fds == 1024
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("what", ["payload", "fds", "batches of fds"])
def test_peer_over_the_limits_gets_limit_exceeded_and_the_channel_says_so(
    any_pair: PairFactory, what: str
) -> None:
    make_pair = any_pair
    a, b = make_pair()
    a.settimeout(TIMEOUT)
    b.close()
    # A receiver with tighter limits than the sender.
    a2, b2 = make_pair(max_payload=4, max_fds=1)
    with a, a2, b2:
        b2.settimeout(TIMEOUT)
        r, w = os.pipe()
        if what == "payload":
            a2.max_payload = 100  # the sender's own check is not what we test
            a2.send(b"12345", fds=[r])
        elif what == "fds":
            a2.max_fds = 10
            a2.send(b"", fds=[r, w])
        else:  # the first batch of 253 rides on one byte, ahead of the header
            a2.max_fds = 1000
            a2.send(b"", fds=[r, w] * 150)
        os.close(r)
        os.close(w)
        with pytest.raises(LimitExceeded) as first:
            b2.recv()
        # Unusable afterwards, and it says why.
        with pytest.raises(ProtocolError, match="unusable") as again:
            b2.recv()
        assert str(first.value) in str(again.value)
        with pytest.raises(ProtocolError, match="unusable"):
            b2.send(b"x")


# -- blocking, non-blocking, timeouts -----------------------------------------------


def test_timeout_accessors_mirror_socket(blocking_chans: tuple[Channel, Channel]) -> None:
    a, _ = blocking_chans
    a.settimeout(None)
    assert a.gettimeout() is None
    a.setblocking(False)
    assert a.gettimeout() == 0.0
    a.settimeout(2)
    assert a.gettimeout() == 2.0
    a.setblocking(True)
    assert a.gettimeout() is None
    with pytest.raises(ValueError, match="non-negative"):
        a.settimeout(-1)


def test_recv_timeout_keeps_partial_data(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    b.settimeout(0.05)
    with pytest.raises(TimeoutError):
        b.recv()
    a.send(b"later", fds=[0])
    b.settimeout(TIMEOUT)
    with b.recv() as msg:
        assert msg.payload == b"later"


def test_nonblocking_recv_raises_until_a_whole_message_is_in(blocking_chans: tuple[Channel, Channel]) -> None:
    a, b = blocking_chans
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv()
    payload = b"p" * (1 << 20)
    t = in_thread(a.send, payload, [0])
    got = None
    misses = 0
    while got is None:
        try:
            got = b.recv()
        except BlockingIOError:
            misses += 1
            b.settimeout(TIMEOUT)  # wait for more, then poll again
            b.setblocking(False)
    join(t)
    with got:
        assert got.payload == payload
        assert len(got.fds) == 1


def _fill_until_blocked(a: Channel, chunk: bytes, fds: list[int]) -> tuple[int, int]:
    """Send until the socket is full; return (messages taken, characters_written)."""
    a.setblocking(False)
    sent = 0
    while True:
        try:
            a.send(chunk, fds=fds)
            sent += 1
        except BlockingIOError as exc:
            return sent, exc.characters_written


def _receive(b: Channel, count: int, out: list[tuple[bytes, int]]) -> None:
    for _ in range(count):
        with b.recv() as msg:
            out.append((bytes(msg.payload), len(msg.fds)))


def test_nonblocking_partial_send_never_duplicates_or_loses(blocking_chans: tuple[Channel, Channel]) -> None:
    a, b = blocking_chans
    r, w = os.pipe()
    big = b"B" * (1 << 20)
    taken, written = _fill_until_blocked(a, big, [w])
    if written:
        # Taken, remainder pending: flush() finishes it, never send() again.
        assert a.pending
        taken += 1
    else:
        assert not a.pending
    os.close(w)  # the channel keeps what it still needs
    got: list[tuple[bytes, int]] = []
    t = in_thread(_receive, b, taken, got)
    a.settimeout(TIMEOUT)
    a.flush()
    assert not a.pending
    join(t)
    assert got == [(big, 1)] * taken  # one fd per message, none twice, none lost
    a.send(b"next")
    assert b.recv().payload == b"next"
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv()
    os.close(r)


def test_message_not_taken_while_older_data_is_pending(blocking_chans: tuple[Channel, Channel]) -> None:
    a, b = blocking_chans
    big = b"B" * (1 << 20)
    # 1 MiB is more than a socket buffer holds, so the first send is partial.
    taken, written = _fill_until_blocked(a, big, [])
    assert written > 0
    taken += 1
    assert a.pending
    with pytest.raises(BlockingIOError) as info:
        a.send(b"small", fds=[0])
    assert info.value.characters_written == 0  # not taken: send it again later
    got: list[tuple[bytes, int]] = []
    t = in_thread(_receive, b, taken + 1, got)
    a.settimeout(TIMEOUT)
    a.flush()
    a.send(b"small", fds=[0])
    join(t)
    assert got == [(big, 0)] * taken + [(b"small", 1)]


def test_send_timeout_reports_characters_written(blocking_chans: tuple[Channel, Channel]) -> None:
    a, b = blocking_chans
    a.settimeout(0.05)
    big = b"T" * (1 << 20)
    taken = 0
    with pytest.raises(TimeoutError) as info:
        while True:
            a.send(big)
            taken += 1
    written = info.value.characters_written  # type: ignore[attr-defined]
    assert a.pending == (written > 0)
    a.settimeout(TIMEOUT)
    t = in_thread(a.flush)
    for _ in range(taken + (written > 0)):
        assert b.recv().payload == big
    join(t)


# -- threads ------------------------------------------------------------------------


def test_concurrent_senders_never_interleave(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    threads, per = 4, 100
    r, w = os.pipe()

    def sender(k: int) -> None:
        for i in range(per):
            body = f"{k}:{i}:".encode() * (1 + (i * 37) % 3000)
            a.send(body, fds=[w] * (1 + i % 3))

    ts = [in_thread(sender, k) for k in range(threads)]
    seen: dict[int, int] = {}
    for _ in range(threads * per):
        with b.recv() as msg:
            text = msg.payload.decode()
            k, i, _ = text.split(":", 2)
            ki, ii = int(k), int(i)
            assert text == f"{k}:{i}:" * (1 + (ii * 37) % 3000)
            assert len(msg.fds) == 1 + ii % 3
            assert seen.get(ki, -1) == ii - 1  # each thread's messages in its order
            seen[ki] = ii
    for t in ts:
        join(t)
    os.close(r)
    os.close(w)


def test_concurrent_receivers_never_split_a_message(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    count = 400
    results: list[list[tuple[bytes, int]]] = [[], []]

    def receiver(slot: int) -> None:
        while True:
            with b.recv() as msg:
                if msg.payload == b"stop":
                    return
                results[slot].append((bytes(msg.payload), len(msg.fds)))

    ts = [in_thread(receiver, 0), in_thread(receiver, 1)]
    for i in range(count):
        a.send(str(i).encode() * 100, fds=[0] * (i % 4))
    a.send(b"stop")
    a.send(b"stop")
    for t in ts:
        join(t)
    got = sorted(results[0] + results[1], key=lambda pf: int(pf[0][: len(pf[0]) // 100]))
    assert got == [(str(i).encode() * 100, i % 4) for i in range(count)]


# -- peers that go away ----------------------------------------------------------------


@needs_fork
def test_sending_to_a_closed_peer_is_brokenpipe_even_with_default_sigpipe(make_pair: PairFactory) -> None:
    a, b = make_pair()
    b.close()  # the only copy of the peer's end: it is gone

    def body() -> None:
        import signal

        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as embedders restore it
        a.settimeout(TIMEOUT)
        # Over TCP the first send may still be taken; the peer's reset
        # fails a later one.
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(10000):
                a.send(b"x", fds=[0])

    try:
        run_child(body)  # death by SIGPIPE would be exit code -13
    finally:
        a.close()


@needs_fork
def test_peer_process_dies_between_messages(make_pair: PairFactory) -> None:
    a, b = make_pair()

    def body() -> None:
        b.close()
        a.send(b"last words")
        a.send(b"with an fd", fds=[0])
        os._exit(0)  # no close: the kernel closes for the dead

    pid = fork_child(body)
    a.close()
    b.settimeout(TIMEOUT)
    try:
        assert wait_child(pid) == 0
        assert b.recv().payload == b"last words"
        if b.transport.name == "UnixRights":
            with b.recv() as msg:
                assert len(msg.fds) == 1  # in flight, the kernel kept it alive
        else:
            # A pull transport cannot take fds from a process that is gone.
            with pytest.raises(FdsWithdrawn, match="exited"):
                b.recv()
        with pytest.raises(ChannelClosed):
            b.recv()
    finally:
        b.close()


@needs_fork
def test_between_two_real_processes(make_pair: PairFactory) -> None:
    parent, child = make_pair()
    r, w = os.pipe()

    def body() -> None:
        parent.close()
        child.settimeout(TIMEOUT)
        os.close(r)
        os.close(w)
        for msg in child:
            with msg:
                (fd,) = msg.fds
                os.write(fd.fileno(), msg.payload.upper())
                child.send(b"done " + msg.payload)

    pid = fork_child(body)
    child.close()
    parent.settimeout(TIMEOUT)
    try:
        for word in (b"alpha", b"beta", b"gamma"):
            parent.send(word, fds=[w])
            assert parent.recv().payload == b"done " + word
            assert read(r) == word.upper()
    finally:
        parent.close()
        os.close(r)
        os.close(w)
    assert wait_child(pid) == 0


# -- channel object -------------------------------------------------------------------


def test_close_is_idempotent_and_later_calls_fail_clearly(chans: tuple[Channel, Channel]) -> None:
    a, _ = chans
    assert not a.closed
    assert a.fileno() >= 0
    a.close()
    a.close()
    assert a.closed
    with pytest.raises(ValueError, match="closed"):
        a.send(b"x")
    with pytest.raises(ValueError, match="closed"):
        a.recv()


def test_close_closes_fds_received_but_not_yet_returned(chans: tuple[Channel, Channel]) -> None:
    a, b = chans
    r, w = os.pipe()
    for _ in range(3):
        a.send(b"x", fds=[w])  # several frames, likely read in one go
    os.close(w)
    with b.recv():
        pass
    b.close()  # the other two messages' fds go with the channel
    a.close()
    assert read(r, 1) == b""
    os.close(r)


def test_unclosed_channel_warns(make_pair: PairFactory) -> None:
    import gc

    a, b = make_pair()
    with pytest.warns(ResourceWarning):
        del a
        gc.collect()
    b.close()


def test_context_manager(any_pair: PairFactory) -> None:
    a, b = any_pair()
    with a as entered, b:
        assert entered is a
    assert a.closed
    assert b.closed
