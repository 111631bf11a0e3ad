"""Real server generations for the upgrade tests: tests/_upgrade_server.py driven through a boss Listener."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fdchannel

from ._proc import TIMEOUT

REPO = Path(__file__).resolve().parent.parent
SERVER = Path(__file__).resolve().parent / "_upgrade_server.py"


class Generation:
    """One server process as the boss sees it: its channel and its events."""

    def __init__(self, channel: fdchannel.Channel) -> None:
        self.channel = channel
        channel.settimeout(TIMEOUT)
        self.started = self.event("started", "no-upgrade")
        self.pid: int = self.started.get("pid", 0)

    def event(self, *kinds: str) -> dict[str, Any]:
        with self.channel.recv() as msg:
            event: dict[str, Any] = json.loads(msg.payload)
        assert event["event"] in kinds, event
        return event

    def send(self, command: str) -> None:
        self.channel.send(command.encode())


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.service = str(tmp / "service.sock")
        self.control = str(tmp / "control.sock")
        self.pid_file = tmp / "run" / "server.pid"
        self.pid_file.parent.mkdir()
        self.boss = fdchannel.Listener(str(tmp / "boss.sock"))
        self.boss.settimeout(TIMEOUT)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.generations: list[Generation] = []
        self.pidfds: list[int] = []

    def start(
        self, *extra: str, behaviour: str = "ok", sibling: bool = False, async_: bool = False
    ) -> Generation:
        env = dict(os.environ, TEST_BOSS=str(self.tmp / "boss.sock"), TEST_BEHAVIOUR=behaviour)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        args = [
            sys.executable,
            str(SERVER),
            "--service",
            self.service,
            "--pid-file",
            str(self.pid_file),
            *extra,
        ]
        if sibling:
            args += ["--control", self.control]
        if async_:
            args.append("--async")
        self.procs.append(subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL))
        return self.arrival()

    def arrival(self) -> Generation:
        """The next generation that connects to the boss (one we started, or a successor)."""
        gen = Generation(self.boss.accept())
        self.generations.append(gen)
        if gen.pid:
            self.pidfds.append(os.pidfd_open(gen.pid))
        return gen

    def ask(self) -> int:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(self.service)
            sock.sendall(b"pid?")
            return int(sock.recv(64))

    def wait_gone(self, pid: int) -> None:
        """Wait until *pid* exited (our child or not: its pidfd becomes readable)."""
        fd = self.pidfds[[g.pid for g in self.generations if g.pid].index(pid)]
        assert select.select([fd], [], [], TIMEOUT)[0], f"pid {pid} did not exit"
        for proc in self.procs:
            if proc.pid == pid:
                assert proc.wait(TIMEOUT) == 0

    def wait_gone_killed(self, pid: int) -> None:
        """As `wait_gone`, for a process we killed (its exit code is -9)."""
        fd = self.pidfds[[g.pid for g in self.generations if g.pid].index(pid)]
        assert select.select([fd], [], [], TIMEOUT)[0], f"pid {pid} did not exit"
        for proc in self.procs:
            if proc.pid == pid:
                assert proc.wait(TIMEOUT) == -signal.SIGKILL

    def close(self) -> None:
        for fd in self.pidfds:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([fd], [], [], TIMEOUT)
            os.close(fd)
        for proc in self.procs:
            proc.kill()
            proc.wait(TIMEOUT)
        for gen in self.generations:
            gen.channel.close()
        self.boss.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()
