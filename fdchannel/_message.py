"""`Message`: what one ``recv()`` returns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

import attrs

from ._ownedfd import OwnedFd

if TYPE_CHECKING:
    from ._shared import SealedMemory

__all__ = ["Message"]


@attrs.define(eq=False, slots=True)
class Message:
    """A payload and the fds that were sent with it, in the order sent.

    The message owns nothing itself: each `OwnedFd` in `fds` owns its fd.
    Leaving ``with msg:`` (or calling `close`) closes every fd that was not
    taken (detached, converted or closed) by then.

    Attributes:
        payload: The bytes sent; a payload too large for the channel's read
            buffer is received in place into a `bytearray` (no copy) and
            handed over as is.  A payload the peer sent as sealed shared
            memory (`fdchannel.shm`) is a read-only `memoryview` of it,
            mapped on first access; `shared` then holds the memory itself.
        fds: The fds sent with it, in the order sent, each an `OwnedFd`.
    """

    payload: bytes | bytearray
    fds: tuple[OwnedFd, ...] = ()

    @property
    def shared(self) -> SealedMemory | None:
        """The `fdchannel.shm.SealedMemory` the payload came in, or None for in-band bytes."""
        return None

    def close(self) -> None:
        """Close every fd of this message still owned here.  Idempotent."""
        errors: list[OSError] = []
        for fd in self.fds:
            try:
                fd.close()
            except OSError as exc:  # keep closing the rest
                errors.append(exc)
        if errors:
            raise errors[0]

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Message cannot be pickled: its fds mean nothing in another process.  Send it over a "
            "Channel instead (channel.send(msg.payload, msg.fds))"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
