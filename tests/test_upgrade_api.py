"""`fdchannel.upgrade` in one process (and a fork): arguments, ownership, the protocol's edges."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ._proc import (
    TIMEOUT,
    fork_child,
    limit_fds_to_free_slots,
    needs_fork,
    needs_rlimit,
    run_child,
    wait_child,
)

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="upgrades need POSIX fd inheritance and AF_UNIX endpoints"
)


@pytest.fixture
def up() -> object:
    from fdchannel.upgrade import Upgrader

    with Upgrader() as upgrader:
        yield upgrader


@pytest.mark.parametrize("name", ["", "a:b", "x" * 256, "tab\there", "é"])
def test_register_refuses_bad_names(up: object, name: str) -> None:
    with pytest.raises(ValueError, match="fd name"):
        up.register(name, 0)  # type: ignore[attr-defined]


def test_register_refuses_a_taken_name_no_fd_and_closed_objects(up: object) -> None:
    up.register("a", 0)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="registered already"):
        up.register("a", 1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="at least one fd"):
        up.register("b")  # type: ignore[attr-defined]
    sock = socket.socket()
    sock.close()
    with pytest.raises(ValueError, match="closed"):
        up.register("c", sock)  # type: ignore[attr-defined]
    assert up.registered == {"a": [0]}  # type: ignore[attr-defined]
    up.unregister("a")  # type: ignore[attr-defined]
    assert up.registered == {}  # type: ignore[attr-defined]


def test_first_generation_inherits_nothing(up: object) -> None:
    assert up.inherited == {}  # type: ignore[attr-defined]
    assert up.take("http") is None  # type: ignore[attr-defined]
    assert up.take_all("http") == []  # type: ignore[attr-defined]
    assert up.predecessor_pid is None  # type: ignore[attr-defined]
    assert not up.exiting  # type: ignore[attr-defined]
    assert up.wait_exit(0.0) is False  # type: ignore[attr-defined]


def test_socket_creates_and_registers(up: object) -> None:
    sock = up.socket("http", lambda: socket.create_server(("127.0.0.1", 0)))  # type: ignore[attr-defined]
    with sock:
        assert up.registered == {"http": [sock]}  # type: ignore[attr-defined]
        up.unregister("http")  # type: ignore[attr-defined]


def test_a_program_that_cannot_start(up: object, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        up.upgrade([str(tmp_path / "missing")])  # type: ignore[attr-defined]
    # Not stuck "in progress": the next attempt gets as far as the program.
    with pytest.raises(FileNotFoundError):
        up.upgrade([str(tmp_path / "missing")])  # type: ignore[attr-defined]


def test_accept_upgrade_needs_a_control_endpoint(up: object) -> None:
    with pytest.raises(ValueError, match="control_path"):
        up.accept_upgrade(0.0)  # type: ignore[attr-defined]


def test_nobody_at_the_control_path_is_the_first_generation(tmp_path: Path) -> None:
    from fdchannel.upgrade import Upgrader

    path = str(tmp_path / "control")
    with Upgrader(control_path=path) as first:
        assert first.predecessor_pid is None
        first.ready()  # opens the endpoint
        assert os.path.exists(path)
        with pytest.raises(TimeoutError):
            first.accept_upgrade(timeout=0.05)
        # A timed-out wait leaves no upgrade "running"; 0.0 polls, as sockets do.
        with pytest.raises(BlockingIOError):
            first.accept_upgrade(timeout=0.0)
    assert not os.path.exists(path)


def test_drain_returns_what_is_left(up: object) -> None:
    started, release = threading.Event(), threading.Event()

    def work() -> None:
        with up.track():  # type: ignore[attr-defined]
            started.set()
            release.wait(TIMEOUT)

    t = threading.Thread(target=work)
    t.start()
    try:
        assert started.wait(TIMEOUT)
        assert up.in_flight == 1  # type: ignore[attr-defined]
        assert up.drain(0.05) == 1  # type: ignore[attr-defined]
    finally:
        release.set()
        t.join(TIMEOUT)
    assert up.drain(TIMEOUT) == 0  # type: ignore[attr-defined]


def test_pid_file_is_replaced_whole(tmp_path: Path) -> None:
    from fdchannel._upgrade_wire import write_pid_file

    target = tmp_path / "app.pid"
    target.write_text("old\n")
    inode = target.stat().st_ino
    write_pid_file(target, 1234)
    assert target.read_text() == "1234\n"
    assert target.stat().st_ino != inode  # a new file renamed over it, not rewritten in place
    assert os.listdir(tmp_path) == ["app.pid"]
    assert target.stat().st_mode & 0o777 == 0o644


@needs_fork
def test_predecessor_gone_before_the_handover() -> None:
    ours, theirs = socket.socketpair()
    ours.close()  # the predecessor "died" before it sent anything

    def child() -> None:
        from fdchannel.upgrade import UpgradeError, Upgrader

        os.environ["FDCHANNEL_UPGRADE"] = "1"
        os.environ["FDCHANNEL_FD"] = str(theirs.detach())
        try:
            Upgrader(ready_timeout=TIMEOUT)
        except UpgradeError as exc:
            assert "went away before it handed over" in str(exc)
        else:
            raise AssertionError("no UpgradeError")
        assert "FDCHANNEL_UPGRADE" not in os.environ

    try:
        run_child(child)
    finally:
        theirs.close()


@needs_fork
@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"garbage", "no upgrade message"),
        (b'{"fdchannel-upgrade": 1, "kind": "fds", "names": [["a", 2]]}', "but sent 1 fds"),
        (b'{"fdchannel-upgrade": 1, "kind": "fds", "names": "a"}', "malformed fd list"),
        (b'{"fdchannel-upgrade": 1, "kind": "ready"}', "expected the fds"),
    ],
)
def test_malformed_handover_closes_what_came(payload: bytes, words: str) -> None:
    import fdchannel

    r, w = os.pipe()
    parent_end, child_end = socket.socketpair()

    def child() -> None:
        from fdchannel.upgrade import UpgradeFailed, Upgrader

        parent_end.close()
        os.environ["FDCHANNEL_UPGRADE"] = "1"
        os.environ["FDCHANNEL_FD"] = str(child_end.detach())
        before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        try:
            Upgrader(ready_timeout=TIMEOUT)
        except UpgradeFailed as exc:
            assert words in str(exc), str(exc)
        else:
            raise AssertionError("no UpgradeFailed")
        if before is not None:
            # The fd that came and the channel are closed again.
            assert set(os.listdir("/proc/self/fd")) <= before

    with fdchannel.Channel(parent_end) as old:
        old.send(payload, [r])
        os.close(r)
        os.close(w)
        try:
            run_child(child)
        finally:
            child_end.close()


@needs_fork
def test_successor_refuses_a_predecessor_of_another_uid() -> None:
    from fdchannel.upgrade import UpgradeError, Upgrader

    if os.geteuid() != 0:
        pytest.skip("needs root to run the running process as uid 65534")
    name = f"\0fdchannel-upgrade-api-{os.getpid()}"
    listening_r, listening_w = os.pipe()
    done_r, done_w = os.pipe()

    def old() -> None:
        os.close(listening_r)
        os.close(done_w)
        os.setgid(65534)
        os.setuid(65534)
        with Upgrader(control_path=name) as running:
            running.ready()  # listens at the control endpoint, as uid 65534
            os.write(listening_w, b"x")
            os.read(done_r, 1)  # until the would-be successor has given up

    pid = fork_child(old)
    os.close(listening_w)
    os.close(done_r)
    try:
        assert os.read(listening_r, 1) == b"x"
        with pytest.raises(UpgradeError, match="runs as uid 65534"):
            Upgrader(control_path=name, ready_timeout=TIMEOUT)
    finally:
        os.close(done_w)
        os.close(listening_r)
        assert wait_child(pid) == 0


def test_waiting_for_a_sibling_is_no_upgrade_in_progress(tmp_path: Path) -> None:
    from fdchannel.upgrade import Upgrader

    up = Upgrader(control_path=str(tmp_path / "control"))
    up.ready()
    errors: list[BaseException] = []

    def wait_for_sibling() -> None:
        try:
            up.accept_upgrade(timeout=TIMEOUT)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_sibling)
    waiter.start()
    try:
        # The child model still works while a thread waits for a sibling.
        with pytest.raises(FileNotFoundError):
            up.upgrade([str(tmp_path / "missing")])
    finally:
        up.close()  # wakes the waiter
        waiter.join(TIMEOUT)
    assert not waiter.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], ValueError)  # the endpoint was closed


def test_async_waiting_for_a_sibling_is_no_upgrade_in_progress(tmp_path: Path) -> None:
    import asyncio

    from fdchannel.upgrade import AsyncUpgrader

    async def main() -> None:
        up = await AsyncUpgrader.create(control_path=str(tmp_path / "control"))
        try:
            await up.ready()
            waiting = asyncio.ensure_future(up.accept_upgrade(timeout=TIMEOUT))
            await asyncio.sleep(0)  # let it start waiting (one loop turn, not a timed wait)
            with pytest.raises(FileNotFoundError):
                await up.upgrade([str(tmp_path / "missing")])
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        finally:
            up.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


# -- waiting for a sibling while another upgrade runs or succeeds -----------------------

#: A successor for the child model: ready at once (after reading a byte from the
#: FIFO argv[2], if given), then gone.
SUCCESSOR = (
    "import sys\n"
    "from fdchannel.upgrade import Upgrader\n"
    "u = Upgrader(control_path=sys.argv[1], ready_timeout=30)\n"
    "if len(sys.argv) > 2:\n"
    "    with open(sys.argv[2], 'rb') as gate:\n"
    "        gate.read(1)\n"
    "u.ready()\n"
    "u.close()\n"
)


def reap(pid: int) -> None:
    """Wait for a successor started by upgrade() (the upgrader never waits for it).

    Through the Popen the upgrader keeps, so that it knows the successor
    ended: reaped behind its back, it warns at exit that the process is
    still running.
    """
    from fdchannel import _upgrade_base

    kept = [p for p in _upgrade_base._successors if p.pid == pid]
    assert len(kept) == 1, f"the upgrader kept no Popen for {pid}"
    _upgrade_base._successors.remove(kept[0])
    try:
        kept[0].wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        kept[0].kill()
        kept[0].wait(TIMEOUT)
        raise AssertionError(f"the successor {pid} did not exit") from None


def test_blocking_wait_for_a_sibling_ends_when_an_upgrade_succeeds(tmp_path: Path) -> None:
    from fdchannel.upgrade import UpgradeInProgress, Upgrader

    control = str(tmp_path / "control")
    with Upgrader(control_path=control) as up:
        up.ready()
        errors: list[BaseException] = []

        def wait_for_sibling() -> None:
            try:
                up.accept_upgrade(timeout=None)
            except BaseException as exc:
                errors.append(exc)

        waiter = threading.Thread(target=wait_for_sibling, daemon=True)
        waiter.start()
        pid = up.upgrade([sys.executable, "-c", SUCCESSOR, control])
        waiter.join(TIMEOUT)
        assert not waiter.is_alive(), "accept_upgrade(timeout=None) never noticed the upgrade"
        reap(pid)
    assert len(errors) == 1
    assert isinstance(errors[0], UpgradeInProgress), repr(errors[0])
    assert f"pid {pid}" in str(errors[0])


def test_async_wait_for_a_sibling_ends_when_an_upgrade_succeeds(tmp_path: Path) -> None:
    import asyncio

    from fdchannel.upgrade import AsyncUpgrader, UpgradeInProgress

    control = str(tmp_path / "control")

    async def main() -> int:
        up = await AsyncUpgrader.create(control_path=control)
        try:
            await up.ready()
            waiting = asyncio.ensure_future(up.accept_upgrade(timeout=None))
            await asyncio.sleep(0)  # one loop turn: it is waiting on the endpoint
            pid = await up.upgrade([sys.executable, "-c", SUCCESSOR, control])
            assert up.exiting
            with pytest.raises(UpgradeInProgress, match=f"pid {pid}"):
                # Old code: never woken, so this timed out.
                await asyncio.wait_for(waiting, TIMEOUT)
            return pid
        finally:
            up.close()

    reap(asyncio.run(main()))


def test_waiting_for_a_sibling_is_not_upset_by_peers_turned_away(tmp_path: Path) -> None:  # noqa: PLR0915
    """A peer turned away during a child-model handover never makes a waiter's accept non-blocking.

    The waiter is held inside `authorize` for peer A while the handover turns
    away peer B; A is then refused and the waiter waits on: it must neither
    raise `BlockingIOError` (the old code made the shared Listener
    non-blocking) nor end before the upgrade succeeded.
    """
    from fdchannel.upgrade import UpgradeInProgress, Upgrader

    control = str(tmp_path / "control")
    gate = str(tmp_path / "gate")
    os.mkfifo(gate)
    gate_fd = os.open(gate, os.O_RDWR)  # never blocks, keeps the FIFO open
    holding, release = threading.Event(), threading.Event()
    waiter_thread: list[threading.Thread] = []
    held: list[bool] = []

    def authorize(creds: object) -> bool:
        if threading.current_thread() in waiter_thread and not held:
            held.append(True)
            holding.set()
            release.wait(TIMEOUT)
            return False  # peer A is refused: the waiter must wait on
        return True

    outcomes: list[BaseException] = []
    try:
        with Upgrader(control_path=control, authorize=authorize) as up, socket.socket(socket.AF_UNIX) as a:
            up.ready()

            def wait_for_sibling() -> None:
                try:
                    up.accept_upgrade(timeout=None)
                except BaseException as exc:
                    outcomes.append(exc)

            waiter = threading.Thread(target=wait_for_sibling, daemon=True)
            waiter_thread.append(waiter)
            waiter.start()
            a.settimeout(TIMEOUT)
            a.connect(control)
            assert holding.wait(TIMEOUT)  # the waiter holds A, inside authorize
            result: list[object] = []
            upgrading = threading.Thread(
                target=lambda: result.append(up.upgrade([sys.executable, "-c", SUCCESSOR, control, gate])),
                daemon=True,
            )
            upgrading.start()
            try:
                with socket.socket(socket.AF_UNIX) as b:
                    b.settimeout(TIMEOUT)
                    b.connect(control)
                    assert b.recv(4096)  # B was told "busy" by the handover
                release.set()
                assert a.recv(1) == b""  # A was refused
                assert not outcomes, outcomes  # and the waiter waits on
            finally:
                release.set()
                os.write(gate_fd, b"x")
                upgrading.join(TIMEOUT)
                waiter.join(TIMEOUT)
            assert not waiter.is_alive()
            assert len(result) == 1
            assert isinstance(result[0], int), result
            reap(result[0])
    finally:
        os.close(gate_fd)
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], UpgradeInProgress), repr(outcomes[0])


# -- the sibling's process: by the kernel's pidfd, never by a pid read later ------------


def _has_peer_pidfd() -> bool:
    from fdchannel._peer import peer_pidfd

    a, b = socket.socketpair()
    with a, b:
        try:
            os.close(peer_pidfd(a))
        except OSError:
            return False
    return True


@needs_fork
def test_a_sibling_gone_before_the_handover_is_never_confused_with_who_reused_its_pid(tmp_path: Path) -> None:
    """A successor connects and exits; its pid goes to another process; the handover must not kill that one.

    In a pid namespace of its own (so the pid is reused for sure, by
    ``ns_last_pid``): the old code opened a pidfd of the pid only after the
    accept, got the newcomer's and SIGKILLed it when the handover failed.
    """
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs Linux and root (a pid namespace, ns_last_pid)")
    if not _has_peer_pidfd():
        pytest.skip("needs SO_PEERPIDFD (Linux 6.5+): without it the pid is opened late, as documented")
    import ctypes

    control = str(tmp_path / "control")

    def in_namespace() -> None:
        from fdchannel.upgrade import UpgradeFailed, Upgrader

        with Upgrader(control_path=control, ready_timeout=2.0) as up:
            up.ready()
            sibling = os.fork()
            if sibling == 0:  # pragma: no cover - the successor: connects and is gone
                probe = socket.socket(socket.AF_UNIX)
                probe.connect(control)
                os._exit(0)
            os.waitpid(sibling, 0)  # reaped: its pid is free
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(sibling - 1))
            hold_r, hold_w = os.pipe()
            victim = os.fork()
            if victim == 0:  # pragma: no cover - an unrelated process that got the pid
                os.close(hold_w)
                os.read(hold_r, 1)
                os._exit(0)
            os.close(hold_r)
            try:
                assert victim == sibling, "the pid was not reused"
                with pytest.raises(UpgradeFailed):
                    up.accept_upgrade(timeout=TIMEOUT)
                assert os.waitpid(victim, os.WNOHANG) == (0, 0), "the process that reused the pid was killed"
            finally:
                os.close(hold_w)  # the victim exits by itself
                with contextlib.suppress(ChildProcessError):  # reaped above when it was killed
                    os.waitpid(victim, 0)

    def outside() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x20000000) != 0:  # CLONE_NEWPID: our next child is pid 1 there
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID)")
        assert wait_child(fork_child(in_namespace)) == 0

    run_child(outside)


# -- credentials that cannot be read: UpgradeFailed in both forms -----------------------


@needs_fork
@needs_rlimit
@pytest.mark.parametrize("form", ["blocking", "async"])
def test_credentials_that_cannot_be_read_are_an_upgrade_failure(tmp_path: Path, form: str) -> None:
    """The fd table is full when a successor connects: its pidfd cannot be made (EMFILE)."""
    if sys.platform != "linux" or not _has_peer_pidfd():
        pytest.skip("needs SO_PEERPIDFD (Linux 6.5+), the one credential read that needs an fd")
    control = str(tmp_path / "control")

    def child() -> None:
        import asyncio

        from fdchannel.upgrade import AsyncUpgrader, UpgradeFailed, Upgrader

        async def run_async(peer: socket.socket) -> None:
            up = await AsyncUpgrader.create(control_path=control)
            try:
                await up.ready()
                peer.connect(control)
                limit_fds_to_free_slots(1)  # the accepted socket; not its pidfd
                with pytest.raises(UpgradeFailed, match="credentials could not be read") as info:
                    await up.accept_upgrade(timeout=TIMEOUT)
                assert isinstance(info.value.__cause__, OSError)
            finally:
                up.close()

        peer = socket.socket(socket.AF_UNIX)
        peer.settimeout(TIMEOUT)
        if form == "async":
            asyncio.run(run_async(peer))
            return
        with Upgrader(control_path=control) as up:
            up.ready()
            peer.connect(control)
            limit_fds_to_free_slots(1)
            with pytest.raises(UpgradeFailed, match="credentials could not be read") as info:
                up.accept_upgrade(timeout=TIMEOUT)
            assert isinstance(info.value.__cause__, OSError)

    run_child(child)
