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

import sys

import pytest

from ._fault_cases import PATHS, SCENARIOS, sweep

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or sys.version_info[:2] != (3, 11),
    reason="the harness reads /proc/self/fd and models CPython 3.11's handler points",
)

POINTS = 130  # more than any of these calls passes (measured: the last to strike is k=80)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_handler_raising_at_every_point_keeps_the_rules(path: str, scenario: str) -> None:
    sweep(path, scenario, POINTS, 1, "signals")
