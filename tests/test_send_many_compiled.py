"""The compiled `send_many` and the compiled queueing of a read of several frames.

`FastPath.send_many` takes a call whose messages fit one group (plain
``bytes`` payloads, lists or tuples of fds, at most 253 fds, 500 frames and
256 KiB); `FastPath.recv` queues a read of several whole plain frames (a
group).  Everything else goes the Python way, with the same results: these
tests check that the compiled parts are really used, that each case they
do not take reaches the Python path, and that both paths write and read
the same.
"""

from __future__ import annotations

import array
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdchannel import Channel, LimitExceeded, ProtocolError, _batch, _fastpath
from fdchannel._codec import FLAG_GROUP, header_tag, pack_tagged

TIMEOUT = 10.0

compiled_only = pytest.mark.skipif(
    not _fastpath.compiled_available(), reason=f"not built here: {_fastpath.why_pure()}"
)


@contextmanager
def _pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


@contextmanager
def _channels(compiled: bool = True) -> Iterator[tuple[Channel, Channel]]:
    with _fastpath.forced(compiled):
        a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        yield a, b


def _no_python_send_many(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> Any:
        raise AssertionError("send_many went the Python way")

    monkeypatch.setattr(_batch, "prepare", refuse)


def _ino(fd: int) -> int:
    return os.fstat(fd).st_ino


# -- the compiled parts are used --------------------------------------------------------


@compiled_only
def test_a_group_is_sent_and_queued_in_c(monkeypatch: pytest.MonkeyPatch) -> None:
    with _channels() as (a, b), _pipe() as (r, w):
        _no_python_send_many(monkeypatch)
        messages = [(bytes([i]) * i, [r] if i % 2 else [w, r]) for i in range(64)]
        assert a._fast.send_many(a, messages) is True
        assert a._fast.sent_many == 64
        msg = b._fast.recv(b)  # one read, the whole group: queued in C, the first handed out
        assert msg is not None
        assert len(b._decoder.frames) == 63
        assert b._decoder.received == sum(24 + i for i in range(64))
        with msg:
            assert msg.payload == b""
            assert [_ino(f.fileno()) for f in msg.fds] == [_ino(w), _ino(r)]
        for i in range(1, 64):
            with b.recv() as msg:
                assert msg.payload == bytes([i]) * i
                assert [_ino(f.fileno()) for f in msg.fds] == ([_ino(r)] if i % 2 else [_ino(w), _ino(r)])
        assert not b._decoder.frames
        assert not b._decoder._fds
        assert b._decoder._ahead is False


@compiled_only
def test_any_contiguous_buffer_is_taken_in_c(monkeypatch: pytest.MonkeyPatch) -> None:
    class Blob(bytes):
        pass

    with _channels() as (a, b), _pipe() as (r, _w):
        _no_python_send_many(monkeypatch)
        payloads: list[Any] = [
            bytearray(b"one"),
            memoryview(b"two"),
            memoryview(bytearray(b"xthreex"))[1:-1],
            array.array("i", [1, 2, 3]),
            memoryview(b"abcd").cast("B", (2, 2)),
            Blob(b"six"),
            bytearray(),
        ]
        assert a._fast.send_many(a, [(p, [r]) for p in payloads]) is True
        for p in payloads:
            with b.recv() as msg:
                assert msg.payload == bytes(p)
                assert len(msg.fds) == 1
        # Nothing still pins the buffers: a bytearray can change size again.
        payloads[0].extend(b"more")


@compiled_only
def test_fileno_objects_and_tuples_are_taken_too(monkeypatch: pytest.MonkeyPatch) -> None:
    with _channels() as (a, b), open(os.devnull, "rb") as f:
        _no_python_send_many(monkeypatch)
        a.send_many(((b"one", (f,)), (b"two", [f.fileno(), f]), (b"three", ())))
        for payload, nfds in ((b"one", 1), (b"two", 2), (b"three", 0)):
            with b.recv() as msg:
                assert msg.payload == payload
                assert len(msg.fds) == nfds


def _handed_over(a: Channel, messages: Any) -> None:
    assert a._fast.send_many(a, messages) is False


@compiled_only
@pytest.mark.parametrize(
    "case",
    [
        "generator",
        "strided memoryview",
        "text",
        "list item",
        "too many fds",
        "too many frames",
        "too many bytes",
        "max_fds",
        "max_payload",
        "own socket",
        "bool fd",
        "negative fd",
        "empty",
    ],
)
def test_what_the_compiled_send_many_does_not_take_goes_the_python_way(case: str) -> None:
    with _channels() as (a, b), _pipe() as (r, _w):
        many: Any = {
            "generator": (m for m in [(b"x", [r])]),
            "strided memoryview": [(b"x", [r]), (memoryview(b"xyzw")[::2], [r])],
            "text": [(b"x", [r]), ("y", [r])],
            "list item": [[b"x", [r]]],
            "too many fds": [(b"x", [r] * 200), (b"y", [r] * 54)],
            "too many frames": [(b"x", [])] * 501,
            "too many bytes": [(b"x" * 100_000, [])] * 3,
            "max_fds": [(b"x", [r] * 3)],
            "max_payload": [(b"x" * 100, [])],
            "own socket": [(b"x", [a.fileno()])],
            "bool fd": [(b"x", [True])],
            "negative fd": [(b"x", [-1])],
            "empty": [],
        }[case]
        a.max_fds = 2 if case == "max_fds" else a.max_fds
        a.max_payload = 10 if case == "max_payload" else a.max_payload
        refused = {"max_fds": ValueError, "max_payload": ValueError, "own socket": ValueError}
        refused |= {"negative fd": ValueError, "bool fd": TypeError}
        refused |= {"strided memoryview": BufferError, "text": TypeError}
        if case == "generator":
            assert a._fast.send_many(a, many) is False
            many = [(b"x", [r])]  # not consumed by the compiled path; a fresh one for send_many
        else:
            _handed_over(a, many)
        expected = [] if case in refused else [(bytes(p), len(list(fds))) for p, fds in many]
        got: list[tuple[bytes, int]] = []

        def drain() -> None:
            for _ in expected:
                with b.recv() as msg:
                    got.append((bytes(msg.payload), len(msg.fds)))

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        if case in refused:
            with pytest.raises(refused[case]) as info:
                a.send_many(many)
            assert not getattr(info.value, "messages_taken", 0)
        else:
            a.send_many(m for m in many) if case == "generator" else a.send_many(many)
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert got == expected
        b.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            b.recv()


@compiled_only
@pytest.mark.parametrize("state", ["_suspect", "_share_above", "pending"])
def test_the_compiled_send_many_leaves_the_python_paths_states_to_it(state: str) -> None:
    with _channels() as (a, _b):
        if state == "pending":
            a._outbox.add_unsent([b"x"], [], 0)  # (never written: the channel is closed after)
            _handed_over(a, [(b"x", [])])
            a._outbox.discard()
        else:
            saved = getattr(a, state)
            setattr(a, state, True if state == "_suspect" else 1 << 20)
            _handed_over(a, [(b"x", [])])
            setattr(a, state, saved)
        assert a._fast.send_many(a, [(b"x", [])]) is True


@compiled_only
@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_a_partial_write_of_a_group_is_pushed_by_the_python_path(
    monkeypatch: pytest.MonkeyPatch, kind: type[bytes | bytearray]
) -> None:
    with _channels() as (a, b), _pipe() as (r, _w):
        _no_python_send_many(monkeypatch)
        a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        given = [(kind(bytes([i]) * 40_000), [r]) for i in range(5)]  # 200 KiB: one group
        messages = [(bytes(p), fds) for p, fds in given]
        a.settimeout(0.0)
        with pytest.raises(BlockingIOError) as info:
            a.send_many(given)
        # Partly written: all five are taken (the rest pending for flush).
        assert info.value.messages_taken == 5  # type: ignore[attr-defined]
        assert info.value.characters_written > 0
        if kind is bytearray:
            for p, _fds in given:
                p[:] = b"changed"  # the rest pending was copied: none of this goes
        got: list[tuple[bytes, int]] = []

        def drain() -> None:
            for _ in range(10):
                with b.recv() as msg:
                    got.append((bytes(msg.payload), len(msg.fds)))

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        a.settimeout(TIMEOUT)
        a.flush()
        a.send_many(messages)  # blocking with a timeout: the Python path waits for the rest
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert got == [(p, 1) for p, _ in messages] * 2


@compiled_only
@pytest.mark.parametrize("compiled", [True, False])
def test_a_full_socket_before_a_group_takes_none(compiled: bool) -> None:
    with _channels(compiled) as (a, b):
        a.settimeout(0.0)
        fillers = 0
        with pytest.raises(BlockingIOError) as full:
            while True:
                a.send(b"f")  # one small buffer each: taken whole or not at all
                fillers += 1
        assert full.value.characters_written == 0
        assert not a._outbox.pending
        if compiled:
            with pytest.raises(BlockingIOError):
                a._fast.send_many(a, [(b"x", []), (b"y", [])])  # taken by C, nothing left
        with pytest.raises(BlockingIOError) as info:
            a.send_many([(b"x", []), (b"y", [])])
        assert info.value.messages_taken == 0  # type: ignore[attr-defined]
        assert not a._outbox.pending
        b.settimeout(0.0)
        for _ in range(fillers):
            assert b.recv().payload == b"f"
        with pytest.raises(BlockingIOError):
            b.recv()


# -- reads the compiled queueing hands to the Python decoder ---------------------------------


def _raw_pair(compiled: bool) -> tuple[socket.socket, Channel]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with _fastpath.forced(compiled):
        ch = Channel(right)
    ch.settimeout(TIMEOUT)
    return left, ch


def _frames(spec: list[tuple[bool, int, bytes]]) -> bytes:
    tag = header_tag(0)
    return b"".join(pack_tagged(tag | (FLAG_GROUP << 48) if g else tag, n, 0, len(p)) + p for g, n, p in spec)


def _outcome(compiled: bool, data: bytes, fds: list[int], count: int, **decoder: Any) -> list[Any]:
    """What a receiver makes of one write of *data* with *fds*: messages, then an error or nothing."""
    left, ch = _raw_pair(compiled)
    out: list[Any] = []
    with left, ch:
        for k, v in decoder.items():
            setattr(ch._decoder, k, v)
        socket.send_fds(left, [data], fds)
        ch.settimeout(0.0)
        try:
            for _ in range(count + 1):
                with ch.recv() as msg:
                    out.append((bytes(msg.payload), [_ino(f.fileno()) for f in msg.fds]))
        except BlockingIOError:
            out.append("no more")
        except Exception as exc:
            out.append((type(exc).__name__, str(exc)))
    return out


@compiled_only
def test_max_held_fds_is_checked_for_a_group_read() -> None:
    with _pipe() as (r, _w):
        data = _frames([(True, 1, b"a"), (True, 1, b"b"), (False, 1, b"c")])
        for compiled in (True, False):
            out = _outcome(compiled, data, [r] * 3, 3, max_held_fds=2)
            assert out[-1][0] == LimitExceeded.__name__
            assert out == _outcome(not compiled, data, [r] * 3, 3, max_held_fds=2)
        assert _outcome(True, data, [r] * 3, 3, max_held_fds=3)[-1] == "no more"


@compiled_only
def test_a_decoder_with_a_frame_timeout_reads_groups_the_python_way(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    from fdchannel._codec import Decoder

    parse = Decoder._parse

    def spy(self: Decoder) -> None:
        calls.append(1)
        parse(self)

    monkeypatch.setattr(Decoder, "_parse", spy)
    with _pipe() as (r, _w):
        data = _frames([(True, 1, b"a"), (False, 1, b"b")])
        assert _outcome(True, data, [r] * 2, 2)[-1] == "no more"
        assert not calls  # queued in C
        left, ch = _raw_pair(True)
        with left, ch:
            ch._decoder.frame_timeout = 5.0
            ch._decoder._watch = True
            socket.send_fds(left, [data], [r, r])
            ch.recv().close()
            ch.recv().close()
        assert calls


# -- both paths write and read the same ---------------------------------------------------

_message = st.tuples(st.binary(max_size=300), st.integers(0, 4))


@compiled_only
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_message, min_size=1, max_size=80))
def test_both_paths_write_the_same_bytes(batch: list[tuple[bytes, int]]) -> None:
    with _pipe() as (r, w):
        fd_cycle = [r, w]
        messages = [(p, [fd_cycle[(i + j) % 2] for j in range(n)]) for i, (p, n) in enumerate(batch)]
        wires = []
        for compiled in (True, False):
            left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with _fastpath.forced(compiled):
                ch = Channel(left)
            with ch, right:
                ch.settimeout(TIMEOUT)
                ch.send_many(messages)
                right.settimeout(TIMEOUT)
                data, fds, _flags, _addr = socket.recv_fds(right, 1 << 20, 300)
                wires.append((data, [_ino(fd) for fd in fds]))
                for fd in fds:
                    os.close(fd)
        assert wires[0] == wires[1]


@compiled_only
@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.binary(max_size=40)), min_size=1, max_size=12),
    st.integers(0, 14),
    st.integers(0, 30),
)
def test_both_paths_read_any_read_of_frames_alike(
    spec: list[tuple[bool, int, bytes]], nfds: int, cut: int
) -> None:
    """Random flags and fd counts, maybe cut short: the same messages, then the same error."""
    with _pipe() as (r, w):
        data = _frames(spec)
        data = data[: max(1, len(data) - cut)] if cut > 20 else data
        fds = [r if i % 2 else w for i in range(nfds)]
        count = len(spec)
        assert _outcome(True, data, fds, count) == _outcome(False, data, fds, count)


# -- a signal handler that raises right after the system call ------------------------------

_SENDMSG, _RECVMSG = {"x86_64": (46, 47), "aarch64": (211, 212)}.get(platform.machine(), (None, None))
needs_proc_syscall = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _RECVMSG is None or not hasattr(signal, "pthread_kill"),
    reason="Linux /proc syscall and POSIX signals",
)


class _Alarm(TimeoutError):
    pass


@pytest.fixture
def alarm() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise _Alarm("timed out (signal handler)")

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)


def _blocked_in(tid: int, nr: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            if f.read().split()[0] == str(nr):
                return
        time.sleep(0.001)  # no event says so: /proc is polled
    raise TimeoutError(f"thread {tid} never blocked in system call {nr}")


@compiled_only
@needs_proc_syscall
def test_a_group_read_cut_by_a_handler_says_so_and_leaks_nothing(alarm: None) -> None:
    """The main thread blocks in recvmsg; another marks SIGUSR1 due and sends a group."""
    main = threading.get_native_id()
    failed: list[BaseException] = []
    with _channels() as (a, b), _pipe() as (r, _w):
        b.settimeout(None)

        def peer() -> None:
            try:
                assert _RECVMSG is not None
                _blocked_in(main, _RECVMSG)
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # handled in main
                a.send_many([(b"one", [r]), (b"two", [r]), (b"three", [r])])
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=peer)
        thread.start()
        try:
            with pytest.raises(_Alarm):
                b.recv()
        finally:
            thread.join(TIMEOUT)
        assert not failed, failed
        with pytest.raises(ProtocolError, match="interrupted by _Alarm"):
            b.recv()


@compiled_only
@needs_proc_syscall
def test_a_group_sent_whole_before_a_handler_raised_counts_as_taken(
    alarm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main thread blocks in sendmsg (a full socket); another marks SIGUSR1 due, then reads."""
    main = threading.get_native_id()
    failed: list[BaseException] = []
    got: list[bytes] = []
    with _channels() as (a, b), _pipe() as (r, _w):
        messages = [(bytes([i]) * 50_000, [r]) for i in range(4)]
        a.settimeout(0.0)
        fillers = 0
        with pytest.raises(BlockingIOError):
            while True:
                a.send(b"f" * 1000)
                fillers += 1
        assert not a._outbox.pending
        a.settimeout(None)
        _no_python_send_many(monkeypatch)

        def peer() -> None:
            try:
                assert _SENDMSG is not None
                _blocked_in(main, _SENDMSG)
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # handled in main
                for _ in range(fillers):
                    b.recv().close()
                for _ in messages:
                    with b.recv() as msg:
                        got.append(bytes(msg.payload))
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=peer)
        thread.start()
        try:
            with pytest.raises(_Alarm) as info:
                a.send_many(messages)
        finally:
            thread.join(TIMEOUT)
        assert not failed, failed
        assert info.value.messages_taken == len(messages)  # type: ignore[attr-defined]
        assert got == [p for p, _ in messages]
        a.send(b"after")  # the channel is intact
        assert b.recv().payload == b"after"


@compiled_only
def test_the_compiled_send_many_runs_on_a_small_thread_stack() -> None:
    """The third review: its arrays on the C stack crashed a thread made with threading.stack_size(32768)."""
    code = textwrap.dedent(
        """
        import os, threading
        from fdchannel import Channel, _fastpath
        assert _fastpath.enabled()
        a, b = Channel.pair()
        r, w = os.pipe()
        done = []
        def run():
            for n in (3, 64, 65, 200):
                a.send_many([(b"x", [r])] * n)
                for _ in range(n):
                    b.recv().close()
            done.append(True)
        threading.stack_size(32768)
        t = threading.Thread(target=run)
        t.start()
        t.join(30)
        assert done == [True]
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@compiled_only
def test_what_a_compiled_call_leaves_for_its_caller_is_per_thread() -> None:
    """The third review's race: another thread's call on the same channel overwrote the count
    (or the delivered message) that the first caller's except block reads."""
    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        with a, b:
            fast_a, fast_b = a._fast, b._fast
            assert fast_a is not None
            assert fast_b is not None
            # This thread's record for this frame starts blank: an earlier test's frame at
            # the same address may have left one (calling fast.recv straight, as below).
            fast_b.delivered = None
            seen: dict[str, object] = {}

            def other() -> None:
                assert fast_a.send_many(a, [(b"x", [r])] * 3)
                msg = fast_b.recv(b)  # straight to C: nothing clears delivered
                seen.update(sent_many=fast_a.sent_many, delivered=fast_b.delivered)
                fast_b.delivered = None
                msg.close()

            t = threading.Thread(target=other)
            t.start()
            t.join(10)
            assert seen["sent_many"] == 3
            assert seen["delivered"] is not None
            assert fast_a.sent_many == -1  # this thread's: it made no such call
            assert fast_b.delivered is None
            for _ in range(2):
                b.recv().close()
    finally:
        os.close(r)
        os.close(w)


_consistent_counts = st.lists(st.integers(0, 3), min_size=2, max_size=12)
_mutation = st.sampled_from(["none", "none", "none", "flip a flag", "one fd more", "one fd less", "cut"])


@compiled_only
@settings(max_examples=150, deadline=None)
@given(_consistent_counts, _mutation, st.integers(0, 11))
def test_both_paths_read_groups_alike_mutated_or_not(counts: list[int], mutation: str, at: int) -> None:
    """The third review: random flags almost never make a group the compiled path takes. Here
    the groups are what send_many writes (flag iff fds follow), some of them mutated."""
    at %= len(counts)
    flags = [sum(counts[i + 1 :]) > 0 for i in range(len(counts))]
    if mutation == "flip a flag":
        flags[at] = not flags[at]
    spec = [(flags[i], n, b"m%d" % i) for i, n in enumerate(counts)]
    nfds = sum(counts) + {"one fd more": 1, "one fd less": -1}.get(mutation, 0)
    data = _frames(spec)
    if mutation == "cut":
        data = data[: max(1, len(data) - 3)]
    with _pipe() as (r, w):
        fds = [r if i % 2 else w for i in range(max(0, nfds))]
        assert _outcome(True, data, fds, len(spec)) == _outcome(False, data, fds, len(spec))


@compiled_only
def test_the_mutated_groups_do_reach_the_compiled_queueing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above is only worth something if the compiled path takes most unmutated groups."""
    from fdchannel._codec import Decoder

    parsed: list[int] = []
    parse = Decoder._parse

    def spy(self: Decoder) -> None:
        parsed.append(1)
        parse(self)

    monkeypatch.setattr(Decoder, "_parse", spy)
    with _pipe() as (r, _w):
        taken_in_c = 0
        for counts in ([1, 1, 1], [0, 2, 1], [2, 0, 0, 1], [1, 0]):
            flags = [sum(counts[i + 1 :]) > 0 for i in range(len(counts))]
            spec = [(flags[i], n, b"m%d" % i) for i, n in enumerate(counts)]
            before = len(parsed)
            out = _outcome(True, _frames(spec), [r] * sum(counts), len(spec))
            assert out[-1] == "no more"
            taken_in_c += len(parsed) == before
        assert taken_in_c == 4


@needs_proc_syscall
@pytest.mark.parametrize("compiled", [pytest.param(True, marks=compiled_only), False])
def test_a_handler_raising_after_part_of_a_group_left_takes_none(alarm: None, compiled: bool) -> None:
    """The third review: after a partial write the compiled path said all were taken, the Python path none.

    The main thread blocks in sendmsg part way through a group (a small
    send buffer, nobody reading); another thread marks SIGUSR1 due, so the
    kernel returns the bytes it took and the handler raises.  The stream is
    unusable then, nothing is pending, and both paths say none was taken.
    """
    failed: list[BaseException] = []
    with _channels(compiled) as (a, b), _pipe() as (r, _w):
        a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        messages = [(bytes([i]) * 40_000, [r]) for i in range(5)]  # 200 KiB: one group
        a.settimeout(None)
        args = (threading.get_native_id(), _SENDMSG, threading.get_ident(), failed)
        thread = threading.Thread(target=_signal_when_blocked, args=args)
        thread.start()
        try:
            with pytest.raises(_Alarm) as info:
                a.send_many(messages)
        finally:
            thread.join(TIMEOUT)
        assert not failed, failed
        assert info.value.messages_taken == 0  # type: ignore[attr-defined]
        assert not a._outbox.pending
        # Part of the group did leave (this was the partial write, not EINTR);
        # read without room for fds, the kernel closes the ones it carried.
        assert len(b._sock.recv(1 << 20, socket.MSG_DONTWAIT)) > 0
        with pytest.raises(ProtocolError, match="interrupted by _Alarm"):
            a.send(b"after")


def _signal_when_blocked(tid: int, nr: int | None, main: int, failed: list[BaseException]) -> None:
    try:
        assert nr is not None
        _blocked_in(tid, nr)
        signal.pthread_kill(main, signal.SIGUSR1)
    except BaseException as exc:
        failed.append(exc)


@needs_proc_syscall
@pytest.mark.parametrize("compiled", [pytest.param(True, marks=compiled_only), False])
@pytest.mark.parametrize("call", ["recv", "send"])
def test_a_handler_closing_the_channel_in_eintr_leaves_other_sockets_alone(compiled: bool, call: str) -> None:
    """A review of the receive side: after EINTR the compiled path retried on the closed channel's fd number.

    The main thread blocks in recvmsg (or in sendmsg, on a full socket); a
    handler that returns closes the channel and, as any open() may, reuses its
    number for another channel's socket.  The retry then read that socket's
    message (or wrote into it).  Now, as socket methods do, the channel is
    looked at again after EINTR: ValueError, the other socket untouched.
    """
    failed: list[BaseException] = []
    with _fastpath.forced(compiled):
        a, b = Channel.pair()
    c, d = Channel.pair()
    old = a.fileno()
    reused = -1

    def handler(signum: int, frame: object) -> None:
        nonlocal reused
        a.close()
        reused = os.dup2(c.fileno(), old)  # the number now names c's socket
        d.send(b"for c")

    try:
        with _pipe() as (r, _w):
            if call == "send":
                a.settimeout(0.0)
                with pytest.raises(BlockingIOError):
                    while True:
                        a.send(b"f" * 1000)
            a.settimeout(None)
            c.settimeout(TIMEOUT)
            nr = _RECVMSG if call == "recv" else _SENDMSG
            args = (threading.get_native_id(), nr, threading.get_ident(), failed)
            old_handler = signal.signal(signal.SIGUSR1, handler)
            thread = threading.Thread(target=_signal_when_blocked, args=args)
            thread.start()
            try:
                with pytest.raises(ValueError, match="closed"):
                    a.recv() if call == "recv" else a.send(b"meant for b", [r])
            finally:
                thread.join(TIMEOUT)
                signal.signal(signal.SIGUSR1, old_handler)
            assert not failed, failed
            assert reused == old
            # c's message is still there, and nothing was written to c's peer.
            with c.recv() as msg:
                assert msg.payload == b"for c"
            d.settimeout(0.0)
            with pytest.raises(BlockingIOError):
                d.recv()
    finally:
        if reused >= 0:
            os.close(reused)
        for ch in (a, b, c, d):
            ch.close()
