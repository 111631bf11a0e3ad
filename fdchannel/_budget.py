"""`Budget`: what a group of channels (a server's connections) may hold together for their peers.

A channel holds fds and memory on its peer's behalf from the read that
brings them until `recv` returns the message they belong to.  Each
channel's own limits bound one peer; a budget bounds all of a server's
peers together, so that connections that park fds or buffers cannot fill
the process's fd table or its memory.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from typing import Any, Protocol

import attrs

from ._errors import LimitExceeded

__all__ = ["Budget", "default_fd_budget"]

#: The default memory budget of a server: eight maximal (64 MiB) payloads in
#: flight at once.
DEFAULT_MEMORY: int = 512 * 1024 * 1024


def default_fd_budget() -> int:
    """Half the soft ``RLIMIT_NOFILE`` (at least 64): the default fd budget of a server.

    The other half stays for the connections the server accepts, for what
    it does with the messages it receives and for its own files.
    """
    if sys.platform == "win32":
        return 4096  # no fd table to fill: handles are bounded by memory
    import resource  # POSIX only

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(64, soft // 2)


class Holder(Protocol):
    """What a budget charges (a channel's decoder)."""

    def evict(self, exc: LimitExceeded) -> None:
        """Give up everything held, failing the channel with *exc* (any thread may call it)."""


def _non_negative(_instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"Budget {attribute.name} must not be negative, got {value}")


@attrs.define(eq=False, repr=False)
class Budget:
    """A shared bound on the fds and memory that channels hold for messages not yet returned by ``recv()``.

    Pass one to any channel's constructor (``budget=``); `fdchannel.Listener`,
    `fdchannel.aio.start_server` and the trio/anyio ``serve`` make one per
    server by default and give it to every channel they accept.  Every
    channel given the same budget is charged for:

    - the fds it holds for its peer: those that arrived for a message not
      yet complete (sent ahead of the rest of it) and those of complete
      messages `recv` has not returned yet, and
    - the payload buffer of a large message not yet complete.

    What `recv` has returned is the caller's and no longer charged.

    When a read takes the total over a limit, the channels that have held
    something the longest give it up first, until the total is within the
    limit again: each fails with `LimitExceeded` and its fds are closed
    (at once, or as soon as its `recv` in progress wakes).  If the channel
    that read is itself the oldest holder left, its `recv` raises the
    error.  A message that arrives whole in one read is never held, and a
    large one is held only while it arrives, so peers that park fds or
    buffers go first and the others are served.  A message that alone
    needs more than the budget fails on any server that uses it.

    Safe to share between threads and between servers of one process; it
    means nothing in another process (it is not pickled with a channel).

    Attributes:
        fds: The most fds the channels may hold together (``None``: no
            bound).  Default: `default_fd_budget()`, half the soft
            ``RLIMIT_NOFILE``.
        memory: The most bytes of payload buffers they may hold together
            (``None``: no bound).  Default: 512 MiB.
        refused: How many channels this budget failed.
    """

    fds: int | None = attrs.field(factory=default_fd_budget, validator=_non_negative)
    memory: int | None = attrs.field(default=DEFAULT_MEMORY, validator=_non_negative)
    refused: int = attrs.field(default=0, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _held_fds: int = attrs.field(default=0, init=False)
    _held_memory: int = attrs.field(default=0, init=False)
    # Per holder: [fds, bytes, since (time.monotonic() when it began to
    # hold), evicting (asked to give up, not yet done)].
    _holders: dict[Holder, list[Any]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        _budgets.add(self)

    @property
    def held_fds(self) -> int:
        """The fds the channels of this budget hold now."""
        return self._held_fds

    @property
    def held_memory(self) -> int:
        """The bytes of payload buffers they hold now."""
        return self._held_memory

    @property
    def holders(self) -> int:
        """How many channels hold something now."""
        return len(self._holders)

    def __repr__(self) -> str:
        return (
            f"Budget(fds={self.fds}, memory={self.memory}, held_fds={self._held_fds}, "
            f"held_memory={self._held_memory}, holders={len(self._holders)}, refused={self.refused})"
        )

    def charge(self, holder: Holder, fds: int, memory: int, *, check: bool = True) -> None:
        """Record that *holder* now holds *fds* and *memory* bytes (replacing what it held before).

        With *check*, when its holding grew and the total went over a limit,
        the oldest holders are evicted until it is within; raises
        `LimitExceeded` if *holder* is one of them (its charge stands until
        it gives the fds up, which charges zero).
        """
        with self._lock:
            entry = self._holders.pop(holder, None)
            old_fds, old_memory = (entry[0], entry[1]) if entry is not None else (0, 0)
            self._held_fds += fds - old_fds
            self._held_memory += memory - old_memory
            if fds or memory:
                if entry is None:
                    entry = [fds, memory, time.monotonic(), False]
                else:
                    entry[0], entry[1] = fds, memory
                self._holders[holder] = entry
            if not check or (fds <= old_fds and memory <= old_memory):
                return
            victims, mine = self._choose(holder)
            self.refused += len(victims) + (mine is not None)
        for victim, exc in victims:
            try:
                victim.evict(exc)
            except Exception:
                pass
        if mine is not None:
            raise mine

    def _choose(self, holder: Holder) -> tuple[list[tuple[Holder, LimitExceeded]], LimitExceeded | None]:
        """The holders to evict, oldest first, until the total is within the limits (the lock is held)."""
        fds = sum(e[0] for e in self._holders.values() if not e[3])
        memory = sum(e[1] for e in self._holders.values() if not e[3])
        if not self._over(fds, memory):
            return [], None
        victims: list[tuple[Holder, LimitExceeded]] = []
        for h, entry in sorted(self._holders.items(), key=lambda item: item[1][2]):
            fds_over = self.fds is not None and fds > self.fds
            if entry[3] or not entry[0 if fds_over else 1]:
                continue  # already going, or holding nothing of what is over
            exc = LimitExceeded(self._why(fds, memory, entry))
            if h is holder:
                return victims, exc
            entry[3] = True
            victims.append((h, exc))
            fds -= entry[0]
            memory -= entry[1]
            if not self._over(fds, memory):
                break
        return victims, None

    def _over(self, fds: int, memory: int) -> bool:
        return (self.fds is not None and fds > self.fds) or (self.memory is not None and memory > self.memory)

    def _why(self, fds: int, memory: int, entry: list[Any]) -> str:
        held = time.monotonic() - entry[2]
        if self.fds is not None and fds > self.fds:
            what = f"{fds} fds, over their budget of {self.fds}; this one held {entry[0]}"
        else:
            what = f"{memory} bytes, over their budget of {self.memory}; this one held {entry[1]}"
        return (
            f"the channels sharing this Budget held {what}, for {held:.3f} s, the longest of them: "
            "it gives them up (a message that alone needs more than the budget never fits)"
        )

    def _after_fork(self) -> None:
        if self._lock.locked():
            self._lock = threading.Lock()


#: Every Budget of this process, for `_after_fork_in_child`.
_budgets: weakref.WeakSet[Budget] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A thread of the parent inside charge() at the fork would leave the
    # lock held for good: the child's first charge would wait for ever.
    for budget in list(_budgets):
        budget._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
