"""Taking a channel's lock (or an async channel's gate) without waiting, so that a
signal handler's error at any point leaves it taken and released once, or not taken.

A blocking `fdchannel.Channel` guards each direction with a `threading.Lock`,
the async channels with a gate (``try_enter``, ``leave``).  CPython runs
signal handlers at a Python function's first instruction, at a loop's jump
back and at the end of each call to a C function, and a handler's error
raises there.  So a lock taken by a Python helper (``return
lock.acquire(False)``) can be taken with nobody told, when the error strikes
at the end of ``acquire``; and a lock released by a helper is left taken
when it strikes at the helper's first instruction.  Here the result of each
take is stored by C code (``list.extend`` over ``map``) and the release
runs inline, a lock's with no point between the mark and the release, a
gate's run again until it completes (a gate's ``leave`` finishes a cut-short
hand-over when run again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol, TypeAlias

__all__ = ["Guard", "let_go", "run_held", "take"]


class Lock(Protocol):
    """A blocking channel's lock (a `threading.Lock`, or a test's wrapper of one)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


class Gate(Protocol):
    """An async channel's gate, as the core uses it (`fdchannel.aio`, `fdchannel._structured`)."""

    def try_enter(self) -> bool: ...

    def leave(self) -> None: ...


#: What guards one direction of a channel.
Guard: TypeAlias = Lock | Gate

_NOW: Final = (False,)
#: How many times `run_held` runs a gate's cut-short release again at most:
#: each run is one more signal handler's error (or a failure that would repeat).
_RUNS: Final = 8


def _split(guard: Guard) -> tuple[Lock | None, Gate | None]:
    if hasattr(guard, "try_enter"):
        gate: Gate = guard  # type: ignore[assignment]  # (not typing.cast: a call)
        return None, gate
    return guard, None


def _take(lock: Lock | None, gate: Gate | None, held: list[bool]) -> bool:
    if lock is not None:
        held.extend(map(lock.acquire, _NOW))
    elif gate is not None:
        held.extend(map(type(gate).try_enter, (gate,)))
    return held[-1]


def take(guard: Guard, held: list[bool]) -> bool:
    """Take *guard* if it is free at once; whether it was is appended to *held* by the call that tried.

    A handler's error at any point here leaves *held* saying the truth:
    nothing appended (nothing taken), or the result.
    """
    lock, gate = _split(guard)
    return _take(lock, gate, held)


def let_go(guard: Guard, held: list[bool], i: int) -> None:
    """Release *guard* if ``held[i]`` says it is taken, and mark it released.

    For a caller that runs it again when it was cut short: a lock is marked,
    then released by one C call (no point between them); a gate is left,
    then marked (cut short, it is still marked held, and ``leave`` finishes
    the hand-over when run again).
    """
    if len(held) > i and held[i]:
        lock, gate = _split(guard)
        if lock is not None:
            held[i] = False
            lock.release()
        elif gate is not None:
            gate.leave()
            held[i] = False  # (no point between a Python call's return and this store)


def run_held(guard: Guard, body: Callable[[], object]) -> bool:
    """Run *body* holding *guard*, if it is free at once: whether it was.

    *guard* is released on every path, however *body* ends, and exactly once
    whatever a signal handler raises meanwhile (the error of the last one
    raised as the release is finished is what propagates), up to a storm of
    `_RUNS` handlers' errors cutting a gate's release short (or one at the
    retry loop's jump back, after two): a gate is then left taken.
    """
    lock, gate = _split(guard)
    held: list[bool] = []
    try:
        _take(lock, gate, held)
        if held[0]:
            body()
        return held[0]
    finally:
        if held and held[0]:
            if lock is not None:
                held[0] = False
                lock.release()
            elif gate is not None:
                try:
                    gate.leave()
                except BaseException as exc:
                    last = exc
                    for _ in range(_RUNS):
                        try:
                            gate.leave()  # finishes what the cut-short run began
                            break
                        except BaseException as again:  # a storm of signals: the last error is raised
                            last = again
                    raise last  # noqa: B904 - the last handler's error (the first is its context)
