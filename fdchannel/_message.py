"""`Message`: what one ``recv()`` returns."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any, Final, Self

from ._fdutil import close_all, close_listed, closing
from ._ownedfd import OwnedFd

if TYPE_CHECKING:
    from ._shared import SealedMemory

__all__ = ["Message"]


_new = object.__new__

#: What `Message.fds` shows for a number closed before anyone read it: an
#: OwnedFd that owns nothing (every method but close raises, close does
#: nothing), so one object serves them all.
CLOSED_FD: Final = OwnedFd(-1)


class Message:
    """A payload and the fds that were sent with it, in the order sent.

    The fds are the message's until taken: `fds` hands them out as
    `OwnedFd` objects (each then owns its fd), and leaving ``with msg:`` (or
    calling `close`) closes every fd that was not taken (detached, converted
    or closed) by then.  A received message keeps its fds as plain numbers
    and makes the `OwnedFd` objects only when `fds` is first read, so a
    message that is closed without looking at them costs no object per fd.
    A message garbage-collected with fds nobody took closes them and emits
    `ResourceWarning`, as an `OwnedFd` does.

    Attributes:
        payload: The bytes sent; a payload too large for the channel's read
            buffer is received in place into a `bytearray` (no copy) and
            handed over as is.  A payload the peer sent as sealed shared
            memory (`fdchannel.shm`) is a read-only `memoryview` of it,
            mapped on first access; `shared` then holds the memory itself.
        fds: The fds sent with it, in the order sent, each an `OwnedFd`.
    """

    __slots__ = ("__weakref__", "_fds", "_raw", "payload")

    payload: bytes | bytearray
    _fds: tuple[OwnedFd, ...]
    #: fd numbers owned by the message and not yet wrapped (received messages only).
    _raw: Sequence[int]

    def __init__(self, payload: bytes | bytearray, fds: tuple[OwnedFd, ...] = ()) -> None:
        """A message of *payload* and *fds* (`OwnedFd` objects, which keep owning their fds)."""
        self.payload = payload
        self._fds = fds
        self._raw = ()

    @classmethod
    def _owning(cls, payload: bytes | bytearray | memoryview, raw: Sequence[int]) -> Message:
        """A message that owns the fd numbers *raw* (the caller gives them up)."""
        msg = cls.__new__(cls)
        # A memoryview only for recv_into(), which hands out the count instead.
        msg.payload = payload  # type: ignore[assignment]
        msg._fds = ()
        msg._raw = raw
        return msg

    @property
    def fds(self) -> tuple[OwnedFd, ...]:
        """The fds, in the order sent: a tuple of `OwnedFd` (each owns its fd until taken)."""
        raw = self._raw
        if raw:
            self._own_raw(raw)
        return self._fds

    @fds.setter
    def fds(self, fds: tuple[OwnedFd, ...]) -> None:
        self.fds  # noqa: B018 - the numbers held so far become objects, as if read before
        self._fds = fds

    def _own_raw(self, raw: Sequence[int]) -> None:
        """Move each number of *raw* into an `OwnedFd` of its own, in `_fds`.

        Each number moves in two stores with no point between them where
        CPython runs a signal handler (or another thread), and the objects
        are in `_fds` before any moves: cut short anywhere (a handler's
        error, out of memory), every number is either still in ``_raw`` or
        in one of those objects, never both, `close` closes both kinds, and
        reading `fds` again carries on where the move stopped.
        """
        if raw.__class__ is not list:
            slots = list(raw)  # (a tuple from the compiled path) slots to strike
            if self._raw is raw:  # (no point between this test and the store)
                self._raw = slots
        # A list now (another thread's, if it got here first).  Typed by
        # annotation: typing.cast would be a call on every message.
        listed: list[int] = self._raw  # type: ignore[assignment]
        count = len(listed)
        if not self._fds:
            # Each owning nothing yet (made without __init__, which costs a
            # Python call per fd); cut short here, they are simply dropped.
            made = tuple(map(_new, repeat(OwnedFd, count)))
            for owner in made:
                owner._fd = -1
            if not self._fds and self._raw is listed:  # (no point between the tests and the store)
                self._fds = made
        owners = self._fds
        i = 0
        while i < count:
            # Each step tests that no close() (another thread's) took the
            # numbers meanwhile, then moves one: no point in between.  Once
            # close() has, its placeholders must never receive a number.
            if self._raw is not listed:
                return
            n = listed[i]
            if n.__class__ is not int or n >= 0:  # -1: moved already, or taken out (`adopt_all`)
                owners[i]._fd = n
                listed[i] = -1
            i += 1
        if self._raw is listed:
            self._raw = ()

    @property
    def shared(self) -> SealedMemory | None:
        """The `fdchannel.shm.SealedMemory` the payload came in, or None for in-band bytes."""
        return None

    def close(self) -> None:  # noqa: C901 - the one-fd close inline
        """Close every fd of this message still owned here.  Idempotent.

        Closes them all even when one fails, then raises the first `OSError`.
        """
        first: OSError | None = None
        raw = self._raw
        if raw:
            if raw.__class__ is not list:
                slots = list(raw)  # (a tuple from the compiled path) slots to strike
                if self._raw is raw:  # (no point between this test and the store)
                    self._raw = slots
                raw = self._raw
            listed: list[int] = raw  # type: ignore[assignment]  # a list now (not typing.cast: a call)
            n = listed[0]
            if len(listed) == 1 and n.__class__ is int and n >= 0:
                # Most messages' one fd: close_listed's strike and close
                # inline (a call less), no point between the two either.
                listed[0] = -1
                try:
                    os.close(n)
                except OSError as exc:
                    first = exc
            else:
                first = close_listed(listed, empty=False)
            count = len(raw)
            # Read afterwards, fds shows closed OwnedFd objects, as if they had
            # been there all along; out of memory, closing matters more.
            try:
                shown: tuple[OwnedFd, ...] = (CLOSED_FD,) * count
            except MemoryError:
                shown = ()
            owners = self._fds  # a move into them cut short left numbers in some
            if self._raw is raw:  # (no point between this test and the stores)
                self._fds = shown
                self._raw = ()
        else:
            owners = self._fds
        for fd in owners:
            try:
                fd.close()
            except OSError as exc:  # keep closing the rest
                first = first or exc
        if first is not None:
            raise first

    def __repr__(self) -> str:
        raw = self._raw
        fds = tuple(f"<OwnedFd fd={n}>" for n in raw) if raw else tuple(map(repr, self._fds))
        return f"Message(payload={self.payload!r}, fds=({', '.join(fds)}{',' if len(fds) == 1 else ''}))"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Message cannot be pickled: its fds mean nothing in another process.  Send it over a "
            "Channel instead (channel.send(msg.payload, msg.fds))"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            raw = self._raw
        except AttributeError:  # never initialised
            return
        if raw:
            # Close them all first (with -W error::ResourceWarning the warning
            # raises), from a list that _fdutil.closing holds meanwhile (by
            # this message): no object owns them once _raw is empty, and a
            # close can block while another thread forks.  Nothing up to the
            # store into _raw is a call, so no signal handler runs in between.
            fds: list[Any] | None = None
            try:
                listed = [*raw]
                closing[self] = listed
                fds = listed
            except MemoryError:
                pass
            self._raw = ()
            try:
                if fds is not None:
                    close_listed(fds, empty=False)  # (errors ignored, as below)
                else:
                    close_all(raw)  # out of memory: allocating nothing (-1, taken out by `adopt_all`: EBADF)
            except BaseException:
                if fds is not None:
                    close_listed(fds, empty=False)  # a signal handler's error cut the first short
                raise
            finally:
                closing.pop(self, None)
                for n in raw:
                    if n.__class__ is not int or n >= 0:
                        warnings.warn(f"unclosed <OwnedFd fd={n}>", ResourceWarning, 2, source=self)
