"""The structured-concurrency kinds for the async tests: trio and anyio's two backends.

A *kind* names a channel class and what runs it:

* ``"trio"``: `fdchannel.trio.TrioChannel` under ``trio.run``;
* ``"anyio-asyncio"``, ``"anyio-uvloop"`` and ``"anyio-trio"``:
  `fdchannel.anyio.AnyioChannel` under ``anyio.run`` on each backend (the
  asyncio one also with ``use_uvloop``).

`run_kind` runs an async function to completion bounded by ``fail_after``;
the tests written here use anyio's primitives (task groups, cancel scopes,
memory streams), which on the trio backend are trio's own, so the
``"trio"`` kind exercises `TrioChannel` under trio's cancellation.
`PortalThread` runs a kind in a thread for `tests/_async_view.py`.

A kind is skipped (with the reason) only where trio, anyio (or uvloop)
cannot be imported: the Windows suite under Wine installs none of them (its
pinned wheels, scripts/win-requirements.txt, do not include them).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

# Imported for its uvloop warm-up: libuv's process-wide pipe opens at import,
# outside any test, so the leak check of the first anyio-uvloop test sees only
# what the test leaves.
from . import _aio  # noqa: F401

try:
    import trio
except ImportError:  # pragma: no cover - trio is in the test extra
    trio = None
try:
    import anyio
    import anyio.from_thread
    import anyio.lowlevel
except ImportError:  # pragma: no cover - anyio is in the test extra
    anyio = None
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra (not on Windows)
    uvloop = None

T = TypeVar("T")
#: Upper bound of one test's whole async function.
TIMEOUT = 30.0

#: kind -> (channel class name, anyio backend, whether on uvloop)
STRUCTURED_KINDS: dict[str, tuple[str, str, bool]] = {
    "trio": ("TrioChannel", "trio", False),
    "anyio-asyncio": ("AnyioChannel", "asyncio", False),
    "anyio-uvloop": ("AnyioChannel", "asyncio", True),
    "anyio-trio": ("AnyioChannel", "trio", False),
}


def missing(kind: str) -> str | None:
    """Why *kind* cannot run here, or None."""
    where = " (the Windows suite under Wine pins no wheels for it)" if sys.platform == "win32" else ""
    if trio is None and STRUCTURED_KINDS[kind][1] == "trio":
        return f"trio cannot be imported{where}"
    if anyio is None:
        # The tests drive every kind with anyio's primitives.
        return f"anyio cannot be imported{where}"
    if uvloop is None and STRUCTURED_KINDS[kind][2]:
        return "uvloop cannot be imported" + (" (it does not exist for Windows)" if where else "")
    return None


def kind_marks(kind: str) -> list[Any]:
    reason = missing(kind)
    return [] if reason is None else [pytest.mark.skip(reason=reason)]


def kind_params() -> list[Any]:
    """pytest params, one per structured kind, skipped where it cannot run."""
    return [pytest.param(kind, id=kind, marks=kind_marks(kind)) for kind in STRUCTURED_KINDS]


def channel_class(kind: str) -> Any:
    """The channel class of *kind* (imported only when asked for)."""
    if STRUCTURED_KINDS[kind][0] == "TrioChannel":
        from fdchannel.trio import TrioChannel

        return TrioChannel
    from fdchannel.anyio import AnyioChannel

    return AnyioChannel


def backend_of(kind: str) -> str:
    return STRUCTURED_KINDS[kind][1]


def backend_options(kind: str) -> dict[str, Any]:
    return {"use_uvloop": True} if STRUCTURED_KINDS[kind][2] else {}


def run_kind(kind: str, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float = TIMEOUT) -> T:
    """Run ``await fn(*args)`` under *kind*'s library, bounded by *timeout* seconds."""

    async def bounded() -> T:
        with anyio.fail_after(timeout):
            return await fn(*args)

    result: T = anyio.run(bounded, backend=backend_of(kind), backend_options=backend_options(kind))
    return result


@pytest.fixture(params=kind_params())
def sc_kind(request: pytest.FixtureRequest) -> str:
    """``"trio"``, ``"anyio-asyncio"``, ``"anyio-uvloop"`` or ``"anyio-trio"``."""
    kind: str = request.param
    return kind


async def cancel_after(
    op: Callable[[], Awaitable[T]], iterations: int
) -> tuple[BaseException | None, T | None]:
    """Start ``op()`` in a task, let the run go round *iterations* times, then cancel it.

    Returns ``(exc, None)`` with the cancellation exception the operation
    raised (its attributes intact), or ``(None, result)`` if it finished first.
    With 0 iterations the scope is cancelled before the task first runs.
    """
    scope = anyio.CancelScope()
    box: dict[str, Any] = {}

    async def runner() -> None:
        with scope:
            try:
                box["result"] = await op()
            except anyio.get_cancelled_exc_class() as exc:
                box["exc"] = exc
                raise

    async with anyio.create_task_group() as group:
        group.start_soon(runner)
        for _ in range(iterations):
            await anyio.lowlevel.checkpoint()
        scope.cancel()
    if "exc" in box:
        return box["exc"], None
    return None, box["result"]


def written(exc: BaseException) -> int:
    """``characters_written`` of a send's cancellation (none: it took nothing)."""
    return int(getattr(exc, "characters_written", 0))


class PortalThread:
    """A *kind*'s event loop running in a daemon thread until `stop` (for BlockingView).

    Calls from several threads become concurrent tasks in that run; a call
    that times out is cancelled there (``fail_after``) and raises `TimeoutError`.
    """

    def __init__(self, kind: str) -> None:
        self._cm = anyio.from_thread.start_blocking_portal(backend_of(kind), backend_options(kind))
        self._portal = self._cm.__enter__()
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        async def bounded() -> T:
            if timeout is None:
                return await coro
            with anyio.fail_after(timeout):
                return await coro

        try:
            return self._portal.call(bounded)
        except BaseException:
            coro.close()  # never started (the portal refused): no "never awaited" warning
            raise

    def stop(self) -> None:
        self._cm.__exit__(None, None, None)
