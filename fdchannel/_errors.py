"""The one error hierarchy of fdchannel.

OS failures are not wrapped: they surface as the `OSError` subclass the kernel
chose (`BlockingIOError`, `TimeoutError`, `BrokenPipeError`, ...) with errno
intact, so callers can use the same ``except`` clauses as with sockets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._message import Message

__all__ = [
    "BufferTooShort",
    "ChannelBroken",
    "ChannelClosed",
    "FdChannelError",
    "FdsWithdrawn",
    "LimitExceeded",
    "ProtocolError",
    "TruncatedControlData",
]


class FdChannelError(Exception):
    """Base class of every error fdchannel raises that is not an `OSError`."""


class ChannelClosed(FdChannelError, EOFError):
    """The peer closed the connection cleanly between two messages.

    Also an `EOFError`, so ``except EOFError`` works as with other streams.
    """


class ProtocolError(FdChannelError):
    """The peer sent something this channel cannot accept.

    Raised for bad magic or version, a transport mismatch, a declared size or
    fd count over the limits, fds that do not match what a frame declared,
    truncated control data, or EOF in the middle of a message.  Every fd that
    arrived with the offending data has been closed.  After it the channel is
    unusable: every later ``send()``/``recv()`` raises an error of the same
    class naming this original failure, chained to it (``__cause__``).

    A channel that this end broke itself raises the subclass `ChannelBroken`
    instead, so one ``except ProtocolError`` still covers every unusable
    channel.
    """


class ChannelBroken(ProtocolError):
    """This end made the channel unusable, through no fault of the peer.

    Raised when a local event cut the stream: a ``KeyboardInterrupt`` or a
    signal handler's exception struck while a frame was being written or
    read (how much of it moved is unknown), no fd was left to duplicate the
    rest of a partly written message, or the kernel failed a write in the
    middle of a frame.  ``__cause__`` is that event.  Every fd the channel
    held has been closed; later ``send()``/``recv()`` calls raise
    `ChannelBroken` chained to this one.
    """


class LimitExceeded(ProtocolError):
    """The peer declared a payload or fd count over this channel's limits."""


class TruncatedControlData(ProtocolError):
    """The kernel truncated the control data (``MSG_CTRUNC``).

    Usually the receiving process is at its ``RLIMIT_NOFILE`` and the kernel
    could not install every fd; the fds that did arrive were closed.
    """


class FdsWithdrawn(FdChannelError, ConnectionResetError):
    """The sender released a message's fds before this end could take them.

    Raised by ``recv()`` on a duplication transport (`PidfdGetfd`,
    `WinDuplicate`) when the sending process exited, or closed its channel,
    while the message was in flight.  The payload is lost with the fds;
    nothing of the message was delivered and nothing leaked.  The channel
    stays usable: later messages (typically none, or an EOF) follow.  Also a
    `ConnectionResetError`, since it means the peer went away.
    """


class BufferTooShort(FdChannelError, ValueError):
    """``recv_into()`` got a message whose payload does not fit the buffer.

    Nothing is lost: the whole message is in `message` (also ``args[0]``),
    its payload in a buffer of its own and its fds the caller's, as
    ``recv()`` would have returned it (`multiprocessing.Connection`'s
    ``recv_bytes_into`` does the same).  The channel stays usable.
    """

    @property
    def message(self) -> Message:
        """The message that did not fit; its fds are the caller's to close."""
        msg: Message = self.args[0]
        return msg
