"""Out of memory at every allocation of a call: nothing leaks, nothing is closed twice, no silent gap.

Each case runs `tests/_faults.py` in a child: it fails allocation k of one
call for every k in turn (CPython's own fault injection,
``_testcapi.set_nomemory``), then checks the rules listed there.  *width*
3 fails the two allocations after k as well, so that the clean-up after the
first failure runs out of memory too.  Every allocation the call makes is
reached: the last k that fails is well below the last k tried (and the
counts are the same with five times as many k).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fdchannel import _fastpath

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the harness reads /proc/self/fd")
if sys.platform == "linux":
    pytest.importorskip("_testcapi", reason="CPython's fault injection (_testcapi) is not installed")

HELPER = Path(__file__).with_name("_faults.py")
ALLOCATIONS = 130  # more than any of these calls makes (measured: the last to fail is k=95)

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


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_failing_allocation_keeps_the_rules(path: str, scenario: str, width: int) -> None:
    out = subprocess.run(
        [sys.executable, str(HELPER), path, scenario, str(ALLOCATIONS), str(width)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["broken"] == []
    assert result["failed"] + result["succeeded"] == ALLOCATIONS
    assert result["last_failed"] < ALLOCATIONS - 30  # the call's allocations all reached
    if scenario.startswith("close"):
        assert result["failed"] == 0  # closing a message allocates nothing: it works out of memory
    else:
        assert result["failed"] > 0  # the injection reached the call
