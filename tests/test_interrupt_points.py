"""A signal handler's error at every point where CPython runs one: no leak, no double close, no gap.

Each case runs `tests/_faults.py` in its ``signals`` mode in a child: a
tracer raises KeyboardInterrupt at the k-th point where CPython 3.11 runs
signal handlers (a Python function's first instruction, a loop's jump
back, the end of a call to a C function), for every k in turn, then checks
the same rules as `test_out_of_memory`.  `tests/_faults.py` names the two
places it leaves out, which no Python code can guard (a finalizer's first
instruction; the end of the C call that returns a new memfd).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fdchannel import _fastpath

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or sys.version_info[:2] != (3, 11),
    reason="the harness reads /proc/self/fd and models CPython 3.11's handler points",
)

HELPER = Path(__file__).with_name("_faults.py")
POINTS = 130  # more than any of these calls passes (measured: the last to strike is k=80)

PATHS = [
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(
            not _fastpath.compiled_available(), reason=f"not built here: {_fastpath.why_pure()}"
        ),
    ),
    "pure",
]
SCENARIOS = [
    "recv",
    "recv_group",
    "recv_big",
    "recv_into",
    "recv_shm",
    "send",
    "send_many",
    "send_shm",
    "aio_recv",
    "aio_send",
    "fds",
    "close",
    "close_many",
    "open",
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_handler_raising_at_every_point_keeps_the_rules(path: str, scenario: str) -> None:
    out = subprocess.run(
        [sys.executable, str(HELPER), path, scenario, str(POINTS), "1", "signals"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["broken"] == []
    assert result["failed"] + result["succeeded"] == POINTS
    assert result["last_failed"] < POINTS - 30  # every point of the call reached
    if scenario.startswith("close"):
        assert result["failed"] == 0  # closing a message runs no point where a handler could strike
    else:
        assert result["failed"] > 0
