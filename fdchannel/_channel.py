"""`Channel`: messages of bytes and fds over one connected stream socket."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self

from typing_extensions import Buffer

from . import _batch, _fastpath, _handoff, _into, _peer
from ._codec import SCM_MAX_FD
from ._core import DEFAULT_MAX_FDS, DEFAULT_MAX_PAYLOAD, ChannelCore
from ._errors import ChannelClosed
from ._message import Message
from ._outbox import set_written
from ._ownedfd import OwnedFd
from ._sockio import write_pending
from ._wait import wait_ready
from .transports import Transport

__all__ = ["DEFAULT_MAX_FDS", "DEFAULT_MAX_PAYLOAD", "Channel"]


class Channel(ChannelCore):
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
    #: The compiled send/recv (`fdchannel._fastpath`), None for the Python path.
    _fast: Any = None

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
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        timeout = sock.gettimeout()
        self._timeout: float | None = None
        self.settimeout(timeout)
        if self._has_control:
            # A session may greet its peer (WinDuplicate announces its pid);
            # a fresh socket takes that without blocking.
            self._flush_control_nowait()
        self._fast = _fastpath.attach(self)

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
        return _handoff.channel_from_environ(cls, True, kwargs)

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
        sock = _peer.connect_unix(path, timeout)
        try:
            return cls(sock, **kwargs)
        except BaseException:
            sock.close()
            raise

    def peer_credentials(self) -> _peer.PeerCredentials:
        """The pid, uid and gid of the peer as recorded at connect time (SO_PEERCRED).

        For the ends of `pair` this is the process that created the pair.
        Raises `OSError` from the kernel.
        """
        return _peer.peer_credentials(self._sock)

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
        ref = self._other_end
        if ref is None:
            raise ValueError("close_other() works on the ends returned by Channel.pair() only")
        other = ref()
        if other is None or other.closed:
            return
        # Whatever the other end had queued belongs to the process that keeps
        # it: this copy drops it unsent, or the peer would receive it twice.
        with other._send_lock:
            other._outbox.discard()
        other.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # multiprocessing.Process(args=(channel,)) under spawn/forkserver
        # duplicates the fd into the child; anything else is a TypeError.
        return _handoff.reduce_channel(self)

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
        # poll() against a deadline that covers the whole call.  Where no
        # per-call MSG_DONTWAIT exists (Windows) it stays non-blocking even
        # without one, so the calls that must never wait cannot block.
        self._sock.setblocking(timeout is None and bool(self._dontwait))

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
        `OSError` (such as `BrokenPipeError`) from the kernel;
        `ProtocolError` if an earlier error left the channel unusable
        (`ChannelBroken` when this end broke it).
        """
        fast = self._fast
        if fast is not None and fast.send(self, payload, fds):
            return  # the compiled path sent it all (fdchannel._fastpath)
        nums, size = self._message(payload, fds)
        try:
            with self._send_lock:
                if self._closed or self._broken is not None:
                    self._check_usable()
                if self._simple and len(nums) <= SCM_MAX_FD and not self._outbox.pending:
                    sent = self._send_whole(payload, nums, size)
                    if sent is not None:
                        self._push(self._deadline(), sent)
                    return
                self._send_queued(payload, nums, size)
        finally:
            # close() in another thread skips what a busy lock guards, and it
            # sets the flag before trying the locks: one of the two always
            # finds the lock free and drops what the channel holds.
            if self._closed:
                self._drop_held()

    def send_many(self, messages: Iterable[tuple[Buffer, Iterable[int | Any]]]) -> None:
        """Send ``(payload, fds)`` messages in order, as few system calls as the kernel allows.

        Each message arrives as if sent by `send` (the receiver calls
        `recv` once per message); on the default transport consecutive
        messages share one ``sendmsg`` while their fds total at most 253.
        Every message is checked first: a bad one raises as `send` would
        (`ValueError`, `TypeError`, `BufferError`) before anything is
        written.  Messages from other threads never come between these.
        The fds stay the caller's.

        When the call stops part way (`BlockingIOError`, `TimeoutError`, a
        kernel error), the exception's ``messages_taken`` counts the
        messages taken, in order (sent, or pending for `flush` when
        ``characters_written`` is more than 0); send the rest again.
        Needs a peer of this version or later when fds are batched (an
        older one refuses the frames with `ProtocolError`).
        """
        prepared = _batch.prepare(self, messages)
        try:
            with self._send_lock:
                if self._closed or self._broken is not None:
                    self._check_usable()
                if self._simple and not self._outbox.pending:
                    _batch.send_groups(self, prepared, self._deadline())
                else:
                    _batch.send_each(self, prepared)
        finally:
            if self._closed:
                self._drop_held()

    def _send_queued(self, payload: Buffer, nums: list[int], size: int) -> None:
        """The general send: control frames and older data first, then the message."""
        deadline = self._deadline()
        try:
            self._prepare_send()
            delay = 0.0005
            while self._peer_needed(nums):
                if self._recv_lock.locked():
                    # A recv() in another thread reads the greeting for us.
                    self._check_deadline(deadline)
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
                else:
                    self._wait(False, deadline)
            if self._outbox.pending:
                # Older data goes first; if it cannot all go, this message
                # is not taken (and the older data stays queued).
                self._push(deadline, None)
        except BaseException as exc:
            set_written(exc, 0)
            raise
        out, sent = self._start_message(payload, nums, size)
        if sent is None:
            return
        try:
            self._push(deadline, sent)
        except BaseException as exc:
            self._not_taken(exc, out)
            raise

    def flush(self) -> None:
        """Send what a non-blocking or timed-out `send` left pending.

        Returns when nothing is pending; raises `BlockingIOError` or
        `TimeoutError` (``characters_written`` = bytes written by this call)
        if the socket fills up first.
        """
        with self._send_lock:
            self._check_usable()
            if self._has_control:
                self._outbox.add_control(self._session.take_control())
            if self._outbox.pending:
                self._push(self._deadline(), None)

    def _push(self, deadline: float | None, before: int | None) -> None:
        """Write queued chunks until none is left, waiting in poll() against *deadline*.

        *before*: bytes of the current message written before the call
        (``None`` when flushing older data).  How a stop or a failure ends
        the message is the outbox's rule (`Outbox.paused`, `Outbox.failed`).
        """
        outbox = self._outbox
        written = 0
        try:
            while True:
                written += write_pending(self._io, self._sock, outbox, self._send_flags)
                if not outbox.pending:
                    return
                self._wait(True, deadline)
        except (BlockingIOError, TimeoutError) as exc:
            self._push_paused(exc, before, written)
            raise
        except BaseException as exc:
            self._push_failed(exc, before, written)
            raise

    # -- the locks, for the core ----------------------------------------------

    def _claim_send(self) -> bool:
        return self._send_lock.acquire(blocking=False)

    def _release_send(self) -> None:
        self._send_lock.release()

    def _claim_recv(self) -> bool:
        return self._recv_lock.acquire(blocking=False)

    def _release_recv(self) -> None:
        self._recv_lock.release()

    # -- receiving ------------------------------------------------------------

    def recv(self) -> Message:
        """Receive one whole message; its fds are now the caller's.

        Raises `ChannelClosed` when the peer closed between messages,
        `ProtocolError` for anything malformed (after which the channel is
        unusable), `BlockingIOError`/`TimeoutError` when no whole message
        arrived in time (what did arrive stays buffered for the next call).
        """
        fast = self._fast
        if fast is not None:
            msg: Message | None = fast.recv(self)
            if msg is not None:
                return msg  # one read, one message, in C (fdchannel._fastpath)
        return self._recv(None)

    def recv_into(self, buffer: Buffer) -> tuple[int, tuple[OwnedFd, ...]]:
        """Receive one whole message with its payload written into *buffer*.

        Returns ``(nbytes, fds)``: the payload is ``buffer[:nbytes]`` and
        *fds* are the message's `OwnedFd` objects, now the caller's.  A large
        payload is read by the kernel straight into *buffer*: no buffer is
        allocated and nothing is copied per message.  *buffer* is free for
        reuse as soon as the call returns or raises.

        Raises `TypeError` for a read-only buffer, `BufferError` for one that
        is not contiguous, `BufferTooShort` (a `ValueError`) when the payload
        does not fit (the whole message is on the exception, nothing is
        lost), and whatever `recv` raises, with the same meaning.
        """
        view = _into.writable_bytes(buffer)
        msg = self._recv(view)
        return _into.place(msg, view)

    def _recv(self, into: memoryview | None) -> Message:  # noqa: C901 - one loop for recv and recv_into
        """`recv`, and `recv_into` when *into* is its buffer."""
        try:
            with self._recv_lock:
                if self._closed or self._broken is not None:
                    self._check_usable()
                decoder = self._decoder
                deadline = None
                _into.offer(decoder, into)
                try:
                    while True:
                        if decoder.frames or decoder.error is not None or decoder.eof:
                            msg = self._next_message()
                            if msg is not None:
                                return msg
                        try:
                            # Blocking (no timeout): the read itself waits.
                            msg = self._read(0)
                        except BlockingIOError:
                            if deadline is None and self._timeout:
                                deadline = time.monotonic() + self._timeout
                            self._wait(False, deadline)
                            continue
                        if msg is not None:
                            return msg
                except BaseException as exc:
                    self._recv_stopped(exc)
                    raise
                finally:
                    if into is not None:
                        decoder.set_into(None)
        finally:
            # close() in another thread skips what a busy lock guards, and it
            # sets the flag before trying the locks: one of the two always
            # finds the lock free and drops what the channel holds.
            if self._closed:
                self._drop_held()

    def __iter__(self) -> Iterator[Message]:
        """Yield messages until the peer closes the channel."""
        while True:
            try:
                yield self.recv()
            except ChannelClosed:
                return

    # -- waiting -------------------------------------------------------------

    def _deadline(self) -> float | None:
        timeout = self._timeout
        if timeout is None or timeout == 0.0:
            return None
        return time.monotonic() + timeout

    def _check_deadline(self, deadline: float | None) -> None:
        if self._timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, "the channel is non-blocking and the peer has not spoken yet")
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("timed out")

    def _wait(self, write: bool, deadline: float | None) -> None:
        """Wait until the socket is writable (or readable), or raise as the timeout says."""
        if self._timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, "the channel is non-blocking and the socket is not ready")
        if self._closed:  # by another thread; its fd number may be reused already
            raise ValueError(f"I/O operation on a closed {self._kind}")
        if not wait_ready((self._fileno,), write=write, deadline=deadline):
            raise TimeoutError("timed out")

    def close(self) -> None:
        """Close the socket and every fd the channel still holds.  Idempotent.

        Pending outgoing data is sent if the socket takes it without waiting,
        otherwise dropped.  Messages received but not yet returned by `recv`
        are closed with their fds.  A thread blocked in `send` or `recv`
        keeps what its call holds and drops it when the call returns (the
        kernel does not wake it when the socket is closed).
        """
        super().close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
