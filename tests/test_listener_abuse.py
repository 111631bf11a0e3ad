"""Hostile peers against named endpoints (issue #17): refused-peer floods and
abstract-name squatting.  Real processes connect; nothing is simulated."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdchannel import Channel, Listener, aio

from ._proc import needs_fork

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="named endpoints need AF_UNIX")

TIMEOUT = 10.0
FLOOD_SECONDS = 3.0
#: Connections nobody is allowed to make: every peer here is refused.
NOBODY = {getattr(os, "getuid", lambda: 0)() + 12345}

_FLOODER = textwrap.dedent(
    """
    import socket, sys, time
    path, seconds = sys.argv[1], float(sys.argv[2])
    end = time.monotonic() + seconds
    sys.stdout.write("go\\n"); sys.stdout.flush()
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except OSError:
            pass
        s.close()
    """
)


@pytest.fixture
def flood(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[str]]]]:
    """A socket path and, once started, four processes connecting to it in a loop for 3 s."""
    procs: list[subprocess.Popen[str]] = []
    yield tmp_path / "s", procs
    for p in procs:
        try:
            p.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()


def start_flood(path: Path, procs: list[subprocess.Popen[str]]) -> None:
    for _ in range(4):
        p = subprocess.Popen(
            [sys.executable, "-c", _FLOODER, str(path), str(FLOOD_SECONDS)], stdout=subprocess.PIPE, text=True
        )
        procs.append(p)
        assert p.stdout is not None
        assert p.stdout.readline() == "go\n"


def test_accept_keeps_its_timeout_under_a_flood_of_refused_peers(
    flood: tuple[Path, list[subprocess.Popen[str]]], caplog: pytest.LogCaptureFixture
) -> None:
    path, procs = flood
    with Listener(path, allow_uids=NOBODY, backlog=512) as lst:
        start_flood(path, procs)
        assert select.select([lst.fileno()], [], [], TIMEOUT)[0]  # the flood has arrived
        lst.settimeout(0.5)
        caplog.set_level(logging.WARNING, logger="fdchannel.listener")
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            lst.accept()
        elapsed = time.monotonic() - start
        assert elapsed < 1.5, f"accept(timeout=0.5) took {elapsed:.2f} s under the flood"
        assert lst.refused > 0
        # Rate-limited: at most one line per second, saying how many were quiet.
        lines = [r for r in caplog.records if r.name == "fdchannel.listener"]
        assert 1 <= len(lines) <= 2, len(lines)
        lst.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            lst.accept()  # returns after a bounded number of refusals


def test_asyncio_server_loop_keeps_running_under_a_flood_of_refused_peers(
    flood: tuple[Path, list[subprocess.Popen[str]]],
) -> None:
    path, procs = flood

    async def handler(ch: aio.AsyncChannel) -> None:
        raise AssertionError("no peer passes")

    async def main() -> float:
        async with await aio.start_server(handler, path, allow_uids=NOBODY, backlog=512) as server:
            start_flood(path, procs)
            worst = 0.0
            last = time.monotonic()
            end = last + 1.5
            while last < end:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                worst = max(worst, now - last)
                last = now
            assert server.listener.refused > 0
            return worst

    logging.getLogger("fdchannel.listener").setLevel(logging.ERROR)
    try:
        worst = asyncio.run(main())
    finally:
        logging.getLogger("fdchannel.listener").setLevel(logging.NOTSET)
    assert worst < 0.3, f"the event loop stalled for {worst:.2f} s"


# -- squatting: a client that requires the server's uid ----------------------------------


def test_expect_uid_refuses_a_server_of_another_user_before_sending(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Listener(path) as lst:
        lst.settimeout(TIMEOUT)
        with pytest.raises(PermissionError, match="expect_uid") as info:
            Channel.connect(path, timeout=TIMEOUT, expect_uid=os.getuid() + 1)
        assert info.value.filename == str(path)
        with lst.accept() as server:  # the refused connection: closed, nothing in it
            server.settimeout(TIMEOUT)
            with pytest.raises(EOFError):
                server.recv()
        with Channel.connect(path, timeout=TIMEOUT, expect_uid={os.getuid()}), lst.accept():
            pass

    async def main() -> None:
        async with await aio.start_server(lambda ch: asyncio.sleep(0), path):
            with pytest.raises(PermissionError, match="expect_uid"):
                await aio.connect(path, expect_uid=os.getuid() + 1)
            async with await aio.connect(path, expect_uid=os.getuid()):
                pass

    asyncio.run(main())


@needs_fork
@pytest.mark.skipif(
    getattr(os, "geteuid", lambda: -1)() != 0, reason="needs root to run a squatter as uid 65534"
)
def test_root_client_does_not_hand_an_fd_to_an_abstract_name_squatter() -> None:
    name = f"\0fdchannel-squat-{os.getpid()}"
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the squatter
        try:
            os.close(ready_r)
            os.close(got_r)
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(name)  # first come, first served: no permission needed
                s.listen()
                os.write(ready_w, b"1")
                s.settimeout(TIMEOUT)
                conn, _ = s.accept()
                with conn:
                    conn.settimeout(TIMEOUT)
                    data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(64))
                    os.write(got_w, f"{len(data)} {len(anc)}".encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(got_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        with (
            open("/etc/hostname", "rb") as secret,
            pytest.raises(PermissionError, match="uid 65534"),
            Channel.connect(name, timeout=TIMEOUT, expect_uid=0) as ch,
        ):
            ch.send(b"secret", [secret])  # never reached
        assert os.read(got_r, 64) == b"0 0"  # the squatter got nothing: no bytes, no fd
    finally:
        os.close(ready_r)
        os.close(got_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
