"""`ChannelCore`: every step of a channel that does not wait, written once.

`fdchannel.Channel` (blocking: ``poll`` against a deadline, threading locks)
and `fdchannel.aio.AsyncChannel` (the event loop, cancellation) differ only
in how they wait.  Everything else lives here: the argument checks and
limits, the one-write fast paths, preparing and starting a message, what a
write that stopped means for the channel (the rules are the `Outbox`'s), the
reads into the `Decoder` and turning its frames into messages, pumping and
flushing the transport's control frames, failure handling and the error
raised after a failure, and closing.

A subclass supplies the locks through four hooks that never wait
(`_claim_send`, `_release_send`, `_claim_recv`, `_release_recv`), may wake
its waiters on close (`_wake_waiters`), and drops what other threads hold
on close its own way (`_drop_held`).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

from typing_extensions import Buffer

from ._codec import HEADER_SIZE, SCM_MAX_FD, Decoder, Frame, header_tag, pack_tagged
from ._errors import ChannelBroken, ChannelClosed, FdChannelError, ProtocolError, TruncatedControlData
from ._fdutil import SocketHandle, close_all
from ._message import Message
from ._outbox import Outbox, set_written
from ._ownedfd import fileno_of
from ._sockio import SocketIO, io_for, write_pending
from .transports import Outgoing, Session, Transport, default_transport

__all__ = ["DEFAULT_MAX_FDS", "DEFAULT_MAX_PAYLOAD", "PUMP_BUDGET", "ChannelCore"]

DEFAULT_MAX_PAYLOAD: Final = 64 * 1024 * 1024
DEFAULT_MAX_FDS: Final = 1024

#: How much unread data a send() on a duplication transport may read ahead
#: of recv() while it looks for the peer's acknowledgements: enough that
#: acknowledgements behind a few unread messages still arrive, bounded so a
#: process that only sends does not pull its peer's whole stream into memory.
PUMP_BUDGET: Final = 1 << 20
#: The largest fd number a C int holds: SCM_RIGHTS carries ints.
FD_MAX: Final = 2**31 - 1


class ChannelCore:
    """The state and the non-waiting steps of `fdchannel.Channel` and `fdchannel.aio.AsyncChannel`.

    Not usable on its own: a subclass supplies the locks, the waiting and the
    public methods (whose docstrings the API reference shows).
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
    _outbox: Outbox
    _io: SocketIO
    _write: Callable[[socket.socket, Sequence[Buffer], Sequence[int], int], int]
    _read_into: Callable[[socket.socket, Decoder, int], tuple[bytes, Sequence[int]] | None]
    _data_tag: int
    _send_flags: int
    _dontwait: int
    _has_control: bool
    _simple: bool
    _broken: FdChannelError | None
    _eof: bool
    _closed: bool
    _pid: int

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
            lone_frames=_is_simple(session),
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
        self._outbox = Outbox(transport.wire_id)
        self._data_tag = header_tag(transport.wire_id)
        self.max_payload = max_payload
        self.max_fds = max_fds
        io = self._io = io_for(sock)
        # Bound once: the fast paths call them per message.
        self._write = io.write
        self._read_into = io.read
        self._send_flags = io.SEND_FLAGS
        self._dontwait = io.DONTWAIT
        self._has_control = type(session).take_control is not Session.take_control
        # Sessions that send fds in band exactly as given (UnixRights) take a
        # shorter path: no outgoing()/incoming() per message.
        self._simple = _is_simple(session)
        self._broken = None
        self._eof = False
        self._closed = False
        self._pid = os.getpid()

    @classmethod
    def _pair(cls, transport: Transport | None, kwargs: dict[str, Any]) -> tuple[Self, Self]:
        """The logic of ``pair()``: two channels over a new socketpair, or nothing left open."""
        a, b = socket.socketpair(getattr(socket, "AF_UNIX", socket.AF_INET), socket.SOCK_STREAM)
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
        # Through the socket: on Windows *fd* is a SOCKET, which os.* refuses.
        sock.set_inheritable(False)
        return channel

    if TYPE_CHECKING:
        # Each channel defines these its own way.
        def __init__(self, sock: socket.socket, **kwargs: Any) -> None: ...

    # -- the subclass's locks, never waiting ---------------------------------

    def _claim_send(self) -> bool:
        """Take the send lock if it is free at once; False if a call holds it."""
        raise NotImplementedError

    def _release_send(self) -> None:
        raise NotImplementedError

    def _claim_recv(self) -> bool:
        """Take the receive lock if it is free at once; False if a call holds it."""
        raise NotImplementedError

    def _release_recv(self) -> None:
        raise NotImplementedError

    def _wake_waiters(self) -> None:
        """The channel was just marked closed: wake every call waiting on it."""

    def _drop_held(self) -> None:
        """On close: drop the queued output and the buffered fds no call is using."""
        if self._claim_send():
            try:
                self._outbox.discard()
            finally:
                self._release_send()
        if self._claim_recv():
            try:
                close_all(self._decoder.take_fds())
            finally:
                self._release_recv()

    # -- small public surface ------------------------------------------------

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
        return bool(self._outbox.pending)

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
        """Raise `ValueError` on a closed channel, or the error that names why it is unusable."""
        if self._closed:
            raise ValueError(f"I/O operation on a closed {self._kind}")
        broken = self._broken
        if broken is not None:
            raise type(broken)(f"the channel is unusable after an earlier error: {broken}") from broken

    def _break(self, exc: FdChannelError) -> None:
        """Mark the channel unusable after *exc* (the first failure is the one named)."""
        if self._broken is None:
            self._broken = exc

    def _fail(self, exc: FdChannelError) -> None:
        """`_break`, and close every fd the decoder holds (the caller holds the receive lock)."""
        self._break(exc)
        close_all(self._decoder.take_fds())

    def _at_eof(self) -> None:
        self._eof = True
        # The peer can no longer take anything: a duplication transport
        # releases the copies it kept for it.
        self._session.peer_closed()

    # -- sending: the non-waiting steps --------------------------------------

    def _message(self, payload: Buffer, fds: Iterable[int | Any]) -> tuple[list[int], int]:
        """The fd numbers and payload size of a message; raises before anything is written."""
        nums = list(fds)
        for f in nums:
            if f.__class__ is not int or not 0 <= f <= FD_MAX:
                nums = [fileno_of(f) for f in nums]  # objects, or a clear error
                break
        if payload.__class__ is bytes:
            size = len(payload)
        else:
            view = memoryview(payload)
            if not view.contiguous:
                raise BufferError("the payload must be a contiguous buffer")
            size = view.nbytes
        if size > self.max_payload or len(nums) > self.max_fds or self._fileno in nums:
            self._refuse(size, nums)
        return nums, size

    def _refuse(self, size: int, nums: list[int]) -> None:
        """Raise the `ValueError` for a message `send` must not write (the caller's quick check hit).

        Returns only on Windows, for a CRT fd that merely has the number of
        the channel's SOCKET (the two are numbered apart there).
        """
        if size > self.max_payload:
            raise ValueError(f"payload of {size} bytes exceeds max_payload={self.max_payload}")
        nfds = len(nums)
        if nfds > self.max_fds:
            raise ValueError(f"{nfds} fds exceed max_fds={self.max_fds}")
        if sys.platform != "win32" or any(
            n == self._fileno and (n.__class__ is SocketHandle or not _is_crt_fd(n)) for n in nums
        ):
            raise ValueError("refusing to send a channel's own socket over itself")

    def _send_whole(self, payload: Buffer, nums: list[int], size: int) -> int | None:
        """The send fast path: one write of the whole frame, fds passed through.

        For a simple session (fds in band as given), up to `SCM_MAX_FD` fds
        and nothing queued ahead; the channels test that inline.

        Returns None when all of it left, else the bytes that did (the rest
        is queued: push it with ``before`` set to that).  Raises `OSError`
        with ``characters_written`` 0 when nothing left.
        """
        bufs: list[Buffer] = [pack_tagged(self._data_tag, len(nums), 0, size), payload]
        try:
            sent = self._write(self._sock, bufs, nums, self._send_flags)
        except OSError as exc:
            set_written(exc, 0)
            raise
        except BaseException as exc:
            self._break(self._outbox.interrupted(exc))
            raise
        if sent == HEADER_SIZE + size:
            return None
        self._outbox.add_unsent(bufs, nums, sent)
        return sent

    def _prepare_send(self) -> None:
        """Before a message on the slow path: take in the peer's control frames, queue ours."""
        if self._has_control:
            self._pump_nowait()
            self._outbox.add_control(self._session.take_control())

    def _peer_needed(self, nums: list[int]) -> bool:
        """True while the session needs to hear from the peer before it can send *nums*.

        Reads what already arrived (the peer's greeting may be there); raises
        `BrokenPipeError` if the peer closed without greeting.
        """
        session = self._session
        if not session.waits_for_peer(nums):
            return False
        self._pump_nowait()
        if not session.waits_for_peer(nums):
            return False
        if self._eof:
            raise BrokenPipeError(errno.EPIPE, "the peer closed before its channel announced itself")
        return True

    def _start_message(self, payload: Buffer, nums: list[int], size: int) -> tuple[Outgoing, int | None]:
        """Frame a message through the session and write what the socket takes now.

        Returns the session's `Outgoing` (for `_not_taken`) and None when the
        whole frame left, else the bytes of it that did (the rest queued).
        Raises `OSError` with ``characters_written`` 0 and nothing queued.
        """
        out = self._session.outgoing(nums)
        in_band = list(out.in_band)
        outbox = self._outbox
        bufs = outbox.frame(out.aux, len(nums), payload, size)
        try:
            if len(in_band) <= SCM_MAX_FD:
                sent: int = self._io.write(self._sock, bufs, in_band, self._send_flags)
                if sent == HEADER_SIZE + len(out.aux) + size:
                    return out, None
                outbox.add_unsent(bufs, in_band, sent)
                return out, sent
            # More fds than one write may carry: the kernel checks each batch
            # only as it goes, so a closed fd number in a later batch would
            # cut the frame after the first.  Check them all now, as the
            # kernel does for a message of one batch.
            for fd in in_band:
                os.get_inheritable(fd)
            outbox.add_frame(bufs, in_band, payload, size)
            return out, 0
        except OSError as exc:
            set_written(exc, 0)
            self._session.discard(out)
            raise
        except BaseException as exc:
            self._break(outbox.interrupted(exc))
            raise

    def _not_taken(self, exc: BaseException, out: Outgoing) -> None:
        """A push of a message's rest raised *exc*: if nothing of it left, the session lets go."""
        if getattr(exc, "characters_written", 1) == 0:
            self._session.discard(out)

    def _push_paused(self, exc: BaseException, before: int | None, written: int) -> None:
        """A push stopped waiting (would block, timed out, cancelled); the caller re-raises *exc*."""
        broken = self._outbox.paused(exc, before, written)
        if broken is not None:
            self._break(broken)
            assert broken.__cause__ is not None
            raise broken.__cause__ from exc

    def _push_failed(self, exc: BaseException, before: int | None, written: int) -> None:
        """A push failed with *exc* (the caller re-raises it)."""
        written += getattr(exc, "fdchannel_written", 0)
        if isinstance(exc, OSError):
            broken = self._outbox.failed(exc, before, written)
        else:
            # KeyboardInterrupt, a signal handler's error, a close from
            # another thread: it may have struck inside a write.
            set_written(exc, written if before is None else before + written)
            broken = self._outbox.interrupted(exc)
        if broken is not None:
            self._break(broken)

    def _write_now(self) -> int:
        """Write queued chunks as far as the socket takes them without waiting."""
        return write_pending(self._io, self._sock, self._outbox, self._send_flags | self._dontwait)

    # -- transport control frames --------------------------------------------

    def _flush_control_nowait(self) -> None:
        """Send queued control frames if that can be done without waiting (opportunistic)."""
        if not self._claim_send():
            return
        try:
            if self._broken is not None or self._closed:
                return
            outbox = self._outbox
            outbox.add_control(self._session.take_control())
            if not outbox.pending:
                return
            try:
                self._write_now()
            except OSError as exc:
                # A vanished peer needs no acknowledgements, and recv() still
                # delivers what it sent before; anything else mid-frame breaks.
                broken = outbox.failed(exc, None, 0)
                if broken is not None:
                    self._break(broken)
                return
            for chunk in outbox.pending:
                chunk.detach()  # control frames own their bytes: nothing to duplicate
        finally:
            self._release_send()

    def _pump_nowait(self) -> None:
        """Read whatever already arrived, so the session sees the peer's control frames.

        Raises the `ProtocolError` of a malformed control frame or truncated
        control data (the channel is failed); other stream errors wait for
        ``recv()`` to report them.
        """
        # A call inside recv() owns the decoder: reading here could leave it
        # waiting for readability with a whole message already buffered.
        if not self._claim_recv():
            return
        try:
            decoder = self._decoder
            read = self._io.read
            try:
                # Bounded, so a peer that streams without pause cannot keep a
                # send() here; reading ahead of recv() stops at PUMP_BUDGET
                # of unread data (control frames behind it then wait for recv()).
                for _ in range(16):
                    if decoder.eof or decoder.unread_bytes >= PUMP_BUDGET:
                        break
                    one = read(self._sock, decoder, self._dontwait)
                    if one is not None:  # pragma: no cover - sessions with control frames queue all
                        decoder.push_back(*one)
                    elif decoder.eof and not self._eof:
                        self._at_eof()
            except BlockingIOError:
                pass  # drained
            except TruncatedControlData as exc:
                self._fail(exc)
                raise
            except OSError:
                pass  # recv() reports stream errors
            # Acknowledgements do not depend on the data frames around them,
            # so they are handled now and the data waits for recv().
            for frame in decoder.take_control_frames():
                self._control(frame)
        finally:
            self._release_recv()

    def _control(self, frame: Frame) -> None:
        """Hand a control frame to the session; a malformed one fails the channel."""
        try:
            self._session.control(bytes(frame.payload))
        except ProtocolError as exc:
            self._fail(exc)
            raise

    # -- receiving: the non-waiting steps ------------------------------------

    def _read(self, flags: int) -> Message | None:
        """One read into the decoder; the message if that read was exactly one for the caller.

        Raises `BlockingIOError` when nothing is ready, `TruncatedControlData`
        (the channel failed) and `OSError` from the kernel.
        """
        try:
            one = self._read_into(self._sock, self._decoder, flags)
        except TruncatedControlData as exc:
            self._fail(exc)
            raise
        if one is None:
            if self._decoder.eof and not self._eof:
                self._at_eof()
            return None
        # The fds stay numbers until the caller reads msg.fds.
        return Message._owning(*one)

    def _next_message(self) -> Message | None:
        """The next message the decoder holds, or None when it needs more data.

        Raises the decoder's `ProtocolError` (the channel failed) once the
        frames before it are out, and `ChannelClosed` at a clean end of stream.
        """
        decoder = self._decoder
        frames = decoder.frames
        while frames:
            frame = frames.popleft()
            if frame.control:
                self._control(frame)
                continue
            fds = frame.fds if self._simple and not frame.aux else self._incoming(frame)
            return Message._owning(frame.payload, fds)
        error = decoder.error
        if error is not None:
            self._fail(error)
            raise error
        if decoder.eof:
            if not self._eof:
                self._at_eof()
            raise ChannelClosed("the peer closed the channel")
        return None

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
            try:
                self._flush_control_nowait()
            except BaseException:
                close_all(fds)
                raise
        return fds

    #: What may end a recv() without breaking the channel: nothing read was lost.
    _recv_ok: ClassVar[tuple[type[BaseException], ...]] = (OSError, FdChannelError, ValueError)

    def _recv_stopped(self, exc: BaseException) -> None:
        """A recv() ends with *exc*: anything but the expected errors breaks the channel."""
        if not isinstance(exc, self._recv_ok):
            self._recv_interrupted(exc)

    def _recv_interrupted(self, exc: BaseException) -> None:
        """*exc* (KeyboardInterrupt, a signal handler's error) cut into a recv().

        It may have struck after the kernel handed over bytes and fds but
        before they were recorded, so they may be lost: say so from now on.
        """
        broken = ChannelBroken(
            f"recv() was interrupted by {exc!r}; what it had read may be lost, so the stream is unusable"
        )
        broken.__cause__ = exc
        self._fail(broken)

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and every fd the channel still holds.  Idempotent."""
        if self._closed:
            return
        # A forked copy must not push the creator's queued output a second
        # time, nor read the creator's stream.
        ours = self._pid == os.getpid()
        if ours and self._outbox.pending and self._broken is None and self._claim_send():
            try:
                self._write_now()
            except OSError:
                pass
            finally:
                self._release_send()
        if ours and self._has_control and self._broken is None and not self._eof:
            # Take the peer's control frames (acknowledgements) out of the
            # socket first: closing a Unix socket with unread data resets the
            # connection, and the peer would see ECONNRESET instead of EOF.
            try:
                self._pump_nowait()
            except FdChannelError:
                pass
        self._closed = True
        self._wake_waiters()
        self._drop_held()
        try:
            self._session.close()
        finally:
            self._sock.close()


def _is_crt_fd(n: int) -> bool:
    """Windows: True if *n* is an open CRT fd (whatever SOCKET has the same number)."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.get_osfhandle(n)
        except OSError:
            return False
        return True
    return False  # pragma: no cover - called on Windows only


def _is_simple(session: Session) -> bool:
    """True for a session whose fds pass in band as given and that sends no control frames."""
    return session.passthrough and type(session).take_control is Session.take_control
