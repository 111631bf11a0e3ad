"""Sealed shared-memory payloads: large messages as a memfd instead of through the socket.

Linux only (memfd_create and file seals); elsewhere `available` is False,
`SealedMemory.copy`/`build` raise `NotImplementedError` and `share_above`
sends in band.

Explicit::

    with SealedMemory.copy(data) as mem:   # a copy in a new memfd, sealed
        channel.send(mem, fds)             # the memfd rides as the last fd

Automatic, on the sending end::

    share_above(channel, 1 << 20)          # payloads over 1 MiB go as memfds

Either way the receiver's ``recv()`` checks the memfd (a memfd, sealed
against shrinking, growing and writing, seals sealed, the declared size)
before handing the message out, and raises `SharedMemoryRefused` (every fd
closed, the channel still usable) otherwise.  ``msg.payload`` is then a
read-only memoryview, mapped on first access; ``msg.shared`` is the
`SealedMemory`, which ``other.send(msg.shared)`` forwards without mapping.
See docs/shared-memory.md.
"""

from __future__ import annotations

from ._core import ChannelCore
from ._errors import SharedMemoryRefused
from ._shared import SealedMemory, SharedMessage, available

__all__ = ["SealedMemory", "SharedMemoryRefused", "SharedMessage", "available", "share_above"]


def share_above(channel: ChannelCore, threshold: int | None) -> None:
    """Send every payload over *threshold* bytes on *channel* as sealed shared memory.

    Applies to *channel* (a `fdchannel.Channel` or `fdchannel.aio.AsyncChannel`;
    `AsyncChannel.from_channel` keeps it, a channel rebuilt in another process
    does not).  Each such send copies the payload into a new memfd, seals it,
    sends it and closes the sender's fd when ``send()`` returns.  Where sealed
    memory does not exist the payload goes in band as before (and
    ``max_payload`` applies to it).  ``None`` turns it off.  The receiver needs
    no setting: it reads ``msg.payload`` as usual (a read-only memoryview then).
    Raises `ValueError` for a negative threshold, `TypeError` for a non-channel.
    """
    if not isinstance(channel, ChannelCore):
        raise TypeError(f"share_above() takes a Channel or AsyncChannel, not {type(channel).__name__}")
    if threshold is not None and (threshold.__class__ is bool or threshold < 0):
        raise ValueError(f"threshold must be a non-negative number of bytes or None, not {threshold!r}")
    channel._share_above = threshold
