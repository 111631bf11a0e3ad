"""`ChannelBase`: what the blocking `Channel` and `AsyncChannel` have in common.

The two channels differ in how they wait (``poll`` against a deadline, or the
event loop), hence in their locks and in how they read.  Their state, its
checks, the writes that never wait (a frame's first ``sendmsg``, the queue as
far as the socket takes it) and the handling of what the transport's session
says stay the same whichever way they wait, so they live here once.  The hot
paths of `Channel` do not call into this module for the common case: they
inline what they need.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn, Self

from typing_extensions import Buffer

from ._codec import _HEADER, HEADER_SIZE, MAGIC, VERSION, Decoder, Frame, pack_header
from ._errors import FdChannelError, ProtocolError
from ._fdutil import close_all
from ._ownedfd import fileno_of
from ._sockio import SEND_FLAGS, Chunk, rights, set_written, split_batches
from .transports import Session, Transport, default_transport
from .transports._unix import SCM_MAX_FD

__all__ = ["ChannelBase"]

_pack = _HEADER.pack


#: How much unread data a send() on a duplication transport may read ahead
#: of recv() while it looks for the peer's acknowledgements: enough that
#: acknowledgements behind a few unread messages still arrive, bounded so a
#: process that only sends does not pull its peer's whole stream into memory.
PUMP_BUDGET: Final = 1 << 20


class ChannelBase:
    """The state and checks shared by `fdchannel.Channel` and `fdchannel.aio.AsyncChannel`.

    Not usable on its own: a subclass supplies the locks, the waiting, and
    `close`.  Public methods stay on the subclasses, whose docstrings the
    API reference shows.
    """

    #: The class named in messages and ``repr``; subclasses of a channel keep it.
    _kind: ClassVar[str]

    max_payload: int
    max_fds: int
    _sock: socket.socket
    _fileno: int
    _transport: Transport
    _session: Session
    _decoder: Decoder
    _wire_id: int
    _has_control: bool
    _simple: bool
    _pending: deque[Chunk]
    _broken: FdChannelError | None
    _eof: bool
    _closed: bool

    # -- construction ---------------------------------------------------

    @classmethod
    def _open(
        cls, sock: socket.socket, transport: Transport | None, max_payload: int, max_fds: int
    ) -> tuple[Transport, Session, Decoder]:
        """Check the constructor's arguments; return the transport, session and decoder for *sock*."""
        if sock.type != socket.SOCK_STREAM:
            article = "an" if cls._kind[0] in "AEIOU" else "a"
            raise ValueError(f"{article} {cls._kind} needs a SOCK_STREAM socket, got {sock.type!r}")
        if max_payload < 0 or max_fds < 0:
            raise ValueError("max_payload and max_fds must not be negative")
        transport = default_transport() if transport is None else transport
        transport.check_socket(sock)
        session = transport.session(sock)
        decoder = Decoder(
            wire_id=transport.wire_id,
            in_band=session.in_band,
            max_payload=max_payload,
            max_fds=max_fds,
            max_aux=transport.max_aux(max_fds),
            transport_name=transport.name,
        )
        return transport, session, decoder

    def _adopt(
        self,
        sock: socket.socket,
        transport: Transport,
        session: Session,
        decoder: Decoder,
        *,
        max_payload: int,
        max_fds: int,
    ) -> None:
        """Take ownership of *sock* and its session and decoder: the shared state, fresh."""
        self._sock = sock
        self._fileno = sock.fileno()
        self._transport = transport
        self._session = session
        self._decoder = decoder
        self._wire_id = transport.wire_id
        self.max_payload = max_payload
        self.max_fds = max_fds
        self._has_control = type(session).take_control is not Session.take_control
        # Sessions that send fds in band exactly as given (UnixRights) take a
        # shorter path: no outgoing()/incoming() per message.
        self._simple = session.passthrough and not self._has_control
        self._pending = deque()
        self._broken = None
        self._eof = False
        self._closed = False

    @classmethod
    def _pair(cls, transport: Transport | None, kwargs: dict[str, Any]) -> tuple[Self, Self]:
        """The logic of ``pair()``: two channels over a new socketpair, or nothing left open."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        first: Self | None = None
        try:
            first = cls(a, transport=transport, **kwargs)
            return first, cls(b, transport=transport, **kwargs)
        except BaseException:
            if first is not None:
                first.close()
            a.close()
            b.close()
            raise

    @classmethod
    def from_fd(cls, fd: int, **kwargs: Any) -> Self:
        """Wrap an inherited socket fd; the channel owns it from now on.

        Keyword arguments go to the constructor.  The fd is made
        non-inheritable.  Raises `OSError` if *fd* is not a socket
        (``ENOTSOCK``) or not connected (``ENOTCONN``), `ValueError` if it is
        not a stream socket or the transport cannot use it; the fd is then
        left open and still the caller's.
        """
        sock = socket.socket(fileno=fd)
        try:
            sock.getpeername()
            channel = cls(sock, **kwargs)
        except BaseException:
            # The fd stays the caller's: the socket object must not close it.
            sock.detach()
            raise
        os.set_inheritable(fd, False)
        return channel

    if TYPE_CHECKING:
        # Each channel defines these its own way.
        def __init__(self, sock: socket.socket, **kwargs: Any) -> None: ...
        def close(self) -> None:
            """Close the socket and every fd the channel holds."""

        def _flush_control_nowait(self) -> None: ...

    @property
    def transport(self) -> Transport:
        """The transport this channel was built with."""
        return self._transport

    @property
    def closed(self) -> bool:
        """True once the channel was closed (``close``, ``aclose`` or leaving ``with``)."""
        return self._closed

    @property
    def pending(self) -> bool:
        """True while the rest of a message that was taken waits in the channel.

        That is after a ``send()`` that raised with ``characters_written > 0``
        (non-blocking, timed out, or cancelled): ``flush()`` writes it, and
        the next ``send()`` writes it first.
        """
        return bool(self._pending)

    def fileno(self) -> int:
        """The socket's fd, for ``select``/``poll``; ownership stays with the channel."""
        return self._sock.fileno()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fileno}"
        return f"<{self._kind} {state} transport={self._transport.name}>"

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
            self.close()

    # -- state ---------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"I/O operation on a closed {self._kind}")
        broken = self._broken
        if broken is not None:
            raise type(broken)(f"the channel is unusable after an earlier error: {broken}")

    def _fail(self, exc: FdChannelError) -> None:
        """Mark the channel unusable after *exc* and close every fd it holds."""
        if self._broken is None:
            self._broken = exc
        close_all(self._decoder.take_fds())

    def _at_eof(self) -> None:
        self._eof = True
        # The peer can no longer take anything: a duplication transport
        # releases the copies it kept for it.
        self._session.peer_closed()

    # -- sending ------------------------------------------------------------

    @staticmethod
    def _message_args(payload: Buffer, fds: Iterable[int | Any]) -> tuple[list[int], int]:
        """The fd numbers and payload size of a message; raises before anything is written.

        ``Channel.send`` inlines the same checks on its hot path.
        """
        nums = [fileno_of(f) for f in fds]
        if payload.__class__ is bytes:
            return nums, len(payload)
        view = memoryview(payload)
        if not view.contiguous:
            raise BufferError("the payload must be a contiguous buffer")
        return nums, view.nbytes

    def _refuse(self, size: int, nums: list[int]) -> NoReturn:
        """Raise the `ValueError` for a message `send` must not write (the caller checked)."""
        # Only reached once the caller's inline check failed, so the happy
        # path of send() pays no call for it.
        if size > self.max_payload:
            raise ValueError(f"payload of {size} bytes exceeds max_payload={self.max_payload}")
        nfds = len(nums)
        if nfds > self.max_fds:
            raise ValueError(f"{nfds} fds exceed max_fds={self.max_fds}")
        raise ValueError("refusing to send a channel's own socket over itself")

    def _write_frame(
        self, aux: bytes, in_band: list[int], nfds: int, payload: Buffer, size: int
    ) -> int | None:
        """Write one frame as far as one ``sendmsg`` takes it and queue the rest.

        Returns None when the whole frame left, else the bytes of it that did
        (the caller pushes the queue then).  Raises `OSError` other than
        `BlockingIOError` with ``characters_written`` 0 and nothing queued.
        """
        bufs: list[Buffer] = [_pack(MAGIC, VERSION, self._wire_id, 0, nfds, len(aux), size)]
        if aux:
            bufs.append(aux)
        if size:
            bufs.append(payload)
        if len(in_band) <= SCM_MAX_FD:
            try:
                sent = self._sock.sendmsg(bufs, rights(in_band), SEND_FLAGS)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                set_written(exc, 0)
                raise
            if sent == HEADER_SIZE + len(aux) + size:
                return None
            self._queue_unsent(bufs, in_band, sent)
            return sent
        # More fds than one sendmsg may carry: every batch but the last rides
        # on one byte of its own, the last on the rest of the frame.  The
        # kernel checks each batch only as it goes, so a closed fd number in
        # a later batch would cut the frame after the first: check them all
        # now, as the kernel does for a message of one batch.
        for fd in in_band:
            try:
                os.get_inheritable(fd)
            except OSError as exc:
                set_written(exc, 0)
                raise
        self._pending.extend(split_batches(bufs, payload, size, in_band))
        return 0

    def _interrupted(self, exc: BaseException) -> None:
        """*exc* (KeyboardInterrupt, a signal handler's error) cut into a write.

        It may have struck after the kernel took part of a frame but before
        the count reached us, so how much left is unknown: the stream can no
        longer be trusted.
        """
        self._discard_pending()
        if self._broken is None:
            self._broken = ProtocolError(
                f"send() was interrupted by {exc!r} while writing a frame; how much of it "
                "left is unknown, so the stream is unusable"
            )

    def _control(self, frame: Frame) -> None:
        """Hand a control frame to the session; a malformed one breaks the channel."""
        try:
            self._session.control(bytes(frame.payload))
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def _recv_interrupted(self, exc: BaseException) -> None:
        """*exc* (KeyboardInterrupt, a signal handler's error) cut into a recv().

        It may have struck after the kernel handed over bytes and fds but
        before they were recorded, so they may be lost: say so from now on.
        """
        self._fail(
            ProtocolError(
                f"recv() was interrupted by {exc!r}; what it had read may be lost, so the stream is unusable"
            )
        )

    def _queue_unsent(self, bufs: list[Buffer], fds: list[int], sent: int) -> None:
        """Queue what one ``sendmsg`` of a whole frame (*bufs*, *fds*) did not send."""
        chunk = Chunk(bufs, fds)
        if sent:
            chunk.fds = []  # they rode on the bytes that left
            chunk.consume(sent)
        self._pending.append(chunk)

    def _write_pending(self, flags: int = SEND_FLAGS) -> int:
        """Write pending chunks until none is left or the socket is full; return the bytes written."""
        pending = self._pending
        sock = self._sock
        written = 0
        while pending:
            chunk = pending[0]
            try:
                n = sock.sendmsg(chunk.bufs, rights(chunk.fds), flags)
            except BlockingIOError:
                break
            if n and chunk.fds:
                # Attached to bytes that left: never attach them again.
                chunk.release_fds()
            written += n
            if chunk.consume(n):
                pending.popleft()
            else:
                break  # a short write: the socket is full
        return written

    def _discard_pending(self) -> None:
        for chunk in self._pending:
            chunk.release_fds()
        self._pending.clear()

    # -- transport control frames --------------------------------------------

    def _queue_control(self) -> None:
        for payload in self._session.take_control():
            header = pack_header(self._wire_id, 0, 0, len(payload), control=True)
            self._pending.append(Chunk([header + payload], []))

    def _incoming(self, frame: Frame) -> list[int]:
        """The fds of a data frame as the session delivers them, owned by the caller."""
        try:
            fds = self._session.incoming(frame.nfds, frame.aux, frame.fds)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        except BaseException:
            # A message refused for this end alone (PermissionError,
            # FdsWithdrawn): the session acknowledged it so the peer can
            # release its copies; tell it now.
            if self._has_control:
                self._flush_control_nowait()
            raise
        if self._has_control:
            self._flush_control_nowait()
        return fds
