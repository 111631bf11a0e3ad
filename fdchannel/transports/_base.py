"""The `Transport` interface: how fds leave and enter a process.

A transport never frames messages; the codec does that for every transport.
A `Transport` object is configuration and may serve many channels; each
channel asks it for a `Session` that holds that channel's own state.
"""

from __future__ import annotations

import abc
import socket
from collections.abc import Sequence
from typing import ClassVar

import attrs

__all__ = ["Outgoing", "Session", "Transport"]


@attrs.frozen
class Outgoing:
    """What a session wants sent with one message.

    Attributes:
        aux: Goes into the frame's transport-data block.
        in_band: Fd numbers to attach as SCM_RIGHTS to the frame's bytes
            (the channel splits them into batches the kernel accepts).
        token: The session's own handle for this message, given back to
            `Session.discard` if the message is never sent.
    """

    aux: bytes = b""
    in_band: Sequence[int] = ()
    token: object = None


class Session(abc.ABC):
    """One channel's side of a transport.

    Calls come from the channel with its send or receive lock held; a session
    must not block.  Control payloads it queues are sent to the peer's
    session, in order, ahead of the next message (and whenever the channel
    can send without blocking).
    """

    #: True when fds travel as SCM_RIGHTS on the frame's bytes.
    in_band: ClassVar[bool] = False
    #: True when `outgoing` of up to SCM_MAX_FD fds is always
    #: ``Outgoing(b"", fds)`` and nothing needs `discard`; the channel then
    #: skips the call on its hot path.
    passthrough: ClassVar[bool] = False

    @abc.abstractmethod
    def outgoing(self, fds: Sequence[int]) -> Outgoing:
        """Prepare *fds* for sending.

        Anything the session must keep alive after ``send()`` returns (so the
        caller may close its fds at once) it duplicates and owns itself.

        Args:
            fds: The message's fd numbers, borrowed: the caller keeps
                ownership.

        Returns:
            What to send with the message.
        """

    def waits_for_peer(self, fds: Sequence[int]) -> bool:
        """Whether *fds* cannot be prepared until the peer's session has spoken.

        `WinDuplicate` shares a socket *for* the peer's process id, which the
        peer announces in a control frame: until it has arrived, the channel
        reads (and waits, within its timeout) before calling `outgoing`.

        Args:
            fds: The message's fd numbers (borrowed).

        Returns:
            ``True`` to make the channel wait; the default is ``False``.
        """
        return False

    def discard(self, out: Outgoing) -> None:  # noqa: B027 - optional hook
        """*out* was never sent: release whatever `outgoing` kept for it.

        Args:
            out: What `outgoing` returned for the message.
        """

    @abc.abstractmethod
    def incoming(self, nfds: int, aux: bytes, in_band: list[int]) -> list[int]:
        """Return the *nfds* fds of a received frame, owned by the caller.

        Args:
            nfds: How many fds the frame declares.
            aux: The frame's transport-data block.
            in_band: The SCM_RIGHTS fds that came with the frame; the
                session owns them on entry.

        Returns:
            The frame's fds, in the order sent, owned by the caller.

        Raises:
            ProtocolError: Malformed *aux*.
            OSError: Such as `PermissionError` for a refused duplication.
                On any failure the session first closes every fd it owns or
                opened for this frame.
        """

    def control(self, payload: bytes) -> None:  # noqa: B027 - optional hook
        """Handle a control payload sent by the peer's session.

        Args:
            payload: The bytes the peer's session queued with `take_control`.
        """

    def take_control(self) -> list[bytes]:
        """Return and forget the control payloads waiting to be sent.

        Returns:
            The payloads, in order; the default has none.
        """
        return []

    def peer_closed(self) -> None:  # noqa: B027 - optional hook
        """The peer's end of the stream is closed (EOF was read).

        The peer's channel is gone, so it will never take what this side
        still keeps for it: a duplication transport releases its copies here
        instead of holding them until `close`.
        """

    def after_fork(self) -> None:  # noqa: B027 - optional hook
        """In a child just forked: drop locks that a thread of the parent held.

        That thread does not exist here, so nothing would release them and
        `close` would wait forever.  The channel is already unusable in the
        child when a call was in progress; this only has to make `close`
        work.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """The channel is closing: release everything still held.

        Called once, after every `incoming` call has returned (a session
        shared by threads guards itself), and before the socket is closed.
        """


class Transport(abc.ABC):
    """How a channel moves fds between processes.

    Subclass it, give it a unique `wire_id` (0-15 are fdchannel's own) and a
    `name`, and implement `session`.  Both ends of a channel must use the same
    transport: the id travels in every frame header and a mismatch is a
    `ProtocolError` on the first message.
    """

    wire_id: ClassVar[int]
    name: ClassVar[str]

    def check_socket(self, sock: socket.socket) -> None:  # noqa: B027 - optional hook
        """Refuse a socket this transport cannot work over.

        Args:
            sock: The channel's socket (borrowed).

        Raises:
            ValueError: *sock* cannot carry this transport (its family, say).
            OSError: ``ENOSYS`` where the transport cannot work at all.
        """

    def max_aux(self, max_fds: int) -> int:
        """The largest transport-data block a frame with *max_fds* fds may declare.

        Args:
            max_fds: The channel's ``max_fds``.

        Returns:
            A size in bytes; a larger declared block is a `ProtocolError`.
        """
        return 0

    @abc.abstractmethod
    def session(self, sock: socket.socket) -> Session:
        """Return a new session for a channel over *sock*.

        Args:
            sock: The channel's socket, borrowed, not owned.

        Returns:
            The channel's own session (a stateless transport may share one).
        """
