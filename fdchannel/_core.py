"""`ChannelCore`: every step of a channel that does not wait, written once.

`fdchannel.Channel` (blocking: ``poll`` against a deadline, threading locks)
and `fdchannel.aio.AsyncChannel` (the event loop, cancellation) differ only
in how they wait.  Everything else lives here: the argument checks and
limits, the one-write fast paths, preparing and starting a message, what a
write that stopped means for the channel (the rules are the `Outbox`'s), the
reads into the `Decoder` and turning its frames into messages, pumping and
flushing the transport's control frames, failure handling and the error
raised after a failure, and closing.

A subclass supplies its send and receive lock (or gate) through two hooks
(`_send_guard`, `_recv_guard`), which `fdchannel._guard` takes without
waiting and releases however a signal handler's error strikes; it may wake
its waiters on close (`_wake_waiters`), and drops what other threads hold
on close its own way (`_drop_held`).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

from typing_extensions import Buffer

from ._budget import Budget
from ._codec import (
    FLAG_SHARED,
    HEADER_SIZE,
    SCM_MAX_FD,
    SHARED_DESCRIPTOR,
    Decoder,
    Frame,
    header_tag,
    pack_tagged,
)
from ._errors import (
    ChannelBroken,
    ChannelClosed,
    FdChannelError,
    LimitExceeded,
    ProtocolError,
    TruncatedControlData,
)
from ._fdutil import SocketHandle, close_all
from ._guard import Guard, run_held
from ._interrupt import raised_in_signal_handler
from ._message import Message
from ._outbox import Outbox, set_written
from ._ownedfd import adopt_all, fileno_of
from ._peer import PeerCredentials, peer_credentials, refuse_fds
from ._shared import SealedMemory, shared_message
from ._sockio import SocketIO, io_for, write_pending
from .transports import Outgoing, Session, Transport, default_transport

__all__ = ["DEFAULT_MAX_FDS", "DEFAULT_MAX_PAYLOAD", "PUMP_BUDGET", "ChannelCore"]

DEFAULT_MAX_PAYLOAD: Final = 64 * 1024 * 1024
"""The default ``max_payload`` of a channel: 64 MiB, the largest payload of one message."""
DEFAULT_MAX_FDS: Final = 1024
"""The default ``max_fds`` of a channel: the most fds one message may carry."""

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
    #: `close`'s steps after it marks the channel closed: 0 none left (or
    #: not begun), 1 left to run (a close() cut short by a signal handler's
    #: error: the next one runs them), 2 running (another close(), in
    #: another thread or a handler inside this one, returns at once).
    _closing: int = 0
    #: Whether close() has called the session's close (once, as a session
    #: is promised; tried, it is not tried again).
    _session_closed: bool = False
    _pid: int
    #: Payloads above this many bytes go as sealed shared memory
    #: (`fdchannel.shm.share_above`); None: never on their own.
    _share_above: int | None = None
    #: True from the moment a recv() has a message in hand (or is taking a
    #: frame off the decoder's queue) until it returns: an interrupt then
    #: loses that message.
    _delivering: bool
    #: True while a send() is between its first step and the point where the
    #: message's fate is recorded: left True by an interrupt that struck
    #: again while the first one was being handled, and then the next call
    #: finds the channel unusable (the safe side).
    _suspect: bool

    # -- construction ---------------------------------------------------

    @classmethod
    def _open(
        cls,
        sock: socket.socket,
        transport: Transport | None,
        max_payload: int,
        max_fds: int,
        max_held_fds: int | None = None,
        frame_timeout: float | None = None,
        budget: Budget | None = None,
    ) -> tuple[Transport, Session, Decoder]:
        """Check the constructor's arguments; return the transport, session and decoder for *sock*."""
        if not isinstance(sock, socket.socket):
            hint = f"; for an fd number use {cls._kind}.from_fd({sock!r})" if isinstance(sock, int) else ""
            raise TypeError(f"{cls._kind}() takes a connected socket.socket, not {type(sock).__name__}{hint}")
        if sock.type != socket.SOCK_STREAM:
            article = "an" if cls._kind[0] in "AEIOU" else "a"
            raise ValueError(f"{article} {cls._kind} needs a SOCK_STREAM socket, got {sock.type!r}")
        if max_payload < 0 or max_fds < 0:
            raise ValueError("max_payload and max_fds must not be negative")
        check_holding_limits(max_fds, max_held_fds, frame_timeout, budget)
        transport = default_transport() if transport is None else transport
        transport.check_socket(sock)
        try:
            sock.getpeername()
        except OSError as exc:
            # Caught now rather than as ENOTCONN/EINVAL on the first send.
            raise OSError(
                exc.errno,
                f"{cls._kind}() needs a connected socket ({exc.strerror}): connect it first, or use "
                f"{cls._kind}.connect(path) or {cls._kind}.pair()",
            ) from exc
        session = transport.session(sock)
        decoder = Decoder(
            wire_id=transport.wire_id,
            in_band=session.in_band,
            max_payload=max_payload,
            max_fds=max_fds,
            max_aux=transport.max_aux(max_fds),
            transport_name=transport.name,
            lone_frames=_is_simple(session),
            max_held_fds=max_held_fds,
            frame_timeout=frame_timeout,
            budget=budget,
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
        self._delivering = False
        self._suspect = False
        self._pid = os.getpid()
        # Weak: the decoder must not keep its channel alive (no cycle).
        decoder.on_evict = weakref.WeakMethod(self._evicted)
        if decoder.budget is not None and decoder.peer_group is None:
            decoder.peer_group = _peer_group(sock)
        if max_fds == 0:
            # A data-only channel: where the kernel can, no fd even reaches
            # this process (the sender gets EPERM); elsewhere the decoder
            # closes what arrives.
            refuse_fds(sock)

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

        The fd is made non-inheritable.

        Args:
            fd: A connected stream socket's fd.
            **kwargs: Go to the constructor (``transport``, ``max_payload``,
                ``max_fds``).

        Returns:
            The new channel, owned by the caller.

        Raises:
            OSError: *fd* is not a socket (``ENOTSOCK``) or not connected
                (``ENOTCONN``); the fd is then left open and still the
                caller's.
            ValueError: *fd* is not a stream socket or the transport cannot
                use it (the fd likewise stays the caller's).
        """
        sock = socket.socket(fileno=fd)
        try:
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

    #: The partner end, for close_other(); set by pair() only (and, for a
    #: pair end rebuilt in a multiprocessing child, to something that
    #: returns None: no partner in that process).
    _other_end: Callable[[], ChannelCore | None] | None = None

    def peer_credentials(self, *, pidfd: bool = False) -> PeerCredentials:
        """The pid, uid and gid of the peer as recorded at connect time (SO_PEERCRED).

        For the ends of `pair` this is the process that created the pair.

        Args:
            pidfd: Also carry a pidfd of the peer process (Linux 6.5+,
                ``SO_PEERPIDFD``), owned by the caller: see `PeerCredentials`.

        Returns:
            The peer's credentials.

        Raises:
            OSError: From the kernel (for instance on a non-AF_UNIX socket);
                ``ENOPROTOOPT`` when *pidfd* was asked for and the kernel
                has no ``SO_PEERPIDFD``.
            NotImplementedError: The OS has no way to tell.
        """
        return peer_credentials(self._sock, pidfd=pidfd)

    def close_other(self) -> None:
        """After `os.fork`, close the other end of this `pair` in this process.

        Call it on the end each process keeps.  The other end's pending
        output is dropped unsent (it belongs to the process that keeps that
        end).  A no-op if the other end is already closed, and in a
        `multiprocessing` child that got this end through ``spawn`` or
        ``forkserver`` (the other end never reached it), so a target can
        call it under any start method.

        Raises:
            ValueError: This channel does not come from `pair`.
        """
        ref = self._other_end
        if ref is None:
            raise ValueError(f"close_other() works on the ends returned by {self._kind}.pair() only")
        other = ref()
        if other is None or other.closed:
            return
        # Whatever the other end had queued belongs to the process that keeps
        # it: this copy drops it unsent, or the peer would receive it twice.
        other._discard_output()
        other.close()

    def _discard_output(self) -> None:
        self._outbox.discard()

    # -- the subclass's locks, never waiting ---------------------------------

    def _send_guard(self) -> Guard:
        """The lock (or gate) that `send` holds, for `fdchannel._guard` to take without waiting."""
        raise NotImplementedError

    def _recv_guard(self) -> Guard:
        """The lock (or gate) that `recv` holds, for `fdchannel._guard` to take without waiting."""
        raise NotImplementedError

    def _wake_waiters(self) -> None:
        """The channel was just marked closed: wake every call waiting on it."""

    def _drop_held(self) -> None:
        """On close: drop the queued output and the buffered fds no call is using."""
        try:
            run_held(self._send_guard(), self._outbox.discard)
        finally:
            run_held(self._recv_guard(), self._drop_buffered)

    def _drop_buffered(self) -> None:
        """Close the fds buffered for messages not yet returned (the caller holds the receive lock)."""
        self._close_held()
        self._decoder.release()

    # -- small public surface ------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The transport this channel was built with."""
        return self._transport

    @property
    def max_held_fds(self) -> int:
        """The most fds this end holds for messages that `recv` has not returned yet.

        A read that leaves more held fails the channel with `LimitExceeded`
        (every fd it held closed).  Default: ``max_fds`` plus 253, one
        message and the fds one write of `send_many` may bring ahead.
        """
        return self._decoder.max_held_fds

    @property
    def frame_timeout(self) -> float | None:
        """Seconds the peer has to complete a message it began, or None (no limit).

        A `recv` that is still waiting for the rest when the time is up fails
        the channel with `LimitExceeded`, closing the fds it held; so does
        the first `recv` after it.  Servers default to 30 s.
        """
        return self._decoder.frame_timeout

    @property
    def budget(self) -> Budget | None:
        """The `Budget` this end's unfinished messages are charged to, or None."""
        return self._decoder.budget

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

    def _check_leftovers(self, recv: bool) -> None:
        """`_check_usable`, after failing the channel if an earlier call on this side left it mid-step.

        That happens when a second signal handler's error struck while the
        first was being handled: the first call's outcome was never recorded.
        The caller holds the side's lock.
        """
        if self._suspect if not recv else (self._delivering or self._decoder.landed):
            self._fail(
                ChannelBroken(
                    f"an earlier {'recv' if recv else 'send'}() was interrupted again while its first "
                    "interrupt was being handled; what it had in hand is unknown, so the stream is unusable"
                )
            )
        self._check_usable()

    def _break(self, exc: FdChannelError) -> None:
        """Mark the channel unusable after *exc* (the first failure is the one named)."""
        if self._broken is None:
            self._broken = exc

    def _fail(self, exc: FdChannelError) -> None:
        """`_break`, and close every fd the decoder holds (the caller holds the receive lock)."""
        self._break(exc)
        self._close_held()

    def _close_held(self) -> None:
        """Close every fd the decoder holds and those a read left landed, each once."""
        decoder = self._decoder
        landed = decoder.landed
        for i in range(len(landed)):
            if landed[i].__class__ is not list:  # a raw result: its fds as one list, in one store
                landed[i] = self._io.landed_fds([landed[i]])
        # Each fd moves into an OwnedFd before any list lets go of it, so a
        # second interrupt here leaves each either listed or owned.
        owners = adopt_all(decoder.fd_lists() + landed)
        decoder.take_fds()
        landed.clear()
        for owner in owners:
            owner.close()

    def _at_eof(self) -> None:
        self._eof = True
        # The peer can no longer take anything: a duplication transport
        # releases the copies it kept for it.
        self._session.peer_closed()

    # -- sending: the non-waiting steps --------------------------------------

    def _message(  # noqa: C901 - every send's first step, inline
        self, payload: Buffer | SealedMemory, fds: Iterable[int | Any]
    ) -> tuple[list[int], int, memoryview | None]:
        """The fd numbers, payload size and pin of a message; raises before anything is written.

        The pin is the view the size was read from, for a payload that could
        change size (anything but ``bytes`` and `SealedMemory`), else None.
        While it lives a resize (by a later message's ``fileno()``, another
        thread, another task) raises `BufferError` where it is tried,
        instead of putting bytes on the stream that no header counts; the
        caller keeps it until the call ends and releases it on its error
        paths (so that the caller's buffer is free while the error is
        handled).  The writes use *payload* itself, never the pin.
        """
        try:
            nums = list(fds)
        except TypeError:
            one = f"; for one fd write fds=[{fds!r}]" if isinstance(fds, int) else ""
            raise TypeError(
                f"fds must be an iterable of fds (ints or objects with fileno()), not "
                f"{type(fds).__name__}{one}"
            ) from None
        for f in nums:
            if f.__class__ is not int or not 0 <= f <= FD_MAX:
                nums = [fileno_of(f) for f in nums]  # objects, or a clear error
                break
        view = None
        if payload.__class__ is bytes:
            size = len(payload)
        elif isinstance(payload, SealedMemory):
            # The payload travels as the message's last fd; the frame's own
            # payload is its size (`Frame.shared` on the other side).
            nums.append(payload.fileno())
            size = SHARED_DESCRIPTOR.size
        else:
            try:
                view = memoryview(payload)
            except TypeError:
                fix = ""
                if isinstance(payload, str):
                    fix = f"; encode text first, e.g. {payload[:20]!r}.encode()"
                raise TypeError(
                    f"the payload must be a bytes-like object (bytes, bytearray, memoryview), "
                    f"not {type(payload).__name__}{fix}"
                ) from None
            if not view.contiguous:
                view.release()
                raise BufferError("the payload must be a contiguous buffer")
            size = view.nbytes
        try:
            if size > self.max_payload or len(nums) > self.max_fds or self._fileno in nums:
                self._refuse(size, nums)
        except BaseException:
            if view is not None:
                view.release()  # refused (or a handler's error): the caller's buffer is free
            raise
        return nums, size, view

    def _refuse(self, size: int, nums: list[int]) -> None:
        """Raise the `ValueError` for a message `send` must not write (the caller's quick check hit).

        Returns only on Windows, for a CRT fd that merely has the number of
        the channel's SOCKET (the two are numbered apart there).
        """
        if self._closed:
            # The closed socket's number may already name another file (the
            # very one being sent): the error is that the channel is closed.
            self._check_usable()
        if size > self.max_payload:
            raise ValueError(f"payload of {size} bytes exceeds max_payload={self.max_payload}")
        nfds = len(nums)
        if nfds > self.max_fds:
            raise ValueError(f"{nfds} fds exceed max_fds={self.max_fds}")
        if sys.platform != "win32" or any(
            n == self._fileno and (n.__class__ is SocketHandle or not _is_crt_fd(n)) for n in nums
        ):
            raise ValueError("refusing to send a channel's own socket over itself")

    def _send_whole(self, payload: Buffer | SealedMemory, nums: list[int], size: int) -> int | None:
        """The send fast path: one write of the whole frame, fds passed through.

        For a simple session (fds in band as given), up to `SCM_MAX_FD` fds
        and nothing queued ahead; the channels test that inline.

        Returns None when all of it left, else the bytes that did (the rest
        is queued: push it with ``before`` set to that).  Raises `OSError`
        with ``characters_written`` 0 when nothing left.
        """
        tag = self._data_tag
        if isinstance(payload, SealedMemory):
            payload, tag = payload.wire, header_tag(self._transport.wire_id, FLAG_SHARED)
        bufs: list[Buffer] = [pack_tagged(tag, len(nums), 0, size), payload]
        try:
            sent = self._write(self._sock, bufs, nums, self._send_flags)
        except BaseException as exc:
            if self._write_raised(exc) and isinstance(exc, OSError):
                _name_bad_fd(exc, nums)
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

        Reads what already arrived (the peer's greeting or acknowledgements
        may be there); raises `BrokenPipeError` if the peer closed without
        greeting, `BlockingIOError` (``ENOBUFS``) if what it waits for is
        queued behind `PUMP_BUDGET` of unreceived data.
        """
        session = self._session
        if not session.waits_for_peer(nums):
            return False
        self._pump_nowait()
        if not session.waits_for_peer(nums):
            return False
        if self._eof:
            raise BrokenPipeError(errno.EPIPE, "the peer closed before its channel announced itself")
        if self._decoder.unread_bytes >= PUMP_BUDGET:
            # What the session waits for is behind data nobody has received:
            # waiting for readability would spin, and reading on would
            # buffer the peer's stream without bound.
            raise BlockingIOError(
                errno.ENOBUFS,
                f"{self._transport.name}: this send waits for the peer's acknowledgements, which are "
                f"queued behind {PUMP_BUDGET} bytes of messages not yet received: "
                "recv() them, then send again",
            )
        return True

    def _start_message(
        self, payload: Buffer | SealedMemory, nums: list[int], size: int
    ) -> tuple[Outgoing, int | None]:
        """Frame a message through the session and write what the socket takes now.

        Returns the session's `Outgoing` (for `_not_taken`) and None when the
        whole frame left, else the bytes of it that did (the rest queued).
        Raises `OSError` with ``characters_written`` 0 and nothing queued.
        """
        out = self._session.outgoing(nums)
        in_band = list(out.in_band)
        outbox = self._outbox
        flags = 0
        if isinstance(payload, SealedMemory):
            payload, flags = payload.wire, FLAG_SHARED
        bufs = outbox.frame(out.aux, len(nums), payload, size, flags)
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
        except BaseException as exc:
            if self._write_raised(exc):
                self._session.discard(out)
                if isinstance(exc, OSError):
                    _name_bad_fd(exc, in_band)
            raise

    def _first_write_raised(self, exc: BaseException, nums: list[int]) -> None:
        """`_write_raised` for a write that carried *nums*, naming a closed fd as `_send_whole` does."""
        if self._write_raised(exc) and isinstance(exc, OSError):
            _name_bad_fd(exc, nums)

    def _write_raised(self, exc: BaseException) -> bool:
        """The first write of a message raised *exc*; True if the message was not taken.

        The kernel's own error means nothing left (``characters_written`` 0).
        Anything else (a signal handler's error, ``KeyboardInterrupt``) may
        have struck after the kernel took bytes: the channel is unusable and
        ``characters_written`` is left unset, the count being unknown.
        """
        if isinstance(exc, OSError) and not raised_in_signal_handler(exc):
            set_written(exc, 0)
            return True
        self._break(self._outbox.interrupted(exc))
        return False

    def _send_interrupted(self, exc: BaseException) -> None:
        """*exc* escaped a send() between its steps: a signal handler's error makes the channel unusable.

        Errors the steps raise themselves were already accounted for.
        """
        if raised_in_signal_handler(exc):
            self._break(self._outbox.interrupted(exc))
        self._suspect = False

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
        if isinstance(exc, OSError) and not raised_in_signal_handler(exc):
            broken = self._outbox.failed(exc, before, written)
        else:
            # KeyboardInterrupt, a signal handler's error, a close from
            # another thread: it may have struck inside a write, after the
            # kernel took bytes we did not count, so a count of 0 is not
            # claimed for a handler's OSError.
            taken = written if before is None else before + written
            if taken or not isinstance(exc, OSError):
                set_written(exc, taken)
            broken = self._outbox.interrupted(exc)
        if broken is not None:
            self._break(broken)

    def _write_now(self) -> int:
        """Write queued chunks as far as the socket takes them without waiting."""
        return write_pending(self._io, self._sock, self._outbox, self._send_flags | self._dontwait)

    # -- transport control frames --------------------------------------------

    def _flush_control_nowait(self) -> None:
        """Send queued control frames if that can be done without waiting (opportunistic)."""
        run_held(self._send_guard(), self._flush_control_held)

    def _flush_control_held(self) -> None:
        """`_flush_control_nowait` for a caller that holds the send lock already."""
        if self._broken is not None or self._closed:
            return
        outbox = self._outbox
        outbox.add_control(self._session.take_control())
        if not outbox.pending:
            return
        try:
            self._write_now()
        except OSError as exc:
            if raised_in_signal_handler(exc):
                self._break(outbox.interrupted(exc))
                raise
            # A vanished peer needs no acknowledgements, and recv() still
            # delivers what it sent before; anything else mid-frame breaks.
            broken = outbox.failed(exc, None, 0)
            if broken is not None:
                self._break(broken)
            return
        for chunk in outbox.pending:
            chunk.detach()  # control frames own their bytes: nothing to duplicate

    def _pump_nowait(self) -> None:
        """Read whatever already arrived, so the session sees the peer's control frames.

        Raises the `ProtocolError` of a malformed control frame or truncated
        control data (the channel is failed); other stream errors wait for
        ``recv()`` to report them.
        """
        # A call inside recv() owns the decoder: reading here could leave it
        # waiting for readability with a whole message already buffered.
        run_held(self._recv_guard(), self._pump_held)

    def _pump_held(self) -> None:
        """`_pump_nowait` for a caller that holds the receive lock."""
        decoder = self._decoder
        read = self._io.read
        try:
            # Bounded, so a peer that streams without pause cannot keep a
            # send() here; reading ahead of recv() stops at PUMP_BUDGET
            # of unread data (control frames behind it then wait for recv()).
            for _ in range(16):
                if decoder.eof or decoder.unread_bytes >= PUMP_BUDGET:
                    break
                # One more read could bring a write's worth of fds: not
                # past max_held_fds for messages nobody asked for yet (as
                # with PUMP_BUDGET, control frames behind them then wait
                # for recv()).
                held = decoder.held_fds()
                if held and held + SCM_MAX_FD > decoder.max_held_fds:
                    break
                one = read(self._sock, decoder, self._dontwait)
                if one is not None:  # pragma: no cover - sessions with control frames queue all
                    decoder.push_back(*one)
                decoder.landed.clear()  # what arrived is the decoder's now
                if decoder.eof and not self._eof:
                    self._at_eof()
        except TruncatedControlData as exc:
            self._fail(exc)
            raise
        except BaseException as exc:
            if isinstance(exc, OSError) and not raised_in_signal_handler(exc):
                pass  # drained (BlockingIOError), or a stream error recv() reports
            else:
                self._recv_interrupted(exc)
                raise
        self._take_control()

    def _take_control(self) -> None:
        """Hand the queued control frames to the session, leaving the data frames for recv().

        Acknowledgements do not depend on the data frames around them, so
        they are handled as soon as they are read.
        """
        try:
            for frame in self._decoder.take_control_frames():
                self._control(frame)
        except BaseException as exc:
            if not isinstance(exc, ProtocolError):
                self._recv_interrupted(exc)  # the frames taken out are lost
            raise

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
        decoder = self._decoder
        try:
            one = self._read_into(self._sock, decoder, flags)
        except TruncatedControlData as exc:
            self._fail(exc)
            raise
        if one is None:
            decoder.landed.clear()  # what arrived is the decoder's now
            if decoder.eof and not self._eof:
                self._at_eof()
            return None
        payload, fds = one
        # The message is in hand from here: set before the list that holds
        # its fds is cleared, so an interrupt always finds them.  The message
        # shares that list (its fds stay numbers until the caller reads
        # msg.fds): an interrupt before the clear makes `_close_held` take
        # each fd out of it, and the lost message then owns none.
        self._delivering = True
        msg = Message._owning(payload, fds)
        decoder.landed.clear()
        return msg

    def _message_of(self, frame: Frame) -> Message:
        """The message of *frame*, first in the queue and not a plain one: then off the queue.

        A shared-memory frame of the plain transport stays queued while its
        fds become the message's (`shared_message` empties its list whatever
        happens), so that a signal handler's error until then leaves them to
        `_close_held`; refused (the memfd fails its checks), it goes.  Any
        other frame goes first: the session takes its fds as it is called.
        """
        decoder = self._decoder
        frames = decoder.frames
        count = len(frame.fds)
        if frame.shared and self._simple and not frame.aux:
            try:
                msg = shared_message(frame.payload, frame.fds)
            except BaseException:
                if not frame.fds and frames and frames[0] is frame:
                    frames.popleft()  # its fds dealt with (closed): the next frame is next
                    if frame.__class__ is not Frame:
                        decoder.took(count)
                raise
            frames.popleft()
            if frame.__class__ is not Frame:  # a Budget counts them: the caller's now
                decoder.took(count)
            return msg
        frames.popleft()
        if frame.__class__ is not Frame:
            decoder.took(count)
        fds = self._incoming(frame)
        if frame.shared:
            return shared_message(frame.payload, fds)
        return Message._owning(frame.payload, fds)

    def _next_message(self) -> Message | None:
        """The next message the decoder holds, or None when it needs more data.

        Raises the decoder's `ProtocolError` (the channel failed) once the
        frames before it are out, and `ChannelClosed` at a clean end of stream.
        """
        decoder = self._decoder
        frames = decoder.frames
        while frames:
            # Taking a frame off the queue loses it if an interrupt strikes.
            self._delivering = True
            frame = frames[0]
            if frame.control:
                frames.popleft()
                self._control(frame)
                continue
            if self._simple and not frame.aux and not frame.shared:
                # The message shares the frame's list of fds until the frame
                # is off the queue: an interrupt in between leaves them to
                # `_close_held`, which takes each out of the list.
                msg = Message._owning(frame.payload, frame.fds)
                frames.popleft()
                if frame.__class__ is not Frame:  # a Budget counts them: the caller's now
                    decoder.took(len(frame.fds))
                return msg
            return self._message_of(frame)
        if decoder.error is not None:
            # Not through a local: the frame of this call would hold the
            # error whose traceback holds the frame, a cycle (with the
            # channel in it) that only the cyclic GC collects.
            self._fail(decoder.error)
            raise decoder.error
        if decoder.eof:
            if not self._eof:
                self._at_eof()
            raise ChannelClosed("the peer closed the channel")
        return None

    def _evicted(self, exc: LimitExceeded) -> None:
        """The `Budget` wants back what this channel holds (called from any thread).

        Idle: fail now, every fd it held closed.  Inside `recv` (another
        thread, or a task waiting in it): shut the socket down so that the
        call wakes; its decoder then fails with *exc* at its next step.
        """
        if self._closed:
            return
        if run_held(self._recv_guard(), lambda: self._evict_held(exc)):
            if self._closed:
                self._drop_held()  # close() in another thread skipped what the lock guarded
        else:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _evict_held(self, exc: LimitExceeded) -> None:
        self._decoder.fail_now(exc)  # its buffers go now too
        self._fail(exc)

    def _expire_unfinished(self) -> None:
        """The unfinished message's ``frame_timeout`` passed: fail the channel, its fds closed.

        Raises `LimitExceeded`.
        """
        exc = self._decoder.expire()
        self._fail(exc)
        raise exc

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
        """A recv() ends with *exc*: anything but the expected errors breaks the channel.

        A signal handler's error is one of the expected ones by type (such as
        ``TimeoutError``) but was not raised by the step it interrupted; it
        breaks the channel unless it struck where nothing was in hand (in a
        wait, or inside a system call that then read nothing).

        If another thread closed the channel during the call, the socket's
        EBADF (or the session's refusal) becomes the closed-channel error.
        """
        if isinstance(exc, self._recv_ok) and not raised_in_signal_handler(exc):
            self._delivering = False  # a message refused for this end alone (PermissionError, ...)
            if self._closed and not isinstance(exc, FdChannelError):
                closed = f"I/O operation on a closed {self._kind}"
                if not (isinstance(exc, ValueError) and exc.args == (closed,)):
                    raise ValueError(closed) from exc
            return
        if raised_in_signal_handler(exc) and not self._decoder.landed and not self._delivering:
            return
        self._recv_interrupted(exc)

    def _recv_lost(self, exc: BaseException, msg: Message) -> None:
        """*exc* struck after recv() had *msg* and before it returned: say it is lost.

        The receive lock is already released, so the decoder is not touched:
        the channel is marked unusable and the message's fds are closed.
        """
        msg.close()
        if self._broken is None:
            broken = ChannelBroken(f"recv() was interrupted by {exc!r} as it returned; a message was lost")
            broken.__cause__ = exc
            self._break(broken)

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
            if self._closing == 1:
                self._finish_close()  # a signal handler's error cut the first close() short
            return
        # A forked copy must not push the creator's queued output a second
        # time, nor read the creator's stream.
        ours = self._pid == os.getpid()
        if ours and self._outbox.pending and self._broken is None:
            run_held(self._send_guard(), self._write_pending_nowait)
        if ours and self._has_control and self._broken is None and not self._eof:
            # Take the peer's control frames (acknowledgements) out of the
            # socket first: closing a Unix socket with unread data resets the
            # connection, and the peer would see ECONNRESET instead of EOF.
            try:
                self._pump_nowait()
            except FdChannelError:
                pass
        self._closing = 1
        self._closed = True
        # The error that broke the channel holds, through its traceback, the
        # frames of the call that met it, and they hold the channel: a
        # cycle that only the cyclic GC would collect, with every buffer in
        # it.  A closed channel reports that it is closed, not why it broke.
        self._broken = None
        self._finish_close()

    def _write_pending_nowait(self) -> None:
        try:
            self._write_now()
        except OSError:
            pass

    def _finish_close(self) -> None:
        """The steps of `close` once the channel is marked closed, each one safe to run again.

        Every step runs however the one before it ended; cut short by a
        signal handler's error, ``_closing`` goes back to 1 (a store with
        no call first) and the next ``close()`` runs them again.  While they
        run it is 2, and a close() meanwhile (another thread's, or a
        handler's inside this one) returns at once, as before they ran.
        ``_closed`` alone is also set by a hand-over, after which the socket
        is somebody else's.
        """
        self._closing = 2
        try:
            try:
                try:
                    self._wake_waiters()
                finally:
                    self._drop_held()
            finally:
                try:
                    if not self._session_closed:
                        self._session_closed = True  # tried: a session is closed once
                        self._session.close()
                finally:
                    self._sock.close()
        except BaseException:
            self._closing = 1
            raise
        self._closing = 0


def _peer_group(sock: socket.socket) -> object:
    """Who is at the other end, for a `Budget`'s fairness: its uid (AF_UNIX) or host (TCP), else None."""
    try:
        if sock.family == getattr(socket, "AF_UNIX", None):
            return ("uid", peer_credentials(sock).uid)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return ("host", sock.getpeername()[0])
    except (OSError, NotImplementedError):
        pass
    return None  # no way to ask: the channel is a peer of its own


def check_holding_limits(
    max_fds: int, max_held_fds: int | None, frame_timeout: float | None, budget: Budget | None
) -> None:
    """Refuse holding limits that could never hold, with the reason."""
    if max_held_fds is not None and max_held_fds < max_fds:
        raise ValueError(
            f"max_held_fds={max_held_fds} is below max_fds={max_fds}: no message with max_fds fds "
            "could ever be received; lower max_fds too"
        )
    if frame_timeout is not None and not frame_timeout > 0:
        raise ValueError(f"frame_timeout must be positive or None, got {frame_timeout!r}")
    if budget is not None and not isinstance(budget, Budget):
        raise TypeError(f"budget must be an fdchannel.Budget, not {type(budget).__name__}")


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


def _name_bad_fd(exc: OSError, nums: list[int]) -> None:
    """Raise an EBADF that names the closed fd instead of *exc* (nothing was sent)."""
    if exc.errno != errno.EBADF or sys.platform == "win32":
        return
    for n in nums:
        try:
            os.fstat(n)
        except OSError:
            bad = OSError(
                errno.EBADF,
                f"fd {n} is not open (Bad file descriptor: closed, or never opened); nothing was sent",
            )
            set_written(bad, 0)
            raise bad from exc


def _is_simple(session: Session) -> bool:
    """True for a session whose fds pass in band as given and that sends no control frames."""
    return session.passthrough and type(session).take_control is Session.take_control
