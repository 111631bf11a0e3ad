"""`fdchannel.upgrade` with real processes: both models, every failure path, asyncio.

The servers are tests/_upgrade_server.py, one process per generation; each
reports to a "boss" `Listener` this test owns, and serves a Unix socket
that answers every connection with the pid of the process that accepted it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

import pytest

from ._proc import TIMEOUT
from ._upgrade import Generation, Harness, harness

__all__ = ["harness"]  # the fixture

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="upgrades need POSIX fd inheritance and AF_UNIX endpoints"
)


def successful_upgrade(h: Harness, old: Generation, command: str = "upgrade") -> Generation:
    old.send(command)
    new = h.arrival()
    assert new.started["predecessor"] == old.pid
    assert "service" in new.started["inherited"]
    assert new.event("ready")["pid"] == new.pid
    result = old.event("upgrade")
    assert result == {"event": "upgrade", "ok": True, "pid": new.pid}
    assert old.event("exiting") == {"event": "exiting", "left": 0}
    h.wait_gone(old.pid)
    assert h.ask() == new.pid
    return new


# -- success ---------------------------------------------------------------------------


def test_child_model_hands_over_more_than_253_fds(harness: Harness) -> None:
    old = harness.start("--extra", "300")
    old.event("ready")
    assert harness.ask() == old.pid
    old.send("upgrade")
    new = harness.arrival()
    assert new.started["extra"] == 300  # in one message, split on the wire
    assert new.started["extra_same_file"] is True
    new.event("ready")
    assert old.event("upgrade")["ok"] is True
    old.event("exiting")
    harness.wait_gone(old.pid)
    assert harness.ask() == new.pid


def test_child_model_repeatedly_and_pid_file(harness: Harness) -> None:
    gen = harness.start()
    gen.event("ready")
    assert harness.pid_file.read_text() == f"{gen.pid}\n"
    for _ in range(3):
        gen = successful_upgrade(harness, gen)
        assert harness.pid_file.read_text() == f"{gen.pid}\n"
    # Replaced atomically: no temporary file is left next to it.
    assert os.listdir(harness.pid_file.parent) == ["server.pid"]


def test_sibling_model(harness: Harness) -> None:
    old = harness.start(sibling=True)
    old.event("ready")
    old.send("accept")
    new = harness.start(sibling=True)  # started by us, not by the old process
    assert new.started["predecessor"] == old.pid
    new.event("ready")
    assert old.event("upgrade") == {"event": "upgrade", "ok": True, "pid": new.pid}
    old.event("exiting")
    harness.wait_gone(old.pid)
    assert harness.ask() == new.pid
    # The successor took over the control endpoint too: it can be upgraded again.
    new.send("accept")
    third = harness.start(sibling=True)
    third.event("ready")
    assert new.event("upgrade")["pid"] == third.pid
    new.event("exiting")
    harness.wait_gone(new.pid)
    assert harness.ask() == third.pid


def test_upgrades_with_every_fd_above_1023(harness: Harness) -> None:
    """A busy server's fds are past select()'s FD_SETSIZE: the upgrade waits with poll()."""
    old = harness.start("--ballast", "1100", sibling=True)
    old.event("ready")
    old.send("accept")  # the sibling model: waits for the successor's answers
    new = harness.start("--ballast", "1100", sibling=True)
    new.event("ready")
    assert old.event("upgrade") == {"event": "upgrade", "ok": True, "pid": new.pid}
    old.event("exiting")
    harness.wait_gone(old.pid)
    successful_upgrade(harness, new)  # the child model, from the sibling


def test_sibling_of_another_uid_is_refused(harness: Harness) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a would-be successor as uid 65534")
    name = f"fdchannel-upgrade-test-{os.getpid()}"
    # An abstract control endpoint: no directory permissions stand in the way.
    old = harness.start("--control", "@" + name)
    old.event("ready")
    old.send("accept")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            probe = socket.socket(socket.AF_UNIX)
            probe.settimeout(TIMEOUT)
            probe.connect("\0" + name)
            code = 0 if probe.recv(1) == b"" else 2  # closed, nothing sent: refused
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert harness.ask() == old.pid


def test_draining_waits_for_work_in_flight(harness: Harness) -> None:
    old = harness.start()
    old.event("ready")
    with socket.socket(socket.AF_UNIX) as held:
        held.settimeout(TIMEOUT)
        held.connect(harness.service)
        held.sendall(b"hold")
        assert held.recv(64) == b"holding\n"
        old.send("upgrade")
        new = harness.arrival()
        new.event("ready")
        assert old.event("upgrade")["ok"] is True
        assert harness.ask() == new.pid  # the successor serves while the old one drains
        held.sendall(b"done")
        assert int(held.recv(64)) == old.pid  # the request in flight finished on the old one
    assert old.event("exiting")["left"] == 0
    harness.wait_gone(old.pid)


# -- failures: the old process keeps serving ----------------------------------------


def failed_upgrade(h: Harness, behaviour: str, *extra: str) -> tuple[Generation, dict[str, Any]]:
    old = h.start(*extra)
    old.event("ready")
    old.send(f"upgrade {behaviour}")
    h.arrival()
    result = old.event("upgrade")
    assert result["ok"] is False
    assert h.ask() == old.pid  # still serving, socket intact
    assert h.pid_file.read_text() == f"{old.pid}\n"
    return old, result


def test_successor_crashes(harness: Harness) -> None:
    old, result = failed_upgrade(harness, "crash")
    assert result["error"] == "UpgradeFailed"
    assert result["exit_code"] == 3
    assert "exited with code 3 before it was ready" in result["message"]
    successful_upgrade(harness, old)  # and a later upgrade works


def test_successor_hangs(harness: Harness) -> None:
    _old, result = failed_upgrade(harness, "hang", "--ready-timeout", "2")
    assert result["error"] == "UpgradeTimeout"
    assert result["exit_code"] == -signal.SIGKILL
    assert "not ready within 2.0s" in result["message"]


def test_successor_refuses(harness: Harness) -> None:
    _old, result = failed_upgrade(harness, "refuse")
    assert result["error"] == "UpgradeRefused"
    assert result["reason"] == "bad config"
    assert result["exit_code"] == 4


def test_second_upgrade_while_one_runs(harness: Harness) -> None:
    old = harness.start(sibling=True)
    old.event("ready")
    old.send("upgrade wait")
    new = harness.arrival()  # has the fds, waits for our word to be ready
    old.send("upgrade")
    second = old.event("upgrade")
    assert second["error"] == "UpgradeInProgress"
    assert "already running" in second["message"]
    # A sibling that connects meanwhile is told so too.
    sibling = harness.start(sibling=True)
    assert sibling.started["event"] == "no-upgrade"
    assert sibling.started["error"] == "UpgradeInProgress"
    new.send("ready")
    new.event("ready")
    assert old.event("upgrade")["pid"] == new.pid
    old.event("exiting")
    harness.wait_gone(old.pid)
    assert harness.ask() == new.pid


def test_old_process_killed_during_the_handoff(harness: Harness) -> None:
    old = harness.start()
    old.event("ready")
    old.send("upgrade wait")
    new = harness.arrival()  # the fds are in the successor, which is not ready yet
    os.kill(old.pid, signal.SIGKILL)
    harness.wait_gone_killed(old.pid)
    new.send("ready")
    new.event("ready")  # it noticed its predecessor is gone and serves anyway
    assert harness.ask() == new.pid
    assert harness.pid_file.read_text() == f"{new.pid}\n"


# -- asyncio ------------------------------------------------------------------------------


def test_async_child_and_sibling(harness: Harness) -> None:
    old = harness.start(async_=True, sibling=True)
    old.event("ready")
    assert harness.ask() == old.pid
    new = successful_upgrade(harness, old)
    new.send("accept")
    third = harness.start(async_=True, sibling=True)
    third.event("ready")
    assert new.event("upgrade")["pid"] == third.pid
    new.event("exiting")
    harness.wait_gone(new.pid)
    assert harness.ask() == third.pid


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [("crash", "UpgradeFailed"), ("refuse", "UpgradeRefused"), ("hang", "UpgradeTimeout")],
)
def test_async_failures(harness: Harness, behaviour: str, error: str) -> None:
    old, result = failed_upgrade(harness, behaviour, "--async", "--ready-timeout", "2")
    assert result["error"] == error
    successful_upgrade(harness, old)


# -- failures in the sibling model ---------------------------------------------------


def failed_sibling(h: Harness, behaviour: str, *extra: str) -> tuple[Generation, Generation, dict[str, Any]]:
    old = h.start(*extra, sibling=True)
    old.event("ready")
    old.send("accept")
    new = h.start(*extra, behaviour=behaviour, sibling=True)  # not our child: the old one's sibling
    assert new.started["predecessor"] == old.pid
    result = old.event("upgrade")
    assert result["ok"] is False
    assert h.ask() == old.pid  # still serving, socket intact
    assert h.pid_file.read_text() == f"{old.pid}\n"
    return old, new, result


def exit_code_of(h: Harness, pid: int) -> int:
    (proc,) = [p for p in h.procs if p.pid == pid]
    return proc.wait(TIMEOUT)


def sibling_upgrade_works(h: Harness, old: Generation) -> None:
    old.send("accept")
    new = h.start(sibling=True)
    new.event("ready")
    assert old.event("upgrade") == {"event": "upgrade", "ok": True, "pid": new.pid}
    old.event("exiting")
    h.wait_gone(old.pid)
    assert h.ask() == new.pid


def test_sibling_crashes(harness: Harness) -> None:
    old, new, result = failed_sibling(harness, "crash")
    assert result["error"] == "UpgradeFailed"
    assert "exited" in result["message"]
    assert "before it was ready" in result["message"]
    assert result["exit_code"] is None  # not its child: the status is its parent's (ours)
    assert exit_code_of(harness, new.pid) == 3
    sibling_upgrade_works(harness, old)


def test_sibling_hangs(harness: Harness) -> None:
    old, new, result = failed_sibling(harness, "hang", "--ready-timeout", "2")
    assert result["error"] == "UpgradeTimeout"
    assert "not ready within 2.0s" in result["message"]
    assert exit_code_of(harness, new.pid) == -signal.SIGKILL  # killed by the old process, by pidfd
    sibling_upgrade_works(harness, old)


def test_sibling_refuses(harness: Harness) -> None:
    old, new, result = failed_sibling(harness, "refuse")
    assert result["error"] == "UpgradeRefused"
    assert result["reason"] == "bad config"
    assert result["exit_code"] is None
    assert exit_code_of(harness, new.pid) == 4
    sibling_upgrade_works(harness, old)


def test_old_process_killed_during_a_sibling_handoff(harness: Harness) -> None:
    old = harness.start(sibling=True)
    old.event("ready")
    old.send("accept")
    new = harness.start(behaviour="wait", sibling=True)  # has the fds, not ready yet
    os.kill(old.pid, signal.SIGKILL)
    harness.wait_gone_killed(old.pid)
    new.send("ready")
    new.event("ready")  # it serves anyway, and took over the control endpoint
    assert harness.ask() == new.pid
    assert harness.pid_file.read_text() == f"{new.pid}\n"
    sibling_upgrade_works(harness, new)
