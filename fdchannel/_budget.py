"""`Budget`: what a group of channels (a server's connections) may hold together for unfinished messages.

A channel holds fds and memory on its peer's behalf between the read that
brought the first bytes of a message and the read that completes it.  Each
channel's own limits bound one peer; a budget bounds all of a server's peers
together, so that a few connections cannot fill the process's fd table or
its memory by starting messages and never finishing them.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import attrs

from ._errors import LimitExceeded

__all__ = ["Budget", "default_fd_budget"]

#: The default memory budget of a server: eight maximal (64 MiB) payloads in
#: flight at once.
DEFAULT_MEMORY: int = 512 * 1024 * 1024


def default_fd_budget() -> int:
    """A quarter of the soft ``RLIMIT_NOFILE`` (at least 64): the default fd budget of a server.

    The other three quarters stay for what the server does with the
    messages it receives, for the connections it accepts and for its own
    files.
    """
    if sys.platform == "win32":
        return 4096  # Windows has no fd table to fill: handles are bounded by memory
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(64, soft // 4)


def _non_negative(_instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"Budget {attribute.name} must not be negative, got {value}")


@attrs.define(eq=False, repr=False)
class Budget:
    """A shared bound on the fds and memory that channels hold for messages not yet complete.

    Pass one to `fdchannel.Listener`, `fdchannel.aio.start_server` or the
    trio/anyio ``serve`` (each makes one of its own by default) or to any
    channel's constructor (``budget=``).  Every channel given the same
    budget is charged for:

    - the fds that arrived for a message not yet complete (fds the peer sent
      ahead of the rest of its message), and
    - the payload buffer of a large message not yet complete.

    What `recv` has returned is the caller's and no longer charged.

    When a read takes the total over a limit, the channel that read fails
    with `LimitExceeded` (its fds are closed and its charge returned) if it
    holds more than its fair share, the limit divided by the number of
    channels holding something; a channel within its share goes on, so a
    peer that parks fds on a few connections cannot make the server refuse
    everybody else.  The total therefore stays below about twice the limit
    plus one read's worth (253 fds).  Time bounds it too: a server's
    channels also have a ``frame_timeout``.

    Safe to share between threads and between servers of one process; it
    means nothing in another process (it is not pickled with a channel).

    Attributes:
        fds: The most fds the channels may hold together (``None``: no
            bound).  Default: `default_fd_budget()`, a quarter of the soft
            ``RLIMIT_NOFILE``.
        memory: The most bytes of payload buffers they may hold together
            (``None``: no bound).  Default: 512 MiB.
        refused: How many reads this budget refused (each failed its
            channel with `LimitExceeded`).
    """

    fds: int | None = attrs.field(factory=default_fd_budget, validator=_non_negative)
    memory: int | None = attrs.field(default=DEFAULT_MEMORY, validator=_non_negative)
    refused: int = attrs.field(default=0, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _held_fds: int = attrs.field(default=0, init=False)
    _held_memory: int = attrs.field(default=0, init=False)
    # What each holder (a channel's decoder) was last charged: (fds, bytes).
    _holders: dict[object, tuple[int, int]] = attrs.field(factory=dict, init=False)

    @property
    def held_fds(self) -> int:
        """The fds the channels of this budget hold now for unfinished messages."""
        return self._held_fds

    @property
    def held_memory(self) -> int:
        """The bytes of payload buffers they hold now for unfinished messages."""
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

    def charge(self, holder: object, fds: int, memory: int, *, check: bool = True) -> None:
        """Record that *holder* now holds *fds* and *memory* bytes (replacing what it held before).

        Raises `LimitExceeded` when *check* is true, the holder's share grew,
        the total is over a limit and the holder holds more than its fair
        share; the charge stands all the same (the fds are held until the
        caller closes them, and that charges zero).
        """
        with self._lock:
            old_fds, old_memory = self._holders.pop(holder, (0, 0))
            self._held_fds += fds - old_fds
            self._held_memory += memory - old_memory
            if fds or memory:
                self._holders[holder] = (fds, memory)
            if not check or (fds <= old_fds and memory <= old_memory):
                return
            why = self._over(fds, memory)
            if why is None:
                return
            self.refused += 1
        raise LimitExceeded(why)

    def _over(self, fds: int, memory: int) -> str | None:
        """Why a holder with *fds* and *memory* must stop, or None (the lock is held)."""
        holders = max(1, len(self._holders))
        if self.fds is not None and self._held_fds > self.fds and fds > self.fds // holders:
            return (
                f"the server's channels hold {self._held_fds} fds for unfinished messages, over "
                f"their budget of {self.fds}, and this one held {fds}, more than its share "
                f"({self.fds // holders} among {holders})"
            )
        if self.memory is not None and self._held_memory > self.memory and memory > self.memory // holders:
            return (
                f"the server's channels hold {self._held_memory} bytes for unfinished messages, "
                f"over their budget of {self.memory}, and this one held {memory}, more than its "
                f"share ({self.memory // holders} among {holders})"
            )
        return None
