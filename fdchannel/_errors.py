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
    "ActivationError",
    "BufferTooShort",
    "ChannelBroken",
    "ChannelClosed",
    "FdChannelError",
    "FdsWithdrawn",
    "LimitExceeded",
    "ProtocolError",
    "SharedMemoryRefused",
    "TruncatedControlData",
    "UnverifiedSender",
    "UpgradeError",
    "UpgradeFailed",
    "UpgradeInProgress",
    "UpgradeRefused",
    "UpgradeTimeout",
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
    """The peer went over one of this channel's limits.

    It declared a payload or fd count over ``max_payload``/``max_fds``, made
    this end hold more than ``max_held_fds``, left a message unfinished past
    ``frame_timeout``, or took more than its share of a full `Budget`.  The
    fds the channel held are closed.
    """


class TruncatedControlData(ProtocolError):
    """The kernel truncated the control data (``MSG_CTRUNC``).

    Usually the receiving process is at its ``RLIMIT_NOFILE`` and the kernel
    could not install every fd; the fds that did arrive were closed.
    """


class UnverifiedSender(ProtocolError):
    """A duplication frame names a process not proven to be this connection's peer.

    Raised by ``recv()`` on `PidfdGetfd` when a frame asks this end to copy
    fds out of a process that does not hold the other end of this very
    connection (a forged pid, this process itself, a third process), or
    when the kernel offers no way to prove that it does.  Nothing was
    delivered and no fd was kept; like any `ProtocolError` it leaves the
    channel unusable.
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


class ActivationError(FdChannelError, ValueError):
    """The socket-activation or notification variables are malformed.

    Raised by `fdchannel.systemd` when ``LISTEN_PID``, ``LISTEN_FDS``,
    ``LISTEN_FDNAMES`` or ``NOTIFY_SOCKET`` hold something systemd never
    sets (the message quotes the value), or name fds that are not open.  No
    fd was taken or closed.  Also a `ValueError`.
    """


class UpgradeError(FdChannelError):
    """An upgrade (`fdchannel.upgrade`) could not be started or did not complete.

    The process that asked for the upgrade keeps serving: nothing it
    registered was closed.
    """


class UpgradeInProgress(UpgradeError):
    """Another upgrade is running (or this process already handed over and is stopping)."""


class UpgradeFailed(UpgradeError):
    """The successor exited, crashed or broke the protocol before it said it was ready.

    The successor was killed (if still alive) and reaped where this process
    started it.  `exit_code` is its exit status when known (negative: killed
    by that signal), else ``None``.
    """

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UpgradeRefused(UpgradeFailed):
    """The successor reported an error (`Upgrader.refuse`) instead of being ready; `reason` is its text."""

    def __init__(self, message: str, reason: str, exit_code: int | None = None) -> None:
        super().__init__(message, exit_code)
        self.reason = reason


class UpgradeTimeout(UpgradeFailed, TimeoutError):
    """The successor was not ready within the timeout; it was killed.  Also a `TimeoutError`."""


class SharedMemoryRefused(FdChannelError):
    """A message's shared-memory payload failed the receiver's checks.

    Raised by ``recv()`` when the peer marked a payload as a sealed memfd
    (`fdchannel.shm`) but the fd is not a memfd, lacks one of the seals
    ``F_SEAL_SHRINK``, ``F_SEAL_GROW``, ``F_SEAL_WRITE``, ``F_SEAL_SEAL``,
    has another size than declared, or this platform cannot check seals.
    Nothing was mapped; the message was dropped and every fd of it closed.
    The channel stays usable: the stream itself was well formed.
    """
