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

import sys

import pytest

from ._fault_cases import PATHS, SCENARIOS, sweep

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the harness reads /proc/self/fd")
if sys.platform == "linux":
    pytest.importorskip("_testcapi", reason="CPython's fault injection (_testcapi) is not installed")

ALLOCATIONS = 130  # more than any of these calls makes (measured: the last to fail is k=95)


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_failing_allocation_keeps_the_rules(path: str, scenario: str, width: int) -> None:
    sweep(path, scenario, ALLOCATIONS, width, "memory")
