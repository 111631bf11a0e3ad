"""``recv_into()``: the caller's buffer for a message's payload (both channels use it)."""

from __future__ import annotations

from typing_extensions import Buffer

from ._codec import Decoder
from ._errors import BufferTooShort
from ._message import Message
from ._ownedfd import OwnedFd

__all__ = ["offer", "place", "writable_bytes"]


def writable_bytes(buffer: Buffer) -> memoryview:
    """*buffer* as a writable, contiguous view of bytes; raises before anything is read."""
    view = memoryview(buffer)
    if view.readonly:
        raise TypeError(f"recv_into() needs a writable buffer, got a read-only {type(buffer).__name__}")
    if not view.c_contiguous:
        raise BufferError("recv_into() needs a contiguous buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def offer(decoder: Decoder, view: memoryview | None) -> None:
    """Let the decoder read the next message's payload into *view* (None: ``recv()``, nothing to do).

    Only when no data frame is queued: the next message is then the next
    frame parsed.  A frame that was queued already is copied in by `place`.
    """
    if view is not None and not decoder.frames:
        decoder.set_into(view)


def place(msg: Message, view: memoryview) -> tuple[int, tuple[OwnedFd, ...]]:
    """The result of ``recv_into()`` for *msg*, its payload now in *view*."""
    shared = msg.shared
    payload: bytes | bytearray | memoryview = msg.payload
    if payload.__class__ is memoryview and shared is None:  # the decoder read it into view
        return len(payload), msg.fds
    n = len(payload)
    if n > len(view):
        raise BufferTooShort(msg, f"a payload of {n} bytes does not fit a buffer of {len(view)}")
    view[:n] = payload
    if shared is not None:
        # Copied out of the sealed memory (mapped read-only): the caller gets
        # the bytes and the other fds; the memory itself is let go here.
        shared.close()
    return n, msg.fds
