"""Event loops for the asyncio tests: the default loop and uvloop.

Plain pytest, no plugin: the `run` fixture runs a coroutine to completion on
a fresh loop of the parametrized kind inside ``asyncio.timeout``, so every
``await`` of a test is bounded even when the test itself forgets to be.
uvloop is skipped only when it cannot be imported.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None

T = TypeVar("T")
#: Upper bound of one test's whole coroutine.
TIMEOUT = 30.0

Runner = Callable[..., Any]

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": None if uvloop is None else uvloop.new_event_loop,
}
if sys.platform == "win32":
    # The default loop there is the ProactorEventLoop ("asyncio"), which has
    # no add_reader; the selector loop is the other one Windows users pick.
    # uvloop does not exist for Windows: not a skip, not a loop kind there.
    del LOOP_FACTORIES["uvloop"]
    LOOP_FACTORIES["selector"] = asyncio.SelectorEventLoop

if uvloop is not None:
    # libuv opens a process-wide pipe (its signal wake-up) the first time a
    # loop is made and keeps it for the life of the process; open it now,
    # outside any test, so the fd-leak check sees only what tests leave.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as _warm_up:
        _warm_up.run(asyncio.sleep(0))

LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "uvloop", id="uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop cannot be imported")
    ),
]
if sys.platform == "win32":
    # uvloop does not exist for Windows at all: run the selector loop instead.
    LOOPS[1] = pytest.param("selector", id="selector")


def run_on(kind: str, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
    """Run *coro* on a new loop of *kind*, bounded by *timeout* seconds."""
    factory = LOOP_FACTORIES[kind]
    assert factory is not None

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """``"asyncio"`` or ``"uvloop"``."""
    kind: str = request.param
    return kind


@pytest.fixture
def run(loop_kind: str) -> Callable[..., Any]:
    """``run(coro, timeout=30)``: run *coro* on the parametrized loop kind."""

    def runner(coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return run_on(loop_kind, coro, timeout)

    return runner


async def cancel_after(
    task: asyncio.Task[T], iterations: int
) -> tuple[asyncio.CancelledError | None, T | None]:
    """Let the loop run *iterations* times, then cancel *task*.

    Returns ``(exc, None)`` with the task's own ``CancelledError`` if the
    cancellation took (later ``task.result()`` calls make fresh ones without
    its attributes), or ``(None, result)`` if the task had finished first.
    """
    for _ in range(iterations):
        await asyncio.sleep(0)
    task.cancel()
    try:
        return None, await task
    except asyncio.CancelledError as exc:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we were cancelled ourselves (the test's timeout)
        return exc, None
