"""sd_notify: every datagram `fdchannel.systemd` sends equals libsystemd's for the same input.

The test owns the notify socket (AF_UNIX SOCK_DGRAM with SO_PASSCRED, as
systemd's own), sends each notification once with fdchannel and once with
libsystemd's ``sd_pid_notify_with_fds`` (ctypes on libsystemd.so.0), and
compares the two datagrams: bytes, the kinds of control message, the
credentials, and the fds by what they are (st_dev, st_ino).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fdchannel import systemd

from ._systemd import c_getenv, libsystemd, posix_only

pytestmark = posix_only

TIMEOUT = 10.0
MAX_FDS = 300


class NotifySocket:
    """A bound datagram socket standing in for the service manager."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if hasattr(socket, "SO_PASSCRED"):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(TIMEOUT)
        self.env_value = env_value

    def receive(self) -> tuple[bytes, list[tuple[int, int, Any]]]:
        """One datagram: its bytes and its control messages (fds as (st_dev, st_ino))."""
        space = socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(12)
        flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        data, ancdata, msg_flags, _ = self.sock.recvmsg(65536, space, flags)
        assert not msg_flags & socket.MSG_CTRUNC
        got: list[tuple[int, int, Any]] = []
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                ids = []
                for fd in fds:
                    st = os.fstat(fd)
                    ids.append((st.st_dev, st.st_ino))
                    os.close(fd)
                got.append((level, kind, ids))
            else:
                got.append((level, kind, bytes(raw)))
        return data, got

    def nothing_queued(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(1)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)
        return False


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifySocket]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        ns = NotifySocket(path, path)
    else:
        if sys.platform != "linux":
            pytest.skip("abstract sockets are Linux only")
        name = f"fdchannel-test-{uuid.uuid4().hex}"
        ns = NotifySocket(b"\0" + name.encode(), "@" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", ns.env_value)
    with ns.sock:
        yield ns
        assert ns.nothing_queued()


def sd_notify(state: str, fds: list[int] = ()) -> int:  # type: ignore[assignment]
    lib = libsystemd()
    array_type = ctypes.c_int * max(len(fds), 1)
    return int(lib.sd_pid_notify_with_fds(0, 0, state.encode(), array_type(*fds), len(fds)))


@pytest.fixture
def some_fds() -> Iterator[list[int]]:
    r, w = os.pipe()
    a, b = socket.socketpair()
    memfd = os.memfd_create("state") if hasattr(os, "memfd_create") else os.dup(r)
    try:
        yield [r, a.fileno(), memfd, w]
    finally:
        os.close(r)
        os.close(w)
        os.close(memfd)
        a.close()
        b.close()


ALL = slice(None)
#: (id, fdchannel's call given the fds, the state libsystemd sends, which of the fds go with it)
CASES: list[tuple[str, Callable[[list[int]], object], str, slice | None]] = [
    ("ready", lambda fds: systemd.ready(), "READY=1", None),
    (
        "ready+status",
        lambda fds: systemd.ready(status="up: 2 workers"),
        "READY=1\nSTATUS=up: 2 workers",
        None,
    ),
    ("status", lambda fds: systemd.status("draining"), "STATUS=draining", None),
    ("mainpid", lambda fds: systemd.mainpid(4242), "MAINPID=4242", None),
    ("stopping", lambda fds: systemd.stopping(), "STOPPING=1", None),
    ("fdstore", lambda fds: systemd.fdstore("http", fds[:1]), "FDSTORE=1\nFDNAME=http", slice(1)),
    ("fdstore-many", lambda fds: systemd.fdstore("state", fds), "FDSTORE=1\nFDNAME=state", ALL),
    (
        "fdstore-nopoll",
        lambda fds: systemd.fdstore("s", fds[:2], poll=False),
        "FDSTORE=1\nFDNAME=s\nFDPOLL=0",
        slice(2),
    ),
    ("fdstore-remove", lambda fds: systemd.fdstore_remove("http"), "FDSTOREREMOVE=1\nFDNAME=http", None),
    ("raw", lambda fds: systemd.notify("READY=1\nSTATUS=x", fds=fds[1:3]), "READY=1\nSTATUS=x", slice(1, 3)),
    ("mapping", lambda fds: systemd.notify({"WATCHDOG": 1}), "WATCHDOG=1", None),
]


@pytest.mark.parametrize(("what", "ours", "state", "which"), CASES, ids=[c[0] for c in CASES])
def test_same_datagram_as_libsystemd(
    notify_socket: NotifySocket,
    some_fds: list[int],
    what: str,
    ours: Callable[[list[int]], object],
    state: str,
    which: slice | None,
) -> None:
    assert ours(some_fds) is True
    mine = notify_socket.receive()
    assert sd_notify(state, [] if which is None else some_fds[which]) == 1
    theirs = notify_socket.receive()
    assert mine == theirs
    assert mine[0] == state.encode()
    kinds = [(level, kind) for level, kind, _ in mine[1]]
    assert ((socket.SOL_SOCKET, socket.SCM_RIGHTS) in kinds) == (which is not None)


def test_fd_identity_is_checked(notify_socket: NotifySocket, some_fds: list[int]) -> None:
    """The comparison sees which fds went: other fds, other datagram."""
    systemd.fdstore("x", some_fds[:1])
    mine = notify_socket.receive()
    assert sd_notify("FDSTORE=1\nFDNAME=x", some_fds[1:2]) == 1
    assert notify_socket.receive() != mine


def test_more_fds_than_one_datagram_takes(notify_socket: NotifySocket) -> None:
    fds = [os.dup(0) for _ in range(MAX_FDS)]
    try:
        assert systemd.fdstore("many", fds) is True
        first, second = notify_socket.receive(), notify_socket.receive()
    finally:
        for fd in fds:
            os.close(fd)
    assert first[0] == second[0] == b"FDSTORE=1\nFDNAME=many"
    counts = [
        len(ids) for data in (first, second) for level, kind, ids in data[1] if kind == socket.SCM_RIGHTS
    ]
    assert counts == [253, MAX_FDS - 253]


def test_not_under_a_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") == 0  # libsystemd sends nothing either
    assert systemd.ready() is False
    assert systemd.fdstore("x", [0]) is False


def test_unset_environment(notify_socket: NotifySocket) -> None:
    assert systemd.notify("READY=1", unset_environment=True) is True
    assert "NOTIFY_SOCKET" not in os.environ
    notify_socket.receive()
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("value", ["relative/path", "@", "x", "/" + "a" * 200])
def test_malformed_notify_socket(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sd_notify("READY=1") in (-errno.EINVAL, -errno.ENAMETOOLONG)  # libsystemd refuses it too
    with pytest.raises(systemd.ActivationError, match="NOTIFY_SOCKET"):
        systemd.ready()


def test_nobody_listening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd_notify("READY=1") < 0
    with pytest.raises(FileNotFoundError):
        systemd.ready()


@pytest.mark.parametrize(
    "call",
    [
        lambda: systemd.status("two\nlines"),
        lambda: systemd.notify({"A\nB": 1}),
        lambda: systemd.notify(""),
        lambda: systemd.fdstore("has:colon", [0]),
        lambda: systemd.fdstore("", [0]),
        lambda: systemd.fdstore("x" * 256, [0]),
        lambda: systemd.fdstore("tab\tname", [0]),
        lambda: systemd.fdstore("x", []),
        lambda: systemd.mainpid(0),
        lambda: systemd.notify("X=1", fds=[0] * 254),
    ],
)
def test_bad_input_sends_nothing(notify_socket: NotifySocket, call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"state": ""}, ValueError),
        ({"state": {"STATUS": "two\nlines"}}, ValueError),
        ({"state": "READY=1", "timeout": -1}, ValueError),
        ({"state": "READY=1", "fds": [object()]}, TypeError),
        ({"state": "READY=1", "fds": [0] * 254}, ValueError),
    ],
    ids=["empty", "newline", "timeout", "not-an-fd", "too-many-fds"],
)
def test_unset_environment_when_arguments_are_refused(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        systemd.notify(**kwargs, unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ
    # As libsystemd on its EINVAL paths (no state): it unsets the variable too.
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env_value)
    assert libsystemd().sd_pid_notify_with_fds(0, 1, None, None, 0) == -errno.EINVAL
    assert c_getenv("NOTIFY_SOCKET") is None


# -- a manager whose queue is full ------------------------------------------------------


def full_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    """A bound notify socket nobody reads, its queue filled to the brim (NOTIFY_SOCKET names it)."""
    path = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        filler.connect(path)
        for _ in range(100_000):
            try:
                filler.send(b"STATUS=filling")
            except BlockingIOError:
                return manager
    manager.close()
    raise AssertionError("the notify queue never filled")


def test_notify_to_a_full_queue_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with full_notify_socket(tmp_path, monkeypatch) as manager:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="stayed full"):
            systemd.notify("STATUS=stuck", timeout=0.2)
        assert 0.2 <= time.monotonic() - started < TIMEOUT
        with pytest.raises(BlockingIOError):
            systemd.notify("STATUS=stuck", timeout=0.0)
        with pytest.raises(ValueError, match="non-negative"):
            systemd.notify("STATUS=x", timeout=-1)
        # Room for one more: the default waits for it and sends.
        assert manager.recv(100) == b"STATUS=filling"
        assert systemd.notify("STATUS=after") is True
        manager.setblocking(False)
        last = b""
        with contextlib.suppress(BlockingIOError):
            while True:
                last = manager.recv(100)
        assert last == b"STATUS=after"


@pytest.mark.skipif(sys.platform == "win32", reason="upgrades need POSIX")
def test_upgrader_ready_does_not_hang_on_a_full_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from fdchannel.upgrade import Upgrader

    with (
        full_notify_socket(tmp_path, monkeypatch) as _manager,
        Upgrader(systemd=True, ready_timeout=0.3) as up,
    ):
        done = threading.Event()

        def ready() -> None:
            up.ready()
            done.set()

        worker = threading.Thread(target=ready, daemon=True)
        worker.start()
        worker.join(TIMEOUT)
        assert done.is_set(), "ready() blocked on the full notify queue"
