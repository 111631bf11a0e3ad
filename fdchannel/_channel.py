"""`Channel`: messages of bytes and fds over one connected stream socket."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Self

from typing_extensions import Buffer

from . import _listener, _process
from ._channelbase import PUMP_BUDGET, ChannelBase
from ._codec import _FAST, HEADER_SIZE, Frame, header_tag
from ._errors import ChannelClosed, FdChannelError, ProtocolError, TruncatedControlData
from ._fdutil import close_all
from ._message import Message
from ._ownedfd import OwnedFd, fileno_of
from ._sockio import ANCBUF as _ANCBUF
from ._sockio import FD_PACK as _FD_PACK
from ._sockio import FD_UNPACK as _FD_UNPACK
from ._sockio import MAX_FD_BYTES as _MAX_FD_BYTES
from ._sockio import MSG_CTRUNC as _MSG_CTRUNC
from ._sockio import MSG_DONTWAIT as _MSG_DONTWAIT
from ._sockio import RECV_FLAGS as _RECV_FLAGS
from ._sockio import SEND_FLAGS as _SEND_FLAGS
from ._sockio import finish_read, read_into
from ._sockio import set_written as _set_written
from .transports import Transport
from .transports._unix import SCM_MAX_FD

__all__ = ["DEFAULT_MAX_FDS", "DEFAULT_MAX_PAYLOAD", "Channel"]

_SOL_SOCKET: Final = socket.SOL_SOCKET
_SCM_RIGHTS: Final = socket.SCM_RIGHTS
_pack_fast = _FAST.pack  # (tag, nfds, aux length, payload length), see header_tag
#: The largest fd number a C int holds: SCM_RIGHTS carries ints.
_FD_MAX: Final = 2**31 - 1

DEFAULT_MAX_PAYLOAD: Final = 64 * 1024 * 1024
DEFAULT_MAX_FDS: Final = 1024


class Channel(ChannelBase):
    """A message channel over a connected stream socket.

    Each message is a payload of bytes and any number of fds; the receiver
    gets it back whole as one `Message` whose fds it owns, however the kernel
    split or merged the stream.  The channel owns its socket.

    Sending never takes ownership of the caller's fds: they may be closed as
    soon as `send` returns or raises.  Received fds are non-inheritable.

    Blocking behaviour follows the socket conventions: `settimeout(None)`
    blocks (the default), ``0.0`` (or `setblocking(False)`) never waits and
    raises `BlockingIOError`, a positive timeout raises `TimeoutError` when
    the whole call does not finish in time.  A `send` interrupted that way
    sets ``characters_written`` on the exception: ``0`` means the message was
    not taken (send it again), more means it was taken and its remainder is
    `pending` (call `flush` until it returns; never send it again).

    Concurrent `send` calls from several threads never interleave frames and
    concurrent `recv` calls never split a message.
    """

    _kind = "Channel"

    #: The partner end, for close_other(); set by pair() only (and, for a
    #: pair end rebuilt in a multiprocessing child, to something that
    #: returns None: no partner in that process).
    _other_end: Callable[[], Channel | None] | None = None

    def __init__(
        self,
        sock: socket.socket,
        *,
        transport: Transport | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_fds: int = DEFAULT_MAX_FDS,
    ) -> None:
        """Wrap *sock*, a connected ``SOCK_STREAM`` socket; the channel owns it.

        *max_payload* (bytes) and *max_fds* bound what one message may carry,
        both ways: `send` refuses more with `ValueError` and a peer that
        declares more gets `LimitExceeded`.  A message exactly at a limit is
        allowed.  Raises `ValueError` for a socket the transport cannot use.
        """
        transport, session, decoder = self._open(sock, transport, max_payload, max_fds)
        self._adopt(sock, transport, session, decoder, max_payload=max_payload, max_fds=max_fds)
        self._data_tag = header_tag(transport.wire_id)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._pid = os.getpid()
        timeout = sock.gettimeout()
        self._timeout: float | None = None
        self.settimeout(timeout)
        if self._has_control:
            # A session may greet its peer (WinDuplicate announces its pid);
            # a fresh socket takes that without blocking.
            self._flush_control_nowait()

    # -- construction ---------------------------------------------------

    @classmethod
    def pair(cls, *, transport: Transport | None = None, **kwargs: Any) -> tuple[Channel, Channel]:
        """Return two connected channels over a new AF_UNIX socketpair.

        Both sockets are non-inheritable.  Keyword arguments go to both ends.
        """
        ends = cls._pair(transport, kwargs)
        # Each end can close its partner after a fork (close_other); weak, so
        # the two never keep each other alive.
        ends[0]._other_end, ends[1]._other_end = weakref.ref(ends[1]), weakref.ref(ends[0])
        return ends

    @classmethod
    def from_environ(cls, **kwargs: Any) -> Channel:
        """Return the channel end `fdchannel.spawn` gave this process.

        Wraps the fd named by ``FDCHANNEL_FD`` (keyword arguments go to the
        constructor); the channel owns it and the variable is removed from
        `os.environ`.  Raises `FdChannelError` naming the variable when it is
        missing, not a number, or not a connected AF_UNIX stream socket (the
        fd is then left open and the variable set).
        """
        return _process.channel_from_environ(cls, True, kwargs)

    @classmethod
    def connect(
        cls, path: str | bytes | os.PathLike[Any], *, timeout: float | None = None, **kwargs: Any
    ) -> Channel:
        """Connect to a `Listener` at *path* (``"\\0name"`` for an abstract name).

        *timeout* bounds the connect and stays the channel's timeout, as with
        `socket.create_connection`; other keyword arguments go to the
        constructor.  The new channel is the caller's.  Raises `OSError`
        (`FileNotFoundError`, `ConnectionRefusedError`, `TimeoutError`, ...)
        with nothing left open.
        """
        return _listener.connect(cls, path, timeout, **kwargs)

    def peer_credentials(self) -> _listener.PeerCredentials:
        """The pid, uid and gid of the peer as recorded at connect time (SO_PEERCRED).

        For the ends of `pair` this is the process that created the pair.
        Raises `OSError` from the kernel.
        """
        return _listener.peer_credentials(self._sock)

    def close_other(self) -> None:
        """After `os.fork`, close the other end of this `pair` in this process.

        Call it on the end each process keeps.  The other end's pending
        output is dropped unsent (it belongs to the process that keeps that
        end).  A no-op if the other end is already closed, and in a
        `multiprocessing` child that got this end through ``spawn`` or
        ``forkserver`` (the other end never reached it), so a target can
        call it under any start method; `ValueError` for a channel that does
        not come from `pair`.
        """
        _process.close_other(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # multiprocessing.Process(args=(channel,)) under spawn/forkserver
        # duplicates the fd into the child; anything else is a TypeError.
        return _process.reduce_channel(self)

    # -- socket-like surface ----------------------------------------------

    def gettimeout(self) -> float | None:
        """``None`` when blocking, ``0.0`` when non-blocking, else the timeout."""
        return self._timeout

    def settimeout(self, timeout: float | None) -> None:
        """Set the timeout of each `send`, `recv` and `flush` call, as `socket.settimeout`."""
        if timeout is not None:
            timeout = float(timeout)
            if timeout < 0:
                raise ValueError("timeout must be non-negative or None")
        self._timeout = timeout
        # With a timeout the fd is non-blocking and the channel waits in
        # poll() against a deadline that covers the whole call.
        self._sock.setblocking(timeout is None)

    def setblocking(self, flag: bool) -> None:
        """``setblocking(True)`` is ``settimeout(None)``, ``False`` is ``settimeout(0.0)``."""
        self.settimeout(None if flag else 0.0)

    # -- sending ------------------------------------------------------------

    def send(self, payload: Buffer = b"", fds: Iterable[int | Any] = ()) -> None:
        """Send one message: *payload* and *fds*, delivered together.

        *fds* are ints or objects with ``fileno()`` (files, sockets,
        `OwnedFd`); they stay the caller's.  Raises `ValueError` before
        writing anything when the message exceeds ``max_payload``/``max_fds``
        or names an impossible fd number (negative, a closed file object) or
        the channel's own socket, `BufferError` for a payload that is not
        contiguous, `OSError` (``EBADF``) for a number that is not an open
        fd, also before writing anything; `BlockingIOError`/`TimeoutError`
        with ``characters_written`` as described on the class; other
        `OSError` (such as `BrokenPipeError`) from the kernel.
        """
        nums = list(fds)
        for f in nums:
            if f.__class__ is not int or not 0 <= f <= _FD_MAX:
                nums = [fileno_of(f) for f in nums]  # objects, or a clear error
                break
        if payload.__class__ is bytes:
            size = len(payload)
        else:
            view = memoryview(payload)
            if not view.contiguous:
                raise BufferError("the payload must be a contiguous buffer")
            size = view.nbytes
        nfds = len(nums)
        if size > self.max_payload or nfds > self.max_fds or self._fileno in nums:
            self._refuse(size, nums)
        try:
            with self._send_lock:
                if self._closed or self._broken is not None:
                    self._check_usable()
                writing = False
                try:
                    if self._simple and nfds <= SCM_MAX_FD and not self._pending:
                        # The common case, inlined: fds pass through as they are,
                        # nothing is queued ahead, one sendmsg carries the whole frame.
                        bufs: list[Buffer] = [_pack_fast(self._data_tag, nfds, 0, size), payload]
                        anc = [(_SOL_SOCKET, _SCM_RIGHTS, _FD_PACK[nfds](*nums))] if nfds else ()
                        writing = True
                        try:
                            sent = self._sock.sendmsg(bufs, anc, _SEND_FLAGS)
                        except BlockingIOError:
                            sent = 0
                        except OSError as exc:
                            _set_written(exc, 0)
                            raise
                        if sent != HEADER_SIZE + size:
                            self._queue_rest(bufs, nums, sent)
                        return
                    deadline = self._deadline()
                    if self._has_control:
                        self._pump_nowait()
                        self._queue_control()
                    if self._pending:
                        # Older data goes first; if it cannot all go, this message
                        # is not taken (and the older data stays queued).
                        try:
                            self._push(deadline, this_message=None)
                        except (BlockingIOError, TimeoutError) as exc:
                            _set_written(exc, 0)
                            raise
                    out = self._session.outgoing(nums)
                    try:
                        writing = True
                        written = self._write_frame(out.aux, list(out.in_band), nfds, payload, size)
                        if written is not None:
                            self._push(deadline, this_message=written)
                    except BaseException as exc:
                        if getattr(exc, "characters_written", 1) == 0:
                            self._session.discard(out)
                        raise
                except BaseException as exc:
                    if writing and not isinstance(exc, OSError):
                        self._interrupted(exc)
                    raise
        finally:
            if self._closed:
                self._after_close_race()

    def flush(self) -> None:
        """Send what a non-blocking or timed-out `send` left pending.

        Returns when nothing is pending; raises `BlockingIOError` or
        `TimeoutError` (``characters_written`` = bytes written by this call)
        if the socket fills up first.
        """
        with self._send_lock:
            self._check_usable()
            if self._has_control:
                self._queue_control()
            if self._pending:
                self._push(self._deadline(), this_message=None)

    def _queue_rest(self, bufs: list[Buffer], in_band: list[int], sent: int) -> None:
        """Queue what the inlined sendmsg of `send` did not send, and push it."""
        self._queue_unsent(bufs, in_band, sent)
        self._push(self._deadline(), this_message=sent)

    def _push(self, deadline: float | None, this_message: int | None, dontwait: bool = False) -> None:
        """Write pending chunks until none is left.

        *this_message*: bytes of the current message written before the call
        (``None`` when flushing).  On would-block or timeout the remainder is
        detached from the caller's memory and fds and the error is raised with
        ``characters_written`` set; on any other error mid-frame the channel
        is marked unusable.
        """
        pending = self._pending
        flags = _SEND_FLAGS | (_MSG_DONTWAIT if dontwait else 0)
        written = 0
        try:
            while True:
                written += self._write_pending(flags)
                if not pending:
                    break
                if dontwait:
                    raise BlockingIOError(errno.EAGAIN, "the socket is full")
                self._wait(select.POLLOUT, deadline)
        except (BlockingIOError, TimeoutError) as exc:
            if this_message is None:
                _set_written(exc, written)
            else:
                # Older pending data is always flushed before a message is
                # queued (send() calls with this_message=None for that), so
                # everything pending now belongs to this message.
                _set_written(exc, this_message + written)
                if not this_message + written:
                    pending.clear()  # not taken: nothing of it stays behind
                    raise
            try:
                for chunk in pending:
                    chunk.detach()
            except OSError as dup_error:
                # The rest cannot be kept (no fd left to duplicate into), and
                # the caller may close its fds now: the frame stays cut short.
                self._discard_pending()
                self._broken = ProtocolError(
                    f"the rest of a message could not be kept ({dup_error}): the stream is cut short"
                )
                _set_written(dup_error, getattr(exc, "characters_written", 0))
                raise dup_error from exc
            raise
        except BaseException as exc:
            if pending:
                self._discard_pending()
                # A vanished peer reads nothing more, so a cut frame corrupts
                # nothing; recv() must still deliver what it sent before.
                if not isinstance(exc, BrokenPipeError | ConnectionResetError):
                    self._broken = ProtocolError(f"a frame was cut short by {exc!r}: the stream is corrupt")
            raise

    # -- transport control frames --------------------------------------------

    def _flush_control_nowait(self) -> None:
        """Send queued control frames if that can be done without waiting."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            if self._broken is None and not self._closed:
                self._queue_control()
                if self._pending:
                    try:
                        self._push(None, this_message=None, dontwait=True)
                    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                        # Opportunistic: a full socket waits for the next
                        # send(); a vanished peer needs no acknowledgements,
                        # and recv() still delivers what it sent before.
                        pass
        finally:
            self._send_lock.release()

    def _pump_nowait(self) -> None:
        """Read whatever already arrived, so the transport sees the peer's control frames."""
        if not self._recv_lock.acquire(blocking=False):
            return
        try:
            # Bounded, so a peer that streams without pause cannot keep a
            # send() here; and reading ahead of recv() stops at PUMP_BUDGET
            # of unread data (control frames behind it then wait for recv()).
            decoder = self._decoder
            for _ in range(16):
                if self._eof or decoder.unread_bytes >= PUMP_BUDGET or not self._fill(None, dontwait=True):
                    break
            # Acknowledgements do not depend on the data frames around
            # them, so they are handled now and the data waits for recv().
            for frame in self._decoder.take_control_frames():
                self._session.control(bytes(frame.payload))
        except ProtocolError as exc:
            self._fail(exc)
            raise
        except (BlockingIOError, FdChannelError):
            pass  # recv() reports stream errors
        finally:
            self._recv_lock.release()

    # -- receiving ------------------------------------------------------------

    def recv(self) -> Message:
        """Receive one whole message; its fds are now the caller's.

        Raises `ChannelClosed` when the peer closed between messages,
        `ProtocolError` for anything malformed (after which the channel is
        unusable), `BlockingIOError`/`TimeoutError` when no whole message
        arrived in time (what did arrive stays buffered for the next call).
        """
        try:
            with self._recv_lock:
                if self._closed or self._broken is not None:
                    self._check_usable()
                try:
                    decoder = self._decoder
                    frames = decoder.frames
                    deadline = None
                    while True:
                        while not frames:
                            if decoder.error is not None:
                                self._fail(decoder.error)
                                raise decoder.error
                            if self._eof:
                                raise ChannelClosed("the peer closed the channel")
                            if self._timeout is None:
                                # Blocking: the read simply waits.  The common case of
                                # _sockio.read_into is inlined: one recvmsg bringing
                                # one SCM_RIGHTS entry of whole fds, or none.
                                try:
                                    n, anc, flags, _ = self._sock.recvmsg_into(
                                        [decoder.get_buffer()], _ANCBUF, _RECV_FLAGS
                                    )
                                except ConnectionResetError:
                                    n, anc, flags = 0, [], 0
                                if n and not flags & _MSG_CTRUNC and len(anc) <= 1 and _RECV_FLAGS:
                                    got_fds: tuple[int, ...] | None = ()
                                    if anc:
                                        level, kind, data = anc[0]
                                        got_fds = (
                                            _FD_UNPACK[len(data) >> 2](data)
                                            if level == _SOL_SOCKET
                                            and kind == _SCM_RIGHTS
                                            and not len(data) % 4
                                            and len(data) <= _MAX_FD_BYTES
                                            else None  # something odd: finish_read sorts it out
                                        )
                                    if got_fds is not None:
                                        one = decoder.buffer_updated_one(n, got_fds)
                                        if one is None:
                                            continue
                                        payload, fds = one
                                        if not self._simple:
                                            frames.append(
                                                Frame(
                                                    False,
                                                    len(fds),
                                                    b"",
                                                    payload,
                                                    list(fds),
                                                    decoder.received - n,
                                                )
                                            )
                                            continue
                                        # A lone plain frame, straight to the caller.
                                        if not fds:
                                            return Message(payload, ())
                                        if len(fds) == 1:
                                            return Message(payload, (OwnedFd(fds[0]),))
                                        return Message(payload, tuple(map(OwnedFd, fds)))
                                try:
                                    got = finish_read(decoder, n, anc, flags)
                                except TruncatedControlData as exc:
                                    self._fail(exc)
                                    raise
                                if not got:
                                    self._at_eof()
                                continue
                            if deadline is None and self._timeout:
                                deadline = time.monotonic() + self._timeout
                            self._fill(deadline)
                        frame = frames.popleft()
                        if frame.control:
                            self._control(frame)
                            continue
                        fds = frame.fds if self._simple and not frame.aux else self._incoming(frame)
                        if not fds:
                            return Message(frame.payload, ())
                        if len(fds) == 1:
                            return Message(frame.payload, (OwnedFd(fds[0]),))
                        return Message(frame.payload, tuple(map(OwnedFd, fds)))
                except BaseException as exc:
                    if not isinstance(exc, OSError | FdChannelError | ValueError):
                        self._recv_interrupted(exc)
                    raise
        finally:
            if self._closed:
                self._after_close_race()

    def _after_close_race(self) -> None:
        """close() ran in another thread during a send() or recv(): drop what is held.

        close() skips what a busy lock guards.  Each call checks for a close
        after releasing its lock and close() sets the flag before trying the
        locks, so one of the two always finds the lock free.
        """
        for lock, drop in (
            (self._send_lock, self._discard_pending),
            (self._recv_lock, lambda: close_all(self._decoder.take_fds())),
        ):
            if lock.acquire(blocking=False):
                try:
                    drop()
                finally:
                    lock.release()

    def _fill(self, deadline: float | None, dontwait: bool = False) -> bool:
        """Do one read into the decoder; False if nothing was ready (dontwait)."""
        # The read itself (ancillary data, MSG_CTRUNC, EOF) is shared with
        # AsyncChannel in _sockio; only the waiting differs.
        flags = _MSG_DONTWAIT if dontwait else 0
        while True:
            try:
                got = read_into(self._sock, self._decoder, flags)
                break
            except BlockingIOError:
                if dontwait:
                    return False
                self._wait(select.POLLIN, deadline)
            except TruncatedControlData as exc:
                self._fail(exc)
                raise
        if not got:
            self._at_eof()
        return True

    def __iter__(self) -> Iterator[Message]:
        """Yield messages until the peer closes the channel."""
        while True:
            try:
                yield self.recv()
            except ChannelClosed:
                return

    # -- state ---------------------------------------------------------------

    def _deadline(self) -> float | None:
        timeout = self._timeout
        if timeout is None or timeout == 0.0:
            return None
        return time.monotonic() + timeout

    def _wait(self, events: int, deadline: float | None) -> None:
        """Wait for *events* on the socket, or raise as the timeout says."""
        if self._timeout == 0.0:
            raise BlockingIOError(11, "the channel is non-blocking and the socket is not ready")
        if self._closed:  # by another thread; its fd number may be reused already
            raise ValueError(f"I/O operation on a closed {self._kind}")
        poller = select.poll()
        poller.register(self._fileno, events)
        if deadline is None:
            poller.poll()
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000 + 0.999))):
            raise TimeoutError("timed out")

    def close(self) -> None:
        """Close the socket and every fd the channel still holds.  Idempotent.

        Pending outgoing data is sent if the socket takes it without waiting,
        otherwise dropped.  Messages received but not yet returned by `recv`
        are closed with their fds.
        """
        if self._closed:
            return
        # A forked copy must not push the creator's queued output a second
        # time, and a send() in progress keeps its lock: then nothing is pushed.
        if (
            self._pending
            and self._broken is None
            and self._pid == os.getpid()
            and self._send_lock.acquire(blocking=False)
        ):
            try:
                self._push(None, this_message=None, dontwait=True)
            except OSError:
                pass
            finally:
                self._send_lock.release()
        self._closed = True
        # A thread blocked in send() or recv() keeps its lock (the kernel
        # does not wake it when the socket is closed); it drops what the
        # channel holds itself when its call returns (see send and recv).
        if self._send_lock.acquire(blocking=False):
            try:
                self._discard_pending()
            finally:
                self._send_lock.release()
        if self._recv_lock.acquire(blocking=False):
            try:
                close_all(self._decoder.take_fds())
            finally:
                self._recv_lock.release()
        try:
            self._session.close()
        finally:
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
