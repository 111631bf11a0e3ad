"""Handing channel ends to other processes: spawn, from_environ, fork, multiprocessing."""

from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fdchannel
from fdchannel import Channel, ChannelClosed, FdChannelError
from fdchannel._codec import pack_header

from ._portable import more_than_a_socket_holds
from ._proc import finish_process, fork_child, needs_fork, wait_child
from .conftest import open_fds

TIMEOUT = 30
REPO = str(Path(__file__).resolve().parent.parent)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def inheritable(fd: int) -> bool:
    """Whether *fd* is inheritable; on Windows a socket's number is a SOCKET, not a CRT fd."""
    if sys.platform == "win32":
        with socket.socket(fileno=fd) as s:
            try:
                return s.get_inheritable()
            finally:
                s.detach()
    return os.get_inheritable(fd)


def finish(proc: subprocess.Popen[bytes]) -> None:
    try:
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        reap(proc)


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        reap(proc)


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill *proc* if it still runs and wait for it: a failed test leaves nothing behind."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# -- spawn ---------------------------------------------------------------------------

CHILD_REPORTS = r"""
import json, os, socket, sys
from fdchannel import Channel
ch = Channel.from_environ()
if sys.platform == "win32":  # CRT fds ("fd N") and SOCKETs ("SOCKET H"), the leak check's listing
    from tests.conftest import open_fds
    fds = sorted(open_fds())
    inheritable = ch._sock.get_inheritable()
else:
    fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    fds = [fd for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")]
    inheritable = os.get_inheritable(ch.fileno())
report = {
    "fds": fds,
    "channel_fd": ch.fileno(),
    "inheritable": inheritable,
    "env_left": "FDCHANNEL_FD" in os.environ,
    "foo": os.environ.get("FOO"),
}
ch.send(json.dumps(report).encode())
with ch.recv() as msg:
    os.write(msg.fds[0].fileno(), b"child wrote " + msg.payload)
ch.close()
"""


def test_spawn_child_inherits_only_its_end() -> None:
    r, w = os.pipe()
    # An inheritable fd of ours that must not reach the child anyway.
    os.set_inheritable(w, True)
    try:
        proc, ch = fdchannel.spawn([sys.executable, "-c", CHILD_REPORTS], env=child_env())
        with ch, _reaped(proc):
            ch.settimeout(TIMEOUT)
            assert not inheritable(ch.fileno())
            with ch.recv() as msg:
                report = json.loads(msg.payload)
            if sys.platform == "win32":
                # The CRT fds are the standard ones at most (the child may have
                # none of them); the only SOCKET is the channel's.
                crt = {fd for fd in report["fds"] if fd.startswith("fd ")}
                assert crt <= {"fd 0", "fd 1", "fd 2"}
                assert set(report["fds"]) - crt == {f"SOCKET {report['channel_fd']}"}
            else:
                assert set(report["fds"]) == {0, 1, 2, report["channel_fd"]}
            assert report["inheritable"] is False
            assert report["env_left"] is False
            ch.send(b"hello", fds=[w])
            os.close(w)
            w = -1
            finish(proc)
            assert os.read(r, 100) == b"child wrote hello"
            with pytest.raises(ChannelClosed):
                ch.recv()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# Prints what each of the process's fds points at.
LIST_FDS = (
    "import os; [print(os.readlink(f'/proc/self/fd/{n}')) for n in os.listdir('/proc/self/fd') "
    "if os.path.exists(f'/proc/self/fd/{n}')]"
)


def _sockets_of_this_process() -> set[str]:
    return {target for target in open_fds().values() if target.startswith("socket:")}


class _ArgsThatSpawnMeanwhile(list[str]):
    """Child arguments that, when Popen reads them (the channel's ends exist
    by then), start another child with close_fds=False, as a thread spawning
    concurrently would, and record the sockets that child got from us."""

    def __init__(self, args: list[str], before: set[str]) -> None:
        super().__init__(args)
        self.before = before
        self.leaked: set[str] | None = None

    def __iter__(self):  # type: ignore[no-untyped-def]
        if self.leaked is None:
            ours_now = _sockets_of_this_process() - self.before
            assert ours_now, "the channel's ends should exist while Popen runs"
            other = subprocess.run(
                [sys.executable, "-c", LIST_FDS],
                close_fds=False,
                capture_output=True,
                check=True,
                timeout=TIMEOUT,
            )
            self.leaked = set(other.stdout.decode().split()) & ours_now
        return super().__iter__()


@pytest.mark.skipif(
    sys.platform == "win32",
    reason="Windows has no per-child inheritance (pass_fds): spawn() must make the child's end "
    "inheritable while Popen runs, so a concurrent Popen(close_fds=False) may inherit it",
)
def test_a_concurrent_spawn_gets_neither_end() -> None:
    args = _ArgsThatSpawnMeanwhile([sys.executable, "-c", CHILD_REPORTS], _sockets_of_this_process())
    proc, ch = fdchannel.spawn(args, env=child_env())
    with ch:
        ch.settimeout(TIMEOUT)
        with ch.recv():
            pass
        r, w = os.pipe()
        ch.send(b"x", fds=[w])
        os.close(w)
        finish(proc)
        os.close(r)
    assert args.leaked == set()


CHILD_CHECKS_EXTRA_FD = r"""
import os, sys
from fdchannel import Channel
with Channel.from_environ() as ch:
    if sys.argv[1] == "over-the-channel":  # Windows: no pass_fds
        msg = ch.recv()
        extra = msg.fds[0].fileno()
    else:
        msg = None
        extra = int(sys.argv[1])
    os.write(extra, b"extra fd works, FOO=" + os.environ["FOO"].encode())
    if msg is not None:
        msg.close()
    ch.send(b"done")
"""


def test_spawn_merges_caller_env_and_pass_fds() -> None:
    r, w = os.pipe()
    env = child_env(FOO="bar")
    before = dict(env)
    try:
        if sys.platform == "win32":
            # No inheritance of fds by number: refused, nothing left open
            # (the leak check); the extra fd goes over the channel instead.
            with pytest.raises(ValueError, match="pass_fds is not supported on Windows"):
                fdchannel.spawn([sys.executable, "-c", "pass"], env=env, pass_fds=[w])
            proc, ch = fdchannel.spawn(
                [sys.executable, "-c", CHILD_CHECKS_EXTRA_FD, "over-the-channel"], env=env
            )
        else:
            proc, ch = fdchannel.spawn(
                [sys.executable, "-c", CHILD_CHECKS_EXTRA_FD, str(w)], env=env, pass_fds=[w]
            )
        with ch, _reaped(proc):
            ch.settimeout(TIMEOUT)
            if sys.platform == "win32":
                ch.send(b"", fds=[w])
            assert env == before  # the caller's mapping is not changed
            assert "FDCHANNEL_FD" not in os.environ
            assert ch.recv().payload == b"done"
            finish(proc)
        assert os.read(r, 100) == b"extra fd works, FOO=bar"
    finally:
        os.close(r)
        os.close(w)


def test_spawn_failure_closes_both_ends() -> None:
    with pytest.raises(FileNotFoundError):
        fdchannel.spawn(["/nonexistent/program"])


def test_spawn_refuses_close_fds_false() -> None:
    with pytest.raises(ValueError, match="close_fds"):
        fdchannel.spawn([sys.executable, "-c", "pass"], close_fds=False)


# -- from_environ ----------------------------------------------------------------------


def test_from_environ_adopts_and_unsets(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    b.set_inheritable(True)
    monkeypatch.setenv("FDCHANNEL_FD", str(b.fileno()))
    with Channel(a) as ours, Channel.from_environ(max_payload=10) as theirs:
        b.detach()  # the channel owns the fd now
        assert theirs.max_payload == 10
        assert "FDCHANNEL_FD" not in os.environ
        assert not inheritable(theirs.fileno())
        ours.send(b"ping")
        assert theirs.recv().payload == b"ping"


def test_from_environ_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FDCHANNEL_FD", raising=False)
    with pytest.raises(FdChannelError, match="FDCHANNEL_FD is not set"):
        Channel.from_environ()


def test_from_environ_not_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FDCHANNEL_FD", "seven")
    with pytest.raises(FdChannelError, match="FDCHANNEL_FD='seven' is not a file descriptor"):
        Channel.from_environ()


def _assert_refused_and_left_open(
    fd: int, monkeypatch: pytest.MonkeyPatch, still_open: Callable[[], object] | None = None
) -> None:
    monkeypatch.setenv("FDCHANNEL_FD", str(fd))
    with pytest.raises(FdChannelError, match=f"FDCHANNEL_FD={fd}: fd {fd} is not a connected"):
        Channel.from_environ()
    # Still open: bad input loses nothing.  (A Windows SOCKET is no CRT fd: os.fstat refuses it.)
    if still_open is None:
        os.fstat(fd)
    else:
        still_open()
    assert os.environ["FDCHANNEL_FD"] == str(fd)


def test_from_environ_fd_not_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    try:
        _assert_refused_and_left_open(r, monkeypatch)
    finally:
        os.close(r)
        os.close(w)


def test_from_environ_fd_not_connected(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(getattr(socket, "AF_UNIX", socket.AF_INET), socket.SOCK_STREAM) as s:
        _assert_refused_and_left_open(
            s.fileno(), monkeypatch, lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        )


def test_from_environ_fd_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    monkeypatch.setenv("FDCHANNEL_FD", str(r))
    with pytest.raises(FdChannelError, match="FDCHANNEL_FD"):
        Channel.from_environ()


# -- after os.fork() -------------------------------------------------------------------


@needs_fork
@pytest.mark.parametrize("how", ["close_other", "close"])
def test_each_side_closes_the_other_end_after_fork(how: str) -> None:
    parent_end, child_end = Channel.pair()

    def child() -> None:
        if how == "close_other":
            child_end.close_other()
        else:
            parent_end.close()
        assert parent_end.closed
        child_end.settimeout(TIMEOUT)
        # Ends only if every copy of parent_end is closed: ours and the parent's.
        for msg in child_end:
            child_end.send(msg.payload)
        child_end.close()

    pid = fork_child(child)
    try:
        if how == "close_other":
            parent_end.close_other()
        else:
            child_end.close()
        assert child_end.closed
        parent_end.settimeout(TIMEOUT)
        parent_end.send(b"ping")
        assert parent_end.recv().payload == b"ping"
        parent_end.close()
    finally:
        parent_end.close()
        assert wait_child(pid, TIMEOUT) == 0


@needs_fork
def test_parent_sees_eof_once_child_exits_after_close_other() -> None:
    parent_end, child_end = Channel.pair()
    pid = fork_child(child_end.close_other)
    with parent_end:
        parent_end.close_other()
        assert wait_child(pid) == 0
        parent_end.settimeout(TIMEOUT)
        # EOF: our copy of child_end is closed too.
        with pytest.raises(ChannelClosed):
            parent_end.recv()


def test_close_other_drops_pending_output_unsent() -> None:
    a, b = Channel.pair()
    with a, b:
        # Whatever the channels wrote when created (a duplication transport's
        # hello) is read first: from here on a's stream is what is counted.
        a.send(b"sync")
        b.settimeout(TIMEOUT)
        assert b.recv().payload == b"sync"
        a.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            a.send(b"x" * more_than_a_socket_holds(8 << 20))
        written = info.value.characters_written
        assert written > 0
        assert a.pending
        raw = b._sock.dup()  # not os.dup: a Windows SOCKET is no CRT fd
        with raw:
            raw.settimeout(TIMEOUT)
            # Make room first: a close() that pushed queued output would
            # now get some of it out without waiting.
            got = len(raw.recv(min(written, 128 << 10), socket.MSG_WAITALL))
            b.close_other()
            assert a.closed
            while chunk := raw.recv(1 << 20):
                got += len(chunk)
        # Exactly what left before: the copy's remainder was never pushed.
        assert got == written


def test_close_other_needs_a_pair_end() -> None:
    a, b = socket.socketpair()
    with b, Channel(a) as ch, pytest.raises(ValueError, match=r"Channel\.pair"):
        ch.close_other()


def test_close_other_when_already_closed_is_a_no_op() -> None:
    a, b = Channel.pair()
    b.close()
    a.close_other()
    a.close_other()
    a.close()


# -- multiprocessing and pickling ------------------------------------------------------


@pytest.fixture(scope="module")
def _mp_helpers_running() -> None:
    # The helper processes multiprocessing keeps for the whole session hold
    # fds of ours; start them before the leak check takes its snapshot.
    if sys.platform != "win32":  # Windows has neither helper (nor fork)
        multiprocessing.resource_tracker.ensure_running()
        multiprocessing.forkserver.ensure_running()


def _mp_child(ch: Channel) -> None:
    # Under fork this child also inherited the parent's end; under spawn
    # and forkserver it never got it: one call serves all three.
    ch.close_other()
    ch.settimeout(TIMEOUT)
    with ch:
        with ch.recv() as msg:
            os.write(msg.fds[0].fileno(), b"via " + msg.payload)
            ch.send(b"done " + str(os.getpid()).encode())
        # Only the parent holds the other end now: its close is our EOF.
        assert list(ch) == []


@pytest.mark.usefixtures("_mp_helpers_running")
@pytest.mark.parametrize(
    "method",
    [
        pytest.param("fork", marks=needs_fork),
        pytest.param("forkserver", marks=needs_fork),  # its server forks each child
        "spawn",
    ],
)
def test_multiprocessing_process_argument(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    ours, theirs = Channel.pair(max_fds=3)
    r, w = os.pipe()
    try:
        with ours:
            proc = ctx.Process(target=_mp_child, args=(theirs,))  # type: ignore[attr-defined]
            proc.start()
            theirs.close()  # the child has its own copy now
            try:
                ours.settimeout(TIMEOUT)
                ours.send(method.encode(), fds=[w])
                assert ours.recv().payload == f"done {proc.pid}".encode()
                ours.close()
            finally:
                finish_process(proc)
        assert os.read(r, 100) == b"via " + method.encode()
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.usefixtures("_mp_helpers_running")
def test_multiprocessing_refuses_channel_with_buffered_data() -> None:
    ctx = multiprocessing.get_context("spawn")
    a, b = Channel.pair()
    with a, b:
        # Both frames in one write (two sends may reach the peer in two
        # segments, as with Nagle over TCP), so one read takes both: "two"
        # is buffered in b and would be lost to a copy in another process.
        with a._sock.dup() as raw:
            wire = a.transport.wire_id
            raw.sendall(pack_header(wire, 0, 0, 3) + b"one" + pack_header(wire, 0, 0, 3) + b"two")
        b.settimeout(TIMEOUT)
        assert b.recv().payload == b"one"
        proc = ctx.Process(target=_mp_child, args=(b,))
        with pytest.raises(ValueError, match="buffered or pending"):
            proc.start()


def test_plain_pickle_is_a_typeerror() -> None:
    a, b = Channel.pair()
    with a, b:
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(a)
        with pytest.raises(TypeError, match="cannot be pickled"):
            copy.copy(a)


def test_pair_ends_still_work_after_close_other_is_set_up() -> None:
    # pair() links the ends weakly: dropping one closes it (with a warning), not both.
    a, b = Channel.pair()
    with a, b:
        a.send(b"x")
        assert b.recv().payload == b"x"
        assert b._other_end is not None
        assert b._other_end() is a
