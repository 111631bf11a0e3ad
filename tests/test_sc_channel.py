"""TrioChannel and AnyioChannel: what is theirs beyond the shared suite.

The shared behaviours run through `tests/_async_view.py` (test_channel.py,
test_channel_unix.py); the cancellation sweeps are in test_sc_cancel.py.
Here: the extras' import errors, pairs, peer credentials, ``connect`` and
``serve`` with handlers in a nursery / task group, closing under waiting
tasks, taking over a blocking `Channel`, real processes, and fairness.
Each test runs per kind (``trio``, ``anyio-asyncio``, ``anyio-uvloop``, ``anyio-trio``).
"""

# The kind fixture is imported from tests/_structured.py; test parameters
# naming it are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fdchannel import Channel, ChannelBroken, ChannelClosed, Listener

from ._portable import more_than_a_socket_holds, read_fd
from ._proc import fork_child, needs_fork, wait_child
from ._structured import TIMEOUT, anyio, channel_class, run_kind, sc_kind  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent

needs_af_unix = pytest.mark.skipif(
    sys.platform == "win32",
    reason="connect() and serve() need AF_UNIX sockets, which Python on Windows lacks",
)


# -- the extras -------------------------------------------------------------------


@pytest.mark.parametrize(("module", "extra"), [("fdchannel.trio", "trio"), ("fdchannel.anyio", "anyio")])
def test_import_without_the_extra_names_it(module: str, extra: str) -> None:
    """In a child interpreter where the library cannot be imported (a None in sys.modules)."""
    script = f"import sys; sys.modules[{extra!r}] = None\nimport {module}"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), done.stderr
    assert f"pip install 'fdchannel[{extra}]'" in last


def test_the_package_imports_without_trio_or_anyio() -> None:
    script = "import sys; sys.modules['trio'] = sys.modules['anyio'] = None\nimport fdchannel, fdchannel.aio"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False, cwd=REPO
    )
    assert done.returncode == 0, done.stderr


# -- pairs and credentials ----------------------------------------------------------


def test_pair_round_trip_and_peer_credentials(sc_kind: str) -> None:
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        r, w = os.pipe()
        async with a, b:
            assert repr(a).startswith(f"<{cls.__name__} fd=")
            await a.send(b"hello", fds=[w])
            with await b.recv() as msg:
                assert msg.payload == b"hello"
                assert not os.get_inheritable(msg.fds[0].fileno())
                os.write(msg.fds[0].fileno(), b"!")
            if hasattr(socket, "SO_PEERCRED"):
                creds = a.peer_credentials()
                assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert os.read(r, 1) == b"!"
        os.close(r)
        os.close(w)

    run_kind(sc_kind, main)


def test_module_pair_function(sc_kind: str) -> None:
    cls = channel_class(sc_kind)
    module = sys.modules[cls.__module__]

    async def main() -> None:
        a, b = module.pair(max_fds=1)
        async with a, b:
            assert isinstance(a, cls)
            with pytest.raises(ValueError, match="max_fds"):
                await a.send(b"", fds=[0, 1])

    run_kind(sc_kind, main)


# -- closing under waiting tasks --------------------------------------------------------


def test_close_wakes_waiting_tasks(sc_kind: str) -> None:
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        outcomes: dict[str, BaseException] = {}

        async def receive() -> None:
            try:
                await a.recv()
            except ChannelClosed as exc:
                outcomes["recv"] = exc

        async def fill() -> None:
            try:
                while True:  # until the socket is full and send() waits
                    await a.send(b"z" * (1 << 20))
            except ValueError as exc:
                outcomes["send"] = exc

        async with anyio.create_task_group() as group:
            group.start_soon(receive)
            group.start_soon(fill)
            await anyio.wait_all_tasks_blocked()
            a.close()
        assert set(outcomes) == {"recv", "send"}
        assert "closed" in str(outcomes["send"])
        b.close()

    run_kind(sc_kind, main)


def test_closed_channel_raises_value_error(sc_kind: str) -> None:
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        await a.aclose()
        await a.aclose()  # idempotent
        b.close()
        with pytest.raises(ValueError, match="closed"):
            await a.send(b"x")
        with pytest.raises(ValueError, match="closed"):
            await a.recv()
        with pytest.raises(ValueError, match="closed"):
            await a.flush()

    run_kind(sc_kind, main)


def test_unclosed_channel_warns(sc_kind: str) -> None:
    a, b = channel_class(sc_kind).pair()
    a.close()
    with pytest.warns(ResourceWarning, match="unclosed"):
        del b


# -- concurrency and fairness ------------------------------------------------------------


def test_concurrent_senders_and_receivers(sc_kind: str) -> None:
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        r, w = os.pipe()
        got: list[tuple[int, int]] = []

        async def sender(tag: int) -> None:
            for i in range(10):
                # Many writes and several fd batches each: interleaving would corrupt.
                await a.send(bytes([tag]) * (100_000 + i), fds=[w] * (300 + tag))

        async def receiver() -> None:
            for _ in range(20):
                with await b.recv() as msg:
                    tag = msg.payload[0]
                    assert msg.payload == bytes([tag]) * len(msg.payload)
                    assert len(msg.fds) == 300 + tag
                    got.append((tag, len(msg.payload)))

        async with a, b, anyio.create_task_group() as group:
            for tag in range(4):
                group.start_soon(sender, tag)
            group.start_soon(receiver)
            group.start_soon(receiver)
        for tag in range(4):
            assert sorted(n for t, n in got if t == tag) == [100_000 + i for i in range(10)]
        os.close(r)
        os.close(w)

    run_kind(sc_kind, main)


def test_always_ready_peer_does_not_starve_other_tasks(sc_kind: str) -> None:
    """A socket that is always ready still lets others run (a checkpoint every 64 calls)."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        async with a, b:
            for _ in range(200):  # all in the socket before reading
                await a.send(b"x", fds=[0])
            async with anyio.create_task_group() as group:
                group.start_soon(ticker)
                await anyio.lowlevel.checkpoint()
                start = ticks
                for _ in range(200):
                    (await b.recv()).close()  # never has to wait
                group.cancel_scope.cancel()
            assert ticks - start >= 200 // 64 - 1

    run_kind(sc_kind, main)


def test_recv_in_a_cancelled_scope_raises_before_taking_a_message(sc_kind: str) -> None:
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        async with a, b:
            await a.send(b"kept", fds=[0])
            with anyio.CancelScope() as scope:
                scope.cancel()
                await b.recv()  # a checkpoint: raises at once
                raise AssertionError("recv() in a cancelled scope returned")
            assert scope.cancelled_caught
            with await b.recv() as msg:
                assert (msg.payload, len(msg.fds)) == (b"kept", 1)

    run_kind(sc_kind, main)


# -- from_channel -------------------------------------------------------------------------


def test_from_channel_takes_buffered_messages_and_pending_send(sc_kind: str) -> None:
    cls = channel_class(sc_kind)
    a, b = Channel.pair()
    r, w = os.pipe()
    a.send(b"first", fds=[w])
    a.send(b"second", fds=[w])
    with b.recv() as m:  # reads both into b's buffer
        assert m.payload == b"first"
    a.setblocking(False)
    big = b"B" * (4 * 1024 * 1024)
    with pytest.raises(BlockingIOError) as info:
        a.send(big, fds=[w])
    assert info.value.characters_written > 0  # type: ignore[attr-defined]
    os.close(w)

    async def main() -> None:
        aa, bb = cls.from_channel(a), cls.from_channel(b)
        assert a.closed
        assert b.closed
        async with aa, bb:
            assert aa.pending
            with await bb.recv() as m2:
                assert m2.payload == b"second"
                os.write(m2.fds[0].fileno(), b"2")
            async with anyio.create_task_group() as group:
                group.start_soon(aa.flush)
                with await bb.recv() as m3:
                    assert m3.payload == big
                    os.write(m3.fds[0].fileno(), b"3")
            assert not aa.pending

    try:
        run_kind(sc_kind, main)
        assert read_fd(r, 2) == b"23"
    finally:
        os.close(r)


def test_from_channel_refuses_closed(sc_kind: str) -> None:
    a, b = Channel.pair()
    a.close()
    with pytest.raises(ValueError, match="closed"):
        channel_class(sc_kind).from_channel(a)
    b.close()


@needs_fork
def test_from_channel_refuses_an_end_another_forked_child_uses(sc_kind: str) -> None:
    """A forked end serves one process: a review found two children taking it over, their frames mixed."""
    cls = channel_class(sc_kind)
    parent, inherited = Channel.pair()
    first_r, first_w = os.pipe()  # the first child says it holds the end, then waits to be let go
    go_r, go_w = os.pipe()

    async def use() -> None:
        async with cls.from_channel(inherited) as ch:
            await ch.send(b"first")

    def first() -> None:
        parent.close()
        inherited.send(b"claimed")  # the end is this child's from here
        os.write(first_w, b"x")
        read_fd(go_r, 1)  # alive (its lock held) until the second child tried

    def second() -> None:
        parent.close()
        try:
            run_kind(sc_kind, use)
        except ValueError as exc:
            assert "already in use by another process" in str(exc)
            return
        raise AssertionError("the second child took over the end")

    pid1 = fork_child(first)
    try:
        assert read_fd(first_r, 1) == b"x"
        assert wait_child(fork_child(second)) == 0
    finally:
        os.write(go_w, b"x")
        assert wait_child(pid1) == 0
        inherited.close()
        for fd in (first_r, first_w, go_r, go_w):
            os.close(fd)
    with parent:
        parent.settimeout(TIMEOUT)
        assert parent.recv().payload == b"claimed"
        with pytest.raises(ChannelClosed):
            parent.recv()  # nothing from the second child: both ends are gone


def test_close_ends_every_waiting_receiver_with_channel_closed(sc_kind: str) -> None:
    """The task waiting for the gate too (it got ValueError): ``async for`` simply ends in both."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        ended: list[str] = []

        async def reader() -> None:
            async for msg in a:
                msg.close()
            ended.append("ended")

        async with anyio.create_task_group() as group:
            group.start_soon(reader)
            group.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            a.close()
        assert ended == ["ended", "ended"]
        b.close()

    run_kind(sc_kind, main)


def test_close_while_a_send_waits_for_acknowledgements_raises_value_error(sc_kind: str) -> None:
    """Not EBADF from writing to the closed socket (a review): the closed-channel error, as documented."""
    from fdchannel.transports import UnixRights

    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair(transport=UnixRights(acknowledge=True, window=2))
        r, w = os.pipe()
        outcome: list[BaseException] = []
        try:
            await a.send(b"1", [r])
            await a.send(b"2", [r])  # the window is full: the next send polls for an acknowledgement

            async def sender() -> None:
                try:
                    await a.send(b"3", [r])
                except BaseException as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as group:
                group.start_soon(sender)
                await anyio.wait_all_tasks_blocked()
                a.close()
            assert len(outcome) == 1
            assert isinstance(outcome[0], ValueError), repr(outcome[0])
            assert "closed" in str(outcome[0])
        finally:
            a.close()
            b.close()
            os.close(r)
            os.close(w)

    run_kind(sc_kind, main)


class _Alarm(TimeoutError):
    """What a SIGALRM handler raises."""


def _strike_at_entry(code_name: str, owner: object = None, times: int = 1) -> None:
    """Raise `_Alarm` at the entry of the next *times* calls of *code_name* (on *owner*, if given).

    From a trace function, which CPython calls with the frame about to run:
    the channel tells it for a signal handler's error (``handler(signum,
    frame)``), struck where a handler runs, at a function's first instruction.
    A second strike lands on the next such call (a retry: a storm of signals).
    """

    def hit(frame: Any) -> bool:
        return bool(
            frame.f_code.co_name == code_name and (owner is None or frame.f_locals.get("self") is owner)
        )

    def again(frame: Any, event: str, arg: object) -> None:
        if event == "call" and hit(frame):
            sys.setprofile(None)
            raise _Alarm("a second SIGALRM handler's timeout")

    def tracer(frame: Any, event: str, arg: object) -> None:
        if hit(frame):
            sys.settrace(None)  # (CPython drops a tracer that raised: a profile function strikes again)
            if times > 1:
                sys.setprofile(again)
            raise _Alarm("a SIGALRM handler's timeout")

    sys.settrace(tracer)


def _strike(at: str, gate: object, waiter: object) -> None:
    if at == "set":
        _strike_at_entry("set", waiter)
    else:
        _strike_at_entry("leave", gate, times=2 if at == "leave-twice" else 1)


@pytest.mark.parametrize("at", ["leave", "set", "leave-twice"])
def test_a_handlers_error_as_recv_hands_the_gate_over_neither_loses_nor_wedges(sc_kind: str, at: str) -> None:
    """Gate.leave, or the waiter's Event.set, cut short at its first instruction (a review: the
    gate stayed taken, every later recv() waited for good, and the message went in silence)."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        outcomes: list[object] = []

        both = anyio.Event()

        async def receive() -> None:
            try:
                with await a.recv() as msg:
                    outcomes.append(bytes(msg.payload))
            except BaseException as exc:
                outcomes.append(exc)
            if len(outcomes) == 2:
                both.set()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(receive)
                await anyio.wait_all_tasks_blocked()  # the first holds the gate, waiting for data
                group.start_soon(receive)
                await anyio.wait_all_tasks_blocked()  # the second waits for the gate
                _strike(at, a._recv_gate, a._recv_gate._waiters[0])
                try:
                    await b.send(b"one")
                    await b.send(b"two")
                    await both.wait()
                finally:
                    sys.settrace(None)
            assert isinstance(outcomes[0], _Alarm), outcomes
            # The first call's message was lost, and the channel says so; the
            # second call got the gate (no hang) and that answer.
            assert isinstance(outcomes[1], ChannelBroken), outcomes
            assert not a._recv_gate.locked()
        finally:
            a.close()
            b.close()

    run_kind(sc_kind, main)


@pytest.mark.parametrize("at", ["leave", "set", "leave-twice"])
def test_a_handlers_error_as_send_hands_the_gate_over_neither_hides_nor_wedges(sc_kind: str, at: str) -> None:
    """The send that had left whole says so (characters_written), and the next sender goes on."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        outcomes: list[object] = []
        big = b"z" * (4 << 20)  # more than the socket holds: the first send waits for the reader

        async def send(payload: bytes) -> None:
            try:
                await a.send(payload)
                outcomes.append("sent")
            except BaseException as exc:
                outcomes.append(exc)

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(send, big)
                await anyio.wait_all_tasks_blocked()  # the first holds the gate, the socket full
                group.start_soon(send, b"second")
                await anyio.wait_all_tasks_blocked()  # the second waits for the gate
                _strike(at, a._send_gate, a._send_gate._waiters[0])
                try:
                    with await b.recv() as msg:
                        assert len(msg.payload) == len(big)
                finally:
                    sys.settrace(None)
                with await b.recv() as msg:
                    assert msg.payload == b"second"
            assert isinstance(outcomes[0], _Alarm), outcomes
            assert outcomes[0].characters_written == 24 + len(big)  # type: ignore[attr-defined]
            assert outcomes[1] == "sent"
            assert not a._send_gate.locked()
        finally:
            a.close()
            b.close()

    run_kind(sc_kind, main)


# -- connect and serve ------------------------------------------------------------------------


async def echo(ch: Any) -> None:
    """Answer each message with its payload reversed and the same fds."""
    async for msg in ch:
        with msg:
            await ch.send(bytes(msg.payload)[::-1], fds=msg.fds)


@needs_af_unix
def test_serve_connect_and_close(sc_kind: str, tmp_path: Path) -> None:
    cls = channel_class(sc_kind)
    module = sys.modules[cls.__module__]
    path = tmp_path / "srv.sock"

    async def client(i: int, w: int) -> None:
        async with await module.connect(path) as ch:
            assert isinstance(ch, cls)
            for j in range(5):
                await ch.send(b"%d-%d" % (i, j), fds=[w])
                with await ch.recv() as reply:
                    assert reply.payload == (b"%d-%d" % (i, j))[::-1]
                    assert os.fstat(reply.fds[0].fileno()).st_ino == os.fstat(w).st_ino
            creds = ch.peer_credentials()
            assert creds.pid == os.getpid()

    async def main() -> None:
        r, w = os.pipe()
        async with anyio.create_task_group() as group:
            server = await group.start(functools.partial(module.serve, echo, path, mode=0o640))
            assert server.is_serving()
            assert server.path == os.fspath(path)
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o640
            async with anyio.create_task_group() as clients:
                for i in range(8):
                    clients.start_soon(client, i, w)
            server.close()
            server.close()  # idempotent
            assert not server.is_serving()
        # serve() returned once its handlers were done; the file is gone.
        assert not path.exists()
        os.close(r)
        os.close(w)

    run_kind(sc_kind, main)


@needs_af_unix
def test_serve_handler_errors_are_logged_and_serving_goes_on(
    sc_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = sys.modules[channel_class(sc_kind).__module__]
    path = tmp_path / "srv.sock"

    async def handler(ch: Any) -> None:
        msg = await ch.recv()
        msg.close()
        if msg.payload == b"boom":
            raise RuntimeError("handler failed on purpose")
        await ch.send(b"fine")

    async def main() -> None:
        async with anyio.create_task_group() as group:
            server = await group.start(module.serve, handler, path)
            async with await module.connect(path) as bad:
                await bad.send(b"boom", fds=[0])
                with pytest.raises(ChannelClosed):  # the server closed its end
                    await bad.recv()
            async with await module.connect(path) as good:
                await good.send(b"hi")
                assert (await good.recv()).payload == b"fine"
            server.close()

    with caplog.at_level(logging.ERROR, logger="fdchannel.structured"):
        run_kind(sc_kind, main)
    assert any("handler raised" in rec.getMessage() for rec in caplog.records)


@needs_af_unix
def test_cancelling_serve_cancels_handlers_and_closes_the_listener(sc_kind: str, tmp_path: Path) -> None:
    module = sys.modules[channel_class(sc_kind).__module__]
    path = tmp_path / "srv.sock"
    cancelled: list[bool] = []
    entered: list[Any] = []

    async def handler(ch: Any) -> None:
        try:
            entered[0].set()
            await ch.recv()  # the client never sends
        except anyio.get_cancelled_exc_class():
            cancelled.append(ch.closed)
            raise

    async def main() -> None:
        entered.append(anyio.Event())
        async with anyio.create_task_group() as group:
            await group.start(module.serve, handler, path)
            client = await module.connect(path)
            await entered[0].wait()
            await anyio.wait_all_tasks_blocked()
            group.cancel_scope.cancel()
        async with client:
            with pytest.raises(ChannelClosed):
                await client.recv()

    run_kind(sc_kind, main)
    assert cancelled == [False]  # cancelled in recv(); closed by the server afterwards
    assert not path.exists()


@needs_af_unix
def test_close_clients_cancels_the_handlers_and_serving_goes_on(sc_kind: str, tmp_path: Path) -> None:
    module = sys.modules[channel_class(sc_kind).__module__]
    path = tmp_path / "srv.sock"

    async def main() -> None:
        async with anyio.create_task_group() as group:
            server = await group.start(module.serve, echo, path)
            clients = [await module.connect(path) for _ in range(3)]
            for client in clients:  # each handler is running
                await client.send(b"ab")
                assert (await client.recv()).payload == b"ba"
            server.close_clients()
            for client in clients:
                async with client:
                    with pytest.raises(ChannelClosed):
                        await client.recv()
            assert server.is_serving()
            async with await module.connect(path) as late:
                await late.send(b"cd")
                assert (await late.recv()).payload == b"dc"
            server.close()

    run_kind(sc_kind, main)


@needs_af_unix
def test_serve_refuses_peers_the_listener_refuses(sc_kind: str, tmp_path: Path) -> None:
    module = sys.modules[channel_class(sc_kind).__module__]
    path = tmp_path / "srv.sock"

    async def refusing() -> int:
        async with anyio.create_task_group() as group:
            server = await group.start(functools.partial(module.serve, echo, path, authorize=lambda c: False))
            client = await module.connect(path)
            async with client:
                with pytest.raises(ChannelClosed):
                    await client.recv()
            refused: int = server.listener.refused
            server.close()
        return refused

    assert run_kind(sc_kind, refusing) == 1


@needs_af_unix
def test_connect_errors_leave_nothing_open(sc_kind: str, tmp_path: Path) -> None:
    module = sys.modules[channel_class(sc_kind).__module__]

    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            await module.connect(tmp_path / "nobody.sock")
        # A socket file nobody listens on any more.
        with Listener(tmp_path / "dead.sock") as listener:
            dead = os.fspath(listener.path)
            os.link(dead, tmp_path / "kept.sock")
        with pytest.raises(ConnectionRefusedError):
            await module.connect(tmp_path / "kept.sock")

    run_kind(sc_kind, main)


@needs_af_unix
def test_connect_waits_while_the_backlog_is_full(sc_kind: str, tmp_path: Path) -> None:
    """AF_UNIX says EAGAIN while the backlog is full; connect() retries until accepted."""
    module = sys.modules[channel_class(sc_kind).__module__]
    path = tmp_path / "full.sock"

    async def main() -> None:
        with Listener(path, backlog=0) as listener:
            queued = []
            try:
                # Fill the backlog with raw connections nobody accepts.
                while True:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.setblocking(False)
                    try:
                        s.connect(os.fspath(path))
                    except BlockingIOError as exc:
                        assert exc.errno == errno.EAGAIN
                        s.close()
                        break
                    queued.append(s)
                result: list[Any] = []

                async def connecting() -> None:
                    result.append(await module.connect(path))

                async with anyio.create_task_group() as group:
                    group.start_soon(connecting)
                    await anyio.sleep(0.01)
                    assert not result  # still waiting for room
                    listener.settimeout(TIMEOUT)
                    for _ in queued:
                        listener.accept().close()
                    with anyio.fail_after(TIMEOUT):
                        while not result:
                            await anyio.sleep(0.001)
                    accepted = listener.accept()
                async with result[0] as ch:
                    await ch.send(b"through")
                    with accepted:
                        accepted.settimeout(TIMEOUT)
                        assert accepted.recv().payload == b"through"
            finally:
                for s in queued:
                    s.close()

    run_kind(sc_kind, main)


# -- real processes ---------------------------------------------------------------------------


@needs_fork
def test_fork_child_runs_the_channel_under_its_library(sc_kind: str) -> None:
    cls = channel_class(sc_kind)
    parent, child = Channel.pair()
    r, w = os.pipe()

    async def child_main() -> None:
        parent.close()
        async with cls.from_channel(child) as ch:
            async for msg in ch:
                with msg:
                    os.write(msg.fds[0].fileno(), msg.payload)
                await ch.send(b"ack")

    pid = fork_child(lambda: run_kind(sc_kind, child_main))
    child.close()
    try:
        parent.settimeout(10)
        for i in range(30):
            parent.send(b"%d," % i, fds=[w])
            assert parent.recv().payload == b"ack"
        parent.close()
        os.close(w)
        data = b""
        while chunk := read_fd(r, 4096):
            data += chunk
        assert data == b"".join(b"%d," % i for i in range(30))
    finally:
        os.close(r)
        if not parent.closed:
            parent.close()
        assert wait_child(pid) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="passes the socket with pass_fds, which Windows lacks")
def test_subprocess_peer(sc_kind: str) -> None:
    """A separate interpreter runs the same kind and answers an async parent."""
    cls = channel_class(sc_kind)
    script = textwrap.dedent(
        f"""
        import os, sys, anyio
        from {cls.__module__} import {cls.__name__} as Ch

        async def main():
            async with Ch.from_fd(int(sys.argv[1])) as ch:
                async for msg in ch:
                    with msg:
                        os.write(msg.fds[0].fileno(), msg.payload.upper())
                    await ch.send(b"ok")

        backend, _, uv = sys.argv[2].partition("+")
        anyio.run(main, backend=backend, backend_options={{"use_uvloop": True}} if uv else {{}})
        """
    )
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(theirs.fileno()), _backend(sc_kind)],
        pass_fds=[theirs.fileno()],
        env=env,
    )
    theirs.close()

    async def main() -> None:
        async with cls(mine) as ch:
            for word in (b"abc", b"def"):
                await ch.send(word, fds=[w])
                assert (await ch.recv()).payload == b"ok"

    try:
        run_kind(sc_kind, main)
        os.close(w)
        got = b""
        while len(got) < 6 and (chunk := read_fd(r, 100)):
            got += chunk
        assert got == b"ABCDEF"
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _backend(kind: str) -> str:
    """The child's ``backend[+uvloop]`` argument."""
    from ._structured import backend_of, backend_options

    return backend_of(kind) + ("+uvloop" if backend_options(kind) else "")


@pytest.fixture(scope="module")
def _mp_helper_running() -> None:
    # multiprocessing's resource tracker, kept for the whole session, holds
    # a pipe of ours: start it before the leak check takes its snapshot.
    if sys.platform != "win32":
        import multiprocessing.resource_tracker

        multiprocessing.resource_tracker.ensure_running()


def _mp_child(kind: str, ch: Any) -> None:
    async def main() -> None:
        async with ch:
            with await ch.recv() as msg:
                os.write(msg.fds[0].fileno(), b"via " + msg.payload)
            await ch.send(type(ch).__name__.encode())

    run_kind(kind, main)


@pytest.mark.usefixtures("_mp_helper_running")
def test_multiprocessing_process_argument(sc_kind: str) -> None:
    """A channel handed to a ``spawn`` child (its ``__reduce__``) arrives as the same class, fd and all."""
    import multiprocessing

    from ._proc import finish_process

    cls = channel_class(sc_kind)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = cls.pair()
    r, w = os.pipe()
    try:
        proc = ctx.Process(target=_mp_child, args=(sc_kind, theirs))  # type: ignore[attr-defined]
        proc.start()
        theirs.close()  # the child has its own copy now

        async def main() -> None:
            async with ours:
                await ours.send(b"spawn", fds=[w])
                assert (await ours.recv()).payload == cls.__name__.encode()

        try:
            run_kind(sc_kind, main)
        finally:
            finish_process(proc)
        assert os.read(r, 100) == b"via spawn"
    finally:
        ours.close()
        os.close(r)
        os.close(w)


def test_a_payload_waiting_its_turn_cannot_be_resized_under_its_header(sc_kind: str) -> None:
    """As for `AsyncChannel`: a bytearray whose send waits for the gate keeps its size."""
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        big = bytes(range(256)) * (more_than_a_socket_holds(1 << 20) // 256)  # its send waits
        given = bytearray(b"hello")
        got: list[bytes] = []
        async with a, b, anyio.create_task_group() as group:
            group.start_soon(a.send, big)
            while not a.pending:
                await anyio.sleep(0.001)
            group.start_soon(a.send, given)
            while not a._send_gate._waiters:
                await anyio.sleep(0.001)
            with pytest.raises(BufferError):
                given.extend(b" world")
            for _ in range(2):
                got.append(bytes((await b.recv()).payload))
        assert got == [big, b"hello"]
        given.extend(b" again")  # free once the call is over

    run_kind(sc_kind, main)
