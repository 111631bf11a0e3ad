"""`fdchannel.upgrade` in one process (and a fork): arguments, ownership, the protocol's edges."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from ._proc import TIMEOUT, fork_child, needs_fork, run_child, wait_child

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
