"""`Listener`, `Channel.connect` and peer credentials, with real sockets and processes."""

from __future__ import annotations

import sys

import pytest

if sys.platform == "win32":
    pytest.skip(
        "Listener and peer credentials: need AF_UNIX listeners (SO_PEERCRED) and fork, which Windows lacks",
        allow_module_level=True,
    )

import ctypes
import dis
import errno
import logging
import os
import socket
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fdchannel import Channel, ChannelClosed, Listener, PeerCredentials

from ._proc import fork_child, run_child, wait_child

TIMEOUT = 30
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid/gid needs root")


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ep.sock"


def abstract_name() -> str:
    return f"\0fdchannel-test-{uuid.uuid4().hex}"


@pytest.fixture
def listener(sock_path: Path) -> Iterator[Listener]:
    with Listener(sock_path) as lst:
        lst.settimeout(TIMEOUT)
        yield lst


def exchange(lst: Listener, address: str | os.PathLike[str]) -> PeerCredentials:
    """Connect, pass a pipe through, and return the accepted side's view of the client."""
    with Channel.connect(address, timeout=TIMEOUT) as client, lst.accept() as server:
        r, w = os.pipe()
        try:
            client.send(b"pipe", fds=[w])
            with server.recv() as msg:
                os.write(msg.fds[0].fileno(), b"through")
            os.close(w)
            w = -1
            assert os.read(r, 10) == b"through"
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        assert client.peer_credentials() == PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
        return server.peer_credentials()


# -- filesystem paths -------------------------------------------------------------------


def test_accept_connect_and_credentials(listener: Listener, sock_path: Path) -> None:
    creds = exchange(listener, sock_path)
    assert creds == PeerCredentials(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid())
    assert isinstance(listener.fileno(), int)
    assert listener.path == str(sock_path)


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666, 0o000])
def test_file_gets_exact_mode_whatever_the_umask(sock_path: Path, mode: int) -> None:
    def body() -> None:
        for umask in (0o000, 0o077, 0o022):
            os.umask(umask)
            with Listener(sock_path, mode=mode):
                st = os.lstat(sock_path)
                assert stat.S_ISSOCK(st.st_mode)
                assert stat.S_IMODE(st.st_mode) == mode
                assert os.umask(umask) == umask  # never touched
            # Nothing left behind: no socket, no temporary directory.
            assert os.listdir(sock_path.parent) == []

    run_child(body)


_IN_ATTRIB, _IN_CREATE, _IN_MOVED_TO = 0x4, 0x100, 0x80


def _inotify_events(fd: int) -> list[tuple[int, str]]:
    """(mask, name) of every inotify event queued on *fd*."""
    events = []
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return events
    offset = 0
    while offset < len(data):
        _wd, mask, _cookie, size = struct.unpack_from("iIII", data, offset)
        name = data[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
        events.append((mask, name))
        offset += 16 + size
    return events


def test_the_path_never_shows_a_socket_with_other_permissions(sock_path: Path) -> None:
    # Binding at the path and then chmod-ing would leave a window in which
    # anyone (umask 0) could connect; the kernel reports that chmod on the
    # name as IN_ATTRIB.  The name must appear once, already with its mode,
    # and never change until it is removed.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        watch = _IN_ATTRIB | _IN_CREATE | _IN_MOVED_TO
        assert libc.inotify_add_watch(fd, str(sock_path.parent).encode(), watch) >= 0

        def body() -> None:
            os.umask(0)
            with Listener(sock_path, mode=0o600) as lst:
                lst.settimeout(TIMEOUT)
                with Channel.connect(sock_path, timeout=TIMEOUT), lst.accept():
                    pass

        run_child(body)
        on_path = [mask for mask, name in _inotify_events(fd) if name == sock_path.name]
        assert on_path == [_IN_CREATE]
    finally:
        os.close(fd)


def test_close_removes_the_file(sock_path: Path) -> None:
    lst = Listener(sock_path)
    assert sock_path.exists()
    lst.close()
    lst.close()
    assert not sock_path.exists()
    assert lst.closed


def test_stale_socket_is_replaced(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays: nobody listens on it
    with Listener(sock_path) as lst:
        lst.settimeout(TIMEOUT)
        exchange(lst, sock_path)


def test_live_socket_is_not_replaced(listener: Listener, sock_path: Path) -> None:
    with pytest.raises(OSError, match="live socket") as info:
        Listener(sock_path)
    assert info.value.errno == errno.EADDRINUSE
    # Liveness comes from the lock the live listener holds: no probe
    # connection reached it.
    listener.settimeout(0.0)
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.settimeout(TIMEOUT)
    exchange(listener, sock_path)  # and it still serves


def test_live_socket_with_full_backlog_is_not_replaced(sock_path: Path) -> None:
    with Listener(sock_path, backlog=0) as lst:
        # Fill the backlog; a probe then gets EAGAIN, which still means live.
        clients = []
        try:
            while True:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                clients.append(c)
                if c.connect_ex(str(sock_path)) != 0:
                    break
            with pytest.raises(OSError, match="live socket"):
                Listener(sock_path)
        finally:
            for c in clients:
                c.close()
        assert lst.fileno() >= 0


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_non_socket_at_path_is_refused_and_kept(sock_path: Path, kind: str) -> None:
    if kind == "file":
        sock_path.write_text("precious")
    elif kind == "dir":
        sock_path.mkdir()
    else:
        sock_path.symlink_to("/etc/hostname")
    with pytest.raises(FileExistsError, match="not a socket") as info:
        Listener(sock_path)
    assert info.value.errno == errno.EEXIST
    if kind == "file":
        assert sock_path.read_text() == "precious"
    else:
        assert sock_path.is_dir() if kind == "dir" else sock_path.is_symlink()
    assert sorted(p.name for p in sock_path.parent.iterdir()) == [sock_path.name]


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Listener(tmp_path / "no" / "such" / "dir.sock")


def test_long_path_near_the_limit(tmp_path: Path) -> None:
    # The temporary name would be too long; the listener binds through /proc.
    base = str(tmp_path)
    path = Path(base) / ("x" * (105 - len(base)))
    assert len(os.fsencode(str(path))) == 106
    with Listener(path) as lst:
        lst.settimeout(TIMEOUT)
        exchange(lst, path)
    assert list(tmp_path.iterdir()) == []


def test_path_too_long(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120)
    with pytest.raises(OSError, match="too long") as info:
        Listener(path)
    assert info.value.errno == errno.ENAMETOOLONG
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(sock_path: Path) -> None:
    with pytest.raises(ValueError, match="permission bits"):
        Listener(sock_path, mode=0o4755)
    with pytest.raises(TypeError, match="unexpected keyword"):
        Listener(sock_path, max_payloda=3)
    with pytest.raises(ValueError, match="empty"):
        Listener("")
    assert not sock_path.exists()


def test_forked_copy_does_not_remove_the_file(listener: Listener, sock_path: Path) -> None:
    run_child(listener.close)
    assert sock_path.exists()
    exchange(listener, sock_path)


def test_close_leaves_a_successors_file(sock_path: Path) -> None:
    old = Listener(sock_path)
    os.unlink(sock_path)
    with Listener(sock_path) as new:
        old.close()
        assert sock_path.exists()
        new.settimeout(TIMEOUT)
        exchange(new, sock_path)


def test_channel_options_reach_accepted_channels(sock_path: Path) -> None:
    with Listener(sock_path, max_payload=5) as lst:
        lst.settimeout(TIMEOUT)
        with Channel.connect(sock_path) as client, lst.accept() as server:
            assert server.max_payload == 5
            assert client.gettimeout() is None


# -- connect errors ----------------------------------------------------------------------


def test_connect_missing_path(sock_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Channel.connect(sock_path)


def test_connect_refused(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    with pytest.raises(ConnectionRefusedError):
        Channel.connect(sock_path)


# -- abstract names -----------------------------------------------------------------------


def test_abstract_name() -> None:
    name = abstract_name()
    with Listener(name) as lst:
        lst.settimeout(TIMEOUT)
        exchange(lst, name)
        with pytest.raises(OSError, match="in use") as info:
            Listener(name)
        assert info.value.errno == errno.EADDRINUSE
    # Free again once closed.
    Listener(name).close()


# -- accept, timeouts, iteration ----------------------------------------------------------


def test_accept_timeout(listener: Listener) -> None:
    listener.settimeout(0.05)
    assert listener.gettimeout() == 0.05
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.settimeout(0.0)
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_iteration_yields_accepted_channels(listener: Listener, sock_path: Path) -> None:
    clients = [Channel.connect(sock_path) for _ in range(3)]
    try:
        for i, (server, client) in enumerate(zip(listener, clients, strict=False)):
            with server:
                client.send(str(i).encode())
                server.settimeout(TIMEOUT)
                assert server.recv().payload == str(i).encode()
            if i == 2:
                break
    finally:
        for c in clients:
            c.close()


def test_close_from_another_thread_ends_iteration(listener: Listener) -> None:
    started = threading.Event()
    result: list[object] = []

    def serve() -> None:
        started.set()
        result.extend(listener)  # blocks in accept until closed
        result.append("ended")

    listener.settimeout(None)
    t = threading.Thread(target=serve)
    t.start()
    assert started.wait(TIMEOUT)
    # Close while the thread is (about to be) blocked in accept().
    listener.close()
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert result == ["ended"]
    with pytest.raises(ValueError, match="closed"):
        listener.accept()


def test_an_accept_that_leaves_during_close_leaves_its_wake_up_fd_to_close(
    listener: Listener, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: close() read that a thread waited, removed the file, then wrote to the wake-up fd.

    The waiter, woken by a peer meanwhile, had left and released the
    listener, wake-up fd included: the write raised EBADF, or put 8 bytes
    into whatever file took that number since.
    """
    listener.settimeout(None)
    outcome: list[object] = []

    def wait() -> None:
        try:
            listener.accept().close()
            outcome.append("accepted")  # it had passed its look at _closed as close() began
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + TIMEOUT
    while listener._waiters == 0:
        assert time.monotonic() < deadline, "accept() never began"
    release_file = Listener._release_file
    bystander: list[int] = []

    def waiter_leaves_first(self: Listener) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.connect(str(sock_path))  # wakes the waiter, which sees the listener closed
            waiter.join(TIMEOUT)
            assert not waiter.is_alive()
        bystander.extend(os.pipe())  # takes any number the waiter let go of
        release_file(self)

    monkeypatch.setattr(Listener, "_release_file", waiter_leaves_first)
    try:
        listener.close()
        assert len(outcome) == 1
        assert outcome[0] == "accepted" or isinstance(outcome[0], ValueError), outcome
        os.set_blocking(bystander[0], False)
        with pytest.raises(BlockingIOError):
            os.read(bystander[0], 64)  # nothing was written into the bystander's pipe
    finally:
        for fd in bystander:
            os.close(fd)
    assert listener._released


class _Strike:
    """A tracer raising KeyboardInterrupt at the k-th point where CPython 3.11 runs a signal
    handler (a Python function's entry, a loop's jump back, the end of a call to a C function),
    in this thread only; as tests/_faults.py does."""

    def __init__(self, k: int) -> None:
        self.left = k
        self.entered = 0
        self.after_call: dict[Any, int] = {}

    def _strike(self) -> None:
        self.left -= 1
        if self.left < 0:
            sys.settrace(None)
            raise KeyboardInterrupt

    def enter(self, frame: Any, event: str, arg: object) -> Any:
        self.entered += 1
        if frame.f_code.co_filename == __file__ or frame.f_code.co_name == "__del__":
            return None
        self._strike()
        frame.f_trace_opcodes = True
        return self.opcode

    def opcode(self, frame: Any, event: str, arg: object) -> Any:
        if event != "opcode":
            return self.opcode
        began = self.after_call.pop(frame, None)
        if began is not None and began == self.entered:
            self._strike()
        op = frame.f_code.co_code[frame.f_lasti]
        if op == dis.opmap["CALL"]:
            self.after_call[frame] = self.entered
        elif op == dis.opmap["JUMP_BACKWARD"]:
            self._strike()
        return self.opcode


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="models CPython 3.11's handler points")
@pytest.mark.parametrize("waiting", [True, False], ids=["accept-waiting", "idle"])
def test_a_close_cut_short_by_a_handler_is_finished_by_the_next(tmp_path: Path, waiting: bool) -> None:
    """A review: once a handler's error cut close() short, a second close() (or the finalizer's)
    did nothing: accept() stayed blocked, and the socket, the wake-up fd and the lock fd leaked."""
    struck = 0
    for k in range(200):
        path = tmp_path / f"s{k}"
        lst = Listener(path)
        lst.settimeout(None)
        outcome: list[BaseException] = []
        waiter = None
        if waiting:

            def wait(lst: Listener = lst, outcome: list[BaseException] = outcome) -> None:
                try:
                    lst.accept().close()
                except BaseException as exc:
                    outcome.append(exc)

            waiter = threading.Thread(target=wait)
            waiter.start()
            deadline = time.monotonic() + TIMEOUT
            while lst._waiters == 0:
                assert time.monotonic() < deadline, "accept() never began"
        sys.settrace(_Strike(k).enter)
        try:
            lst.close()
        except KeyboardInterrupt:
            struck += 1
        finally:
            sys.settrace(None)
        lst.close()  # the caller's retry (or the finalizer's)
        if waiter is not None:
            waiter.join(TIMEOUT)
            assert not waiter.is_alive(), f"k={k}: accept() still blocked after the second close()"
            assert len(outcome) == 1
            assert isinstance(outcome[0], ValueError), (k, outcome)
        assert lst._released, f"k={k}: the listener was never released"
        assert not path.exists(), f"k={k}: the socket file was left"
        if struck <= k:
            break  # the k-th point is past the end of close(): every point was struck
    assert struck > 10


# -- peer checks ---------------------------------------------------------------------------


def _connect_as(address: str, uid: int | None, gid: int | None, ready_w: int) -> Callable[[], None]:
    """A child body: switch ids, connect, report, then expect to be closed unread."""

    def body() -> None:
        if gid is not None:
            os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
        with Channel.connect(address, timeout=TIMEOUT) as ch:
            os.write(ready_w, b"c")
            with pytest.raises((ChannelClosed, ConnectionResetError)):
                ch.recv()

    return body


def _refuse_then_accept(
    caplog: pytest.LogCaptureFixture, uid: int | None, gid: int | None, **checks: object
) -> None:
    name = abstract_name()  # abstract: no file permissions stand in the way
    r, w = os.pipe()
    try:
        with Listener(name, **checks) as lst:  # type: ignore[arg-type]
            lst.settimeout(TIMEOUT)
            pid = fork_child(_connect_as(name, uid, gid, w))
            try:
                assert os.read(r, 1) == b"c"  # its connection is queued first
                with caplog.at_level(logging.WARNING, logger="fdchannel.listener"):
                    creds = exchange(lst, name)  # accept refuses the child, then serves us
                assert creds.pid == os.getpid()
                assert lst.refused == 1
                assert [r.levelname for r in caplog.records] == ["WARNING"]
                assert f"pid={pid}" in caplog.records[0].getMessage()
            finally:
                assert wait_child(pid) == 0
    finally:
        os.close(r)
        os.close(w)


@needs_root
def test_allow_uids_refuses_other_users(caplog: pytest.LogCaptureFixture) -> None:
    _refuse_then_accept(caplog, NOBODY, NOBODY, allow_uids=[os.geteuid()])


@needs_root
def test_allow_gids_refuses_other_groups(caplog: pytest.LogCaptureFixture) -> None:
    _refuse_then_accept(caplog, None, NOBODY, allow_gids={os.getegid()})


def _accept_a_child_with_ids(uid: int, gid: int, groups: list[int], **checks: object) -> PeerCredentials:
    """A child switches to these ids and connects; the listener must accept it.

    Returns the credentials the accepted channel reports (pid, uid, gid).
    """
    name = abstract_name()
    with Listener(name, **checks) as lst:  # type: ignore[arg-type]
        lst.settimeout(TIMEOUT)

        def body() -> None:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            with Channel.connect(name, timeout=TIMEOUT) as ch:
                assert ch.recv().payload == b"accepted"

        pid = fork_child(body)
        try:
            with lst.accept() as server:
                creds = server.peer_credentials()
                server.send(b"accepted")
        finally:
            assert wait_child(pid) == 0
        assert lst.refused == 0
    assert creds.pid == pid
    return creds


@needs_root
def test_ids_of_2_31_and_more_are_read_unsigned() -> None:
    big = 3_000_000_000  # as user-namespace mappings in containers hand out
    creds = _accept_a_child_with_ids(big, big, [], allow_uids=[big], allow_gids=[big])
    assert (creds.uid, creds.gid) == (big, big)


@needs_root
@pytest.mark.parametrize("others", [0, 300], ids=["alone", "after-300-others"])
def test_allow_gids_accepts_a_supplementary_group(others: int) -> None:
    team = 4242  # not the peer's primary group
    groups = [*range(5000, 5000 + others), team]  # past 256 needs a larger read
    creds = _accept_a_child_with_ids(NOBODY, NOBODY, groups, allow_gids={team})
    assert creds.gid == NOBODY


def test_authorize_callback_sees_credentials(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[PeerCredentials] = []

    def authorize(creds: PeerCredentials) -> bool:
        seen.append(creds)
        return creds.pid == os.getpid()

    _refuse_then_accept(caplog, None, None, authorize=authorize)
    assert len(seen) == 2
    assert all(c.uid == os.geteuid() for c in seen)


def test_authorize_exception_refuses_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    name = abstract_name()

    def authorize(creds: PeerCredentials) -> bool:
        raise RuntimeError("policy bug")

    with Listener(name, authorize=authorize) as lst:
        lst.settimeout(0.5)
        client = Channel.connect(name, timeout=TIMEOUT)
        with client, caplog.at_level(logging.WARNING, logger="fdchannel.listener"):
            with pytest.raises(TimeoutError):
                lst.accept()  # refuses the one peer, then times out waiting
            with pytest.raises(ChannelClosed):
                client.recv()
        assert lst.refused == 1
        assert "policy bug" in caplog.text
        assert caplog.records[0].exc_info is not None


def test_an_authorize_that_raises_keyboardinterrupt_closes_the_peer() -> None:
    """Not refused (it is not an Exception), but the accepted socket is closed, not left to the GC."""
    name = abstract_name()

    def authorize(creds: PeerCredentials) -> bool:
        raise KeyboardInterrupt

    with Listener(name, authorize=authorize) as lst:
        lst.settimeout(TIMEOUT)
        with Channel.connect(name, timeout=TIMEOUT) as client:
            with pytest.raises(KeyboardInterrupt) as info:
                lst.accept()
            del info  # (its traceback would keep the socket, were it not closed)
            with pytest.raises(ChannelClosed):
                client.recv()  # the server's side is closed at once
        assert lst.refused == 0


def test_pair_credentials_name_the_creator() -> None:
    a, b = Channel.pair()
    with a, b:
        me = PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
        assert a.peer_credentials() == me
        assert b.peer_credentials() == me
        with pytest.raises(AttributeError):
            me.pid = 1  # type: ignore[misc]
