"""`python -m fdchannel demo` runs as the README promises."""

from __future__ import annotations

import subprocess
import sys


def test_demo_transcript() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fdchannel", "demo"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "received 3 fds" in out
    assert "read from the file: 'a line written by the parent" in out
    assert "read from the pipe: 'hello through the pipe, from the child'" in out
    assert "the child answered 'HELLO OVER TCP'" in out
    assert "child exited with status 0" in out


def test_usage() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fdchannel"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert "usage" in proc.stderr
