"""A signal handler's error at every point where CPython runs one: no leak, no double close, no gap.

Each case runs `tests/_faults.py` in its ``signals`` mode in a child: a
tracer raises KeyboardInterrupt at the k-th point where CPython 3.11 runs
signal handlers (a Python function's first instruction, a loop's jump
back, the end of a call to a C function), for every k in turn, then checks
the same rules as `test_out_of_memory`, and that a failed send's exception
never hides a message that left (a caller's retry would duplicate it).
`tests/_faults.py` names the two places it leaves out, which no Python code
can guard (a finalizer's first instruction; the end of the C call that
returns a new memfd).

The second test adds a second handler's error at the next point after the
first, as in a storm of signals while the first is being handled: what the
first call had in hand must still be recorded (a frame taken, fds read, a
message returned), so the code that records it must call nothing first.

The third raises a TimeoutError instead, as a ``SIGALRM`` handler does: an
`OSError` like the kernel's own, which the channel must not take for the
system call's answer (a review found the trio and anyio channels dropping
a message in silence, and a memfd refused, that way).
"""

from __future__ import annotations

import sys

import pytest

from ._fault_cases import PATHS, SCENARIOS, STRUCTURED, sweep

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or sys.version_info[:2] != (3, 11),
    reason="the harness reads /proc/self/fd and models CPython 3.11's handler points",
)

POINTS = 130  # more than any of these calls passes (measured: the last to strike is k=80)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_handler_raising_at_every_point_keeps_the_rules(path: str, scenario: str) -> None:
    sweep(path, scenario, POINTS, 1, "signals")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_second_handler_raising_as_the_first_is_handled_keeps_the_rules(path: str, scenario: str) -> None:
    sweep(path, scenario, POINTS, 2, "signals")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_handlers_timeout_at_every_point_keeps_the_rules(path: str, scenario: str) -> None:
    sweep(path, scenario, POINTS, 1, "alarms")


@pytest.mark.parametrize("mode", ["signals", "alarms"])
@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", STRUCTURED)
def test_the_structured_channels_keep_the_rules_at_every_point(
    path: str, scenario: str, width: int, mode: str
) -> None:
    """The trio and anyio channels, struck in this package's frames (their libraries' own are theirs)."""
    pytest.importorskip(scenario.split("_", maxsplit=1)[0])
    sweep(path, scenario, POINTS, width, mode)


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("scenario", ["close", "close_one", "close_many"])
def test_python_message_close_keeps_the_rules_where_nothing_is_compiled(scenario: str, width: int) -> None:
    """Off Linux (or unbuilt) Message.close is Python: a handler's error in its loop leaves
    each number listed (a second close closes it) or closed."""
    sweep("pure", scenario, POINTS, width, "signals", pure_only=True)
