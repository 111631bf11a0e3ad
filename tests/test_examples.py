"""Every example runs as a script, for real, and succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def test_prefork_echo() -> None:
    out = run_example("prefork_echo.py", "--workers", "3", "--clients", "9")
    assert "9/9 clients got their echoes" in out
    workers = {line.split()[-1] for line in out.splitlines() if line.startswith("connection")}
    assert len(workers) == 3  # every worker got connections


@pytest.mark.skipif(sys.platform == "win32", reason="the example switches uids (setuid), which Windows lacks")
@pytest.mark.skipif(
    sys.platform != "win32" and os.geteuid() != 0, reason="the example drops a child from root to uid 65534"
)
def test_privsep() -> None:
    out = run_example("privsep.py")
    assert "open() itself fails: Permission denied" in out
    assert 'read through the passed fd: "the parent\'s secret"' in out
    assert "refused by policy" in out


@pytest.mark.skipif(
    sys.platform == "win32",
    reason="the example's control endpoint is an AF_UNIX Listener, which Windows lacks",
)
def test_handoff_refuses_no_connection() -> None:
    out = run_example("handoff.py")
    assert "old server: handed off" in out
    assert "refused=0 failed=0" in out
    assert "zero refused connections across the handoff" in out


@pytest.mark.skipif(
    sys.platform == "win32", reason="the example upgrades with fdchannel.upgrade and SIGHUP (POSIX)"
)
def test_upgrade_http_under_load() -> None:
    out = run_example("upgrade_http.py", "--upgrades", "4")
    assert "refused: 0" in out
    assert "failed_requests: 0" in out
    assert "generations_seen: 5" in out
    assert "zero refused connections and zero failed requests" in out


@pytest.mark.skipif(
    sys.platform == "win32",
    reason="the broker hands out AF_UNIX channel ends; a WinDuplicate end cannot move",
)
def test_broker_introduces_two_clients_that_then_talk_without_it() -> None:
    out = run_example("broker.py")
    lines = out.splitlines()
    assert "broker: introduced alice and bob (its own ends closed: True)" in lines
    # Both clients saw the broker go before they talked.
    assert "alice: the broker closed its channel; talking to bob directly" in lines
    assert "bob: the broker closed its channel; talking to alice directly" in lines
    assert "bob: alice says 'write your answer into this pipe'" in lines
    assert "alice: read from the pipe bob got from her: 'hello alice, from bob'" in lines
    assert lines.index("bob: the broker closed its channel; talking to alice directly") < lines.index(
        "bob: alice says 'write your answer into this pipe'"
    )
    assert "broker: clients exited with [0, 0]" in lines
