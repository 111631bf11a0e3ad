"""`Budget`: what a group of channels (a server's connections) may hold together for their peers.

A channel holds fds and memory on its peer's behalf from the read that
brings them until `recv` returns the message they belong to.  Each
channel's own limits bound one peer; a budget bounds all of a server's
peers together, so that connections that park fds or buffers cannot fill
the process's fd table or its memory.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Literal, Protocol

import attrs

from ._errors import LimitExceeded

__all__ = ["Budget", "default_fd_budget"]

_log = logging.getLogger("fdchannel")

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

    When a read takes the total over a limit, the peer that holds the most
    (channels are grouped by the peer's uid on AF_UNIX, by its host over
    TCP) gives up first, its channel that has held the longest first,
    until the total is within the limit again: each fails with
    `LimitExceeded` and its fds are closed (at once, or as soon as its
    `recv` in progress wakes).  If the channel that read is the one to go,
    its `recv` raises the error.  A message that arrives whole in one read
    is never held, and a large one is held only while it arrives.  A
    message that needs more than its peer's share may be refused while
    other peers hold theirs; one that alone needs more than the budget
    never fits.  While channels asked to give up have not yet, what is
    held stays below twice the limit (a channel that would take more
    fails instead).

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
    # An RLock: the garbage collector may run a channel's finalizer, which
    # charges this budget, while this thread is inside `charge`.
    _lock: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    _held_fds: int = attrs.field(default=0, init=False)
    _held_memory: int = attrs.field(default=0, init=False)
    # Per holder: [fds, bytes, since (time.monotonic() when it began to
    # hold), evicting (asked to give up, not yet done), group (its peer's
    # uid, or the holder itself)].
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

    def charge(
        self, holder: Holder, fds: int, memory: int, *, check: bool | Literal["others"] = True
    ) -> None:
        """Record that *holder* now holds *fds* and *memory* bytes (replacing what it held before).

        When its holding grew and the total went over a limit: with
        *check* true, holders are evicted (see the class) until it is
        within, and `LimitExceeded` is raised if *holder* is the one to go
        (its charge stands until it gives the fds up, which charges zero);
        with ``"others"``, only other holders are evicted; with false,
        nothing is.
        """
        with self._lock:
            entry = self._holders.pop(holder, None)
            old_fds, old_memory = (entry[0], entry[1]) if entry is not None else (0, 0)
            self._held_fds += fds - old_fds
            self._held_memory += memory - old_memory
            if fds or memory:
                if entry is None:
                    group = getattr(holder, "peer_group", None)
                    entry = [fds, memory, time.monotonic(), False, holder if group is None else group]
                else:
                    entry[0], entry[1] = fds, memory
                self._holders[holder] = entry
            if not check or (fds <= old_fds and memory <= old_memory):
                return
            victims, mine = self._choose(holder, may_fail=check is True)
            self.refused += len(victims) + (mine is not None)
        for victim, exc in victims:
            try:
                victim.evict(exc)
            except Exception:
                _log.exception("evicting %r for its Budget failed", victim)
        if mine is not None:
            raise mine

    def _choose(
        self, holder: Holder, *, may_fail: bool
    ) -> tuple[list[tuple[Holder, LimitExceeded]], LimitExceeded | None]:
        """Who gives up what they hold so that the total is within the limits (the lock is held).

        The peer (a user, by its uid) that holds the most goes first, its
        channel that has held the longest first; never more than needed.
        """
        # A snapshot: a finalizer that the garbage collector runs inside this
        # block may charge (less) meanwhile; the lock is an RLock for it.
        live = [(h, e) for h, e in list(self._holders.items()) if not e[3]]
        fds = sum(e[0] for _, e in live)
        memory = sum(e[1] for _, e in live)
        if may_fail and self._over(self._held_fds // 2, self._held_memory // 2):
            # Channels asked to give up have not yet (a task in a busy
            # thread): what is really held stays below twice the limit.
            mine = next(e for h, e in live if h is holder) if any(h is holder for h, _ in live) else None
            if mine is not None:
                return [], LimitExceeded(self._why(self._held_fds, self._held_memory, mine, "twice"))
        victims: list[tuple[Holder, LimitExceeded]] = []
        while self._over(fds, memory):
            which = 0 if self.fds is not None and fds > self.fds else 1
            by_group: dict[object, list[tuple[Holder, list[Any]]]] = {}
            for h, e in live:
                if e[which] and not (h is holder and not may_fail):
                    by_group.setdefault(e[4], []).append((h, e))
            if not by_group:
                break  # only the charger holds, and it may not fail here
            group = max(by_group.values(), key=lambda members: sum(e[which] for _, e in members))
            h, e = min(group, key=lambda member: member[1][2])
            exc = LimitExceeded(self._why(fds, memory, e, "oldest"))
            if h is holder:
                return victims, exc
            e[3] = True
            victims.append((h, exc))
            live = [(x, y) for x, y in live if x is not h]
            fds -= e[0]
            memory -= e[1]
        return victims, None

    def _over(self, fds: int, memory: int) -> bool:
        return (self.fds is not None and fds > self.fds) or (self.memory is not None and memory > self.memory)

    def _why(self, fds: int, memory: int, entry: list[Any], why: str) -> str:
        held = time.monotonic() - entry[2]
        if self.fds is not None and fds > self.fds:
            what = f"{fds} fds, over their budget of {self.fds}; this one held {entry[0]}"
        else:
            what = f"{memory} bytes, over their budget of {self.memory}; this one held {entry[1]}"
        if why == "twice":
            how = "and the channels asked to give theirs up have not yet: this one cannot take more"
        else:
            how = (
                f"for {held:.3f} s, the longest of its peer's, whose channels held the most: it gives "
                "them up (a message that alone needs more than the budget never fits)"
            )
        return f"the channels sharing this Budget held {what}, {how}"

    def _after_fork(self) -> None:
        self._lock = threading.RLock()  # a thread of the parent may have held it


#: Every Budget of this process, for `_after_fork_in_child`.
_budgets: weakref.WeakSet[Budget] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A thread of the parent inside charge() at the fork would leave the
    # lock held for good: the child's first charge would wait for ever.
    for budget in list(_budgets):
        budget._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
