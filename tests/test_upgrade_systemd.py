"""An upgrade through systemd's fd store, with this test playing the service manager.

Generation 1 runs with ``NOTIFY_SOCKET`` pointing at a datagram socket the
test owns: it says ``MAINPID=``/``READY=1``, and on a restart pushes its
named fds there (``FDSTORE=1``, ``FDNAME=``) and exits.  The test keeps the
fds, as systemd does, and starts generation 2 with them by socket
activation (fds 3 and up, ``LISTEN_FDS``, ``LISTEN_FDNAMES``, its own pid in
``LISTEN_PID``): it serves on the same listening socket, and a client that
connected while no generation ran is answered.
"""

from __future__ import annotations

import array
import os
import socket
import sys
from pathlib import Path

import pytest

from ._proc import TIMEOUT, wait_child
from ._upgrade import REPO, SERVER, Harness, harness

__all__ = ["harness"]

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the fd store test uses memfds and pidfds (Linux)"
)


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, ancdata, flags, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC)
    assert not flags & socket.MSG_CTRUNC
    fds = array.array("i")
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
    return data, list(fds)


def activate(h: Harness, fds: dict[str, int], notify: str) -> int:
    """Fork and exec generation 2 with *fds* passed as socket activation does; its pid."""
    env = dict(os.environ, TEST_BOSS=str(h.tmp / "boss.sock"), NOTIFY_SOCKET=notify, TEST_BEHAVIOUR="ok")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["LISTEN_FDS"] = str(len(fds))
    env["LISTEN_FDNAMES"] = ":".join(fds)
    args = [sys.executable, str(SERVER), "--service", h.service, "--systemd"]
    high = [os.dup(fd) for fd in fds.values()]  # out of the way of 3, 4, ...
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, until exec
        try:
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)  # inheritable, as the manager passes them
            env["LISTEN_PID"] = str(os.getpid())
            os.execve(sys.executable, args, env)
        finally:
            os._exit(127)
    for fd in high:
        os.close(fd)
    return pid


def test_restart_through_the_fd_store(harness: Harness, tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stored: dict[str, int] = {}
    try:
        manager.bind(notify_path)
        manager.settimeout(TIMEOUT)
        os.environ["NOTIFY_SOCKET"] = notify_path
        try:
            first = harness.start("--systemd")
        finally:
            del os.environ["NOTIFY_SOCKET"]
        first.event("ready")
        assert receive(manager) == (f"MAINPID={first.pid}\nREADY=1".encode(), [])
        assert harness.ask() == first.pid

        first.send("store")
        assert first.event("stored") == {"event": "stored", "ok": True}
        for _ in range(2):
            data, fds = receive(manager)
            assert len(fds) == 1
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            assert fields["FDSTORE"] == "1"
            stored[fields["FDNAME"]] = fds[0]
        assert sorted(stored) == ["service", "state"]
        harness.wait_gone(first.pid)

        # No generation runs: a client waits in the backlog the manager keeps alive.
        with socket.socket(socket.AF_UNIX) as waiting:
            waiting.settimeout(TIMEOUT)
            waiting.connect(harness.service)
            waiting.sendall(b"pid?")
            pid = activate(harness, stored, notify_path)
            try:
                second = harness.arrival()
                assert second.pid == pid
                assert second.started["state"] == "state of generation 1"
                assert second.started["inherited"] == ["service"]  # "state" was taken first
                second.event("ready")
                assert receive(manager) == (f"MAINPID={pid}\nREADY=1".encode(), [])
                assert int(waiting.recv(64)) == pid
                assert harness.ask() == pid
            finally:
                os.kill(pid, 9)
                wait_child(pid)
    finally:
        manager.close()
        for fd in stored.values():
            os.close(fd)
