"""`Channel`: messages of bytes and fds over one connected stream socket."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import weakref
from collections.abc import Collection, Iterable, Iterator
from typing import Any, Self

from typing_extensions import Buffer

from . import _batch, _fastpath, _handoff, _into, _peer
from ._budget import Budget
from ._codec import HEADER_SIZE, SCM_MAX_FD
from ._core import DEFAULT_MAX_FDS, DEFAULT_MAX_PAYLOAD, ChannelCore
from ._errors import BufferTooShort, ChannelBroken, ChannelClosed, ProtocolError
from ._interrupt import raised_in_signal_handler
from ._message import Message
from ._outbox import set_written
from ._ownedfd import OwnedFd
from ._shared import SealedMemory, share_large
from ._sockio import stall_delay, write_pending
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

    #: True in a forked child until this process claimed the inherited end
    #: (`_handoff.claim_forked_end`) at its first send() or recv().
    _unclaimed = False
    # A slot, not an attribute in the instance dict: send() and recv() read
    # it on every call, and once the compiled path has asked for the dict
    # (it keeps the channel's state there) CPython 3.11 no longer specializes
    # reads of attributes from it; a slot's read stays one instruction
    # (the generic lookup cost about 250).
    __slots__ = ("_fast",)
    #: The compiled send/recv (`fdchannel._fastpath`), None for the Python path.
    _fast: Any

    def __init__(
        self,
        sock: socket.socket,
        *,
        transport: Transport | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_fds: int = DEFAULT_MAX_FDS,
        max_held_fds: int | None = None,
        frame_timeout: float | None = None,
        budget: Budget | None = None,
    ) -> None:
        """Wrap *sock*, a connected ``SOCK_STREAM`` socket; the channel owns it.

        The limits bound what one message may carry, both ways: `send`
        refuses more with `ValueError` and a peer that declares more gets
        `LimitExceeded`.  A message exactly at a limit is allowed.  The
        holding limits (*max_held_fds*, *frame_timeout*, *budget*) bound
        what the peer can make this end hold for messages it has not
        finished or that `recv` has not returned; over one, `recv` raises
        `LimitExceeded` and the channel is unusable
        ([docs: holding limits][holding-limits]).

        Args:
            sock: A connected stream socket (AF_UNIX for `UnixRights`, the
                default on POSIX).  The channel owns it from now on and
                keeps its timeout as the channel's.
            transport: How fds travel; ``None`` means
                `default_transport()`.  Both ends must use the same one.
            max_payload: The largest payload of one message, in bytes
                (default `DEFAULT_MAX_PAYLOAD`, 64 MiB).
            max_fds: The most fds one message may carry (default
                `DEFAULT_MAX_FDS`, 1024).
            max_held_fds: The most fds this end holds for messages not
                returned by `recv` yet (default ``max_fds + 253``; at least
                ``max_fds``).
            frame_timeout: Seconds the peer has to finish a message it
                began (default ``None``: no limit).
            budget: A `Budget` shared with other channels, charged for
                what this one holds for unfinished messages (default
                ``None``).

        Raises:
            ValueError: *sock* is not a stream socket, a limit is negative
                or *max_held_fds* is below *max_fds*, or the transport
                cannot use *sock* (the socket then stays the caller's).
        """
        self._fast = None
        transport, session, decoder = self._open(
            sock, transport, max_payload, max_fds, max_held_fds, frame_timeout, budget
        )
        self._adopt(sock, transport, session, decoder, max_payload=max_payload, max_fds=max_fds)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        _live.add(self)
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

        Both sockets are non-inheritable.  After `os.fork`, each process
        keeps one end and calls `close_other` on it.

        Args:
            transport: The transport of both ends (default:
                `default_transport()`).
            **kwargs: Go to both constructors (``max_payload``, ``max_fds``).

        Returns:
            The two ends, each owned by the caller.

        Raises:
            OSError: The socketpair could not be created (``EMFILE``, ...).
        """
        ends = cls._pair(transport, kwargs)
        # Each end can close its partner after a fork (close_other); weak, so
        # the two never keep each other alive.
        ends[0]._other_end, ends[1]._other_end = weakref.ref(ends[1]), weakref.ref(ends[0])
        return ends

    @classmethod
    def from_environ(cls, **kwargs: Any) -> Channel:
        """Return the channel end `fdchannel.spawn` gave this process.

        Wraps the fd named by ``FDCHANNEL_FD``; the channel owns it and the
        variable is removed from `os.environ`.

        Args:
            **kwargs: Go to the constructor.

        Returns:
            The channel to the parent, owned by the caller.

        Raises:
            FdChannelError: ``FDCHANNEL_FD`` is missing, not a number, or
                not a connected AF_UNIX stream socket (the message names the
                variable; the fd is then left open and the variable set).
        """
        return _handoff.channel_from_environ(cls, True, kwargs)

    @classmethod
    def connect(
        cls,
        path: str | bytes | os.PathLike[Any],
        *,
        timeout: float | None = None,
        expect_uid: int | Collection[int] | None = None,
        **kwargs: Any,
    ) -> Channel:
        """Connect to a `Listener` at *path*.

        Args:
            path: The listener's filesystem path, or ``"\\0name"`` for a
                Linux abstract name.
            timeout: Bounds the connect and stays the channel's timeout, as
                with `socket.create_connection` (``None``: block).
            expect_uid: A uid (or several) the server must run as, checked
                from the kernel's peer credentials before anything is sent:
                anyone may bind an abstract name first, so a client that
                sends fds to one should say whom it expects.  ``None``
                checks nothing.
            **kwargs: Go to the constructor.

        Returns:
            The new channel, owned by the caller.

        Raises:
            OSError: From the connect (`FileNotFoundError` naming the path,
                `ConnectionRefusedError`, `TimeoutError`, ...), with
                nothing left open.
            PermissionError: The server is not one of *expect_uid*; nothing
                was sent.
        """
        sock = _peer.connect_unix(path, timeout, expect_uid)
        try:
            return cls(sock, **kwargs)
        except BaseException:
            sock.close()
            raise

    def _discard_output(self) -> None:
        with self._send_lock:
            self._outbox.discard()

    def __reduce__(self) -> tuple[Any, ...]:
        # multiprocessing.Process(args=(channel,)) under spawn/forkserver
        # duplicates the fd into the child; anything else is a TypeError.
        return _handoff.reduce_channel(self)

    # -- socket-like surface ----------------------------------------------

    def gettimeout(self) -> float | None:
        """The channel's timeout, as `socket.socket.gettimeout`.

        Returns:
            ``None`` when blocking, ``0.0`` when non-blocking, else the
                timeout in seconds.
        """
        return self._timeout

    def settimeout(self, timeout: float | None) -> None:
        """Set the timeout of each `send`, `recv` and `flush` call, as `socket.socket.settimeout`.

        Args:
            timeout: ``None`` blocks, ``0.0`` never waits (the calls raise
                `BlockingIOError`), a positive number of seconds bounds each
                whole call (`TimeoutError`).

        Raises:
            ValueError: *timeout* is negative.
        """
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
        fast = self._fast
        if fast is not None:
            # It makes a call without waiting first when no other thread could
            # run meanwhile, and then needs to know whether to wait after all.
            fast.blocking = self._sock.getblocking()

    def setblocking(self, flag: bool) -> None:
        """Make the channel blocking or non-blocking, as `socket.socket.setblocking`.

        Args:
            flag: ``True`` is ``settimeout(None)``, ``False`` is
                ``settimeout(0.0)``.
        """
        self.settimeout(None if flag else 0.0)

    # -- sending ------------------------------------------------------------

    def send(self, payload: Buffer | SealedMemory = b"", fds: Iterable[int | Any] = ()) -> None:  # noqa: C901, PLR0912, PLR0915 - compiled path first, then the Python one inline
        """Send one message: *payload* and *fds*, delivered together.

        The receiver gets duplicates of the same open files: they share the
        file offset and status flags with the caller's (see
        [what a sent fd shares][what-a-sent-fd-shares]).

        Args:
            payload: The message's bytes (any contiguous bytes-like object),
                borrowed until the call returns: resizing it meanwhile (from
                another thread, or a later ``fileno()``) raises `BufferError`
                where it is tried.
            fds: Ints or objects with ``fileno()`` (files, sockets,
                `OwnedFd`); they stay the caller's, who may close them as
                soon as the call returns or raises.  Each ``fileno()`` is
                called once, as the call begins.

        Raises:
            ValueError: Before writing anything: the message exceeds
                ``max_payload``/``max_fds``, or names an impossible fd
                number (negative, a closed file object) or the channel's own
                socket; also for a call on a closed channel.
            BufferError: The payload is not contiguous.
            OSError: ``EBADF`` before writing anything for a number that is
                not an open fd; otherwise from the kernel (such as
                `BrokenPipeError`).
            BlockingIOError: Non-blocking and the socket is full;
                ``characters_written`` says what happened to the message (as
                described on the class).
            TimeoutError: The timeout expired; ``characters_written`` as for
                `BlockingIOError`.
            ProtocolError: An earlier error left the channel unusable
                (`ChannelBroken` when this end broke it).
        """
        fast = self._fast
        if fast is not None:
            # Inline, not a helper method: a Python call costs as much as a
            # third of the compiled path's own work.
            try:
                sent = fast.send(self, payload, fds)
            except BaseException as exc:
                if fast.sent_whole >= 0:
                    # A signal handler's error as the call returned: the
                    # message had left whole.  Stored here, not by a call:
                    # a call is a point where a second handler's error (a
                    # storm of signals) could replace *exc* before the store.
                    exc.characters_written = fast.sent_whole  # type: ignore[attr-defined]
                raise
            if sent is True:
                return  # the compiled path sent it all (fdchannel._fastpath)
            if sent is not False:
                fds = sent  # the numbers its fileno() calls gave: none runs twice
        if self._share_above is not None:
            payload = share_large(self, payload)
        nums, size, pin = self._message(payload, fds)  # pin: held until the call ends
        done = False
        try:
            with self._send_lock:
                if self._closed or self._broken is not None or self._suspect or self._unclaimed:
                    self._check_leftovers(False)
                    self._claim()
                self._suspect = True
                try:
                    if self._simple and len(nums) <= SCM_MAX_FD and not self._outbox.pending:
                        sent = self._send_whole(payload, nums, size)
                        if sent is not None:
                            self._push(self._deadline(), sent)
                    else:
                        self._send_queued(payload, nums, size)
                except BaseException as exc:
                    if pin is not None:
                        # The caller's buffer is free as it handles the error.
                        # A handler's error here leaves the call suspect, as
                        # one at the next line would.
                        pin.release()
                        pin = None
                    self._send_interrupted(exc)
                    raise
                self._suspect = False
                done = True
        except BaseException as exc:
            if done:
                # A signal handler's error as the lock was released: the
                # message had left whole (stored without a call, as above).
                exc.characters_written = HEADER_SIZE + size  # type: ignore[attr-defined]
                if pin is not None:
                    try:
                        pin.release()
                    except BaseException as again:  # a second handler's error: it says so too
                        again.characters_written = HEADER_SIZE + size  # type: ignore[attr-defined]
                        raise
            else:
                if pin is not None:
                    pin.release()  # raised before any write (or the handler above was cut short)
                if isinstance(exc, OSError | ChannelClosed):
                    self._closed_meanwhile(exc)
            raise
        finally:
            # close() in another thread skips what a busy lock guards, and it
            # sets the flag before trying the locks: one of the two always
            # finds the lock free and drops what the channel holds.
            if self._closed:
                self._drop_held()

    def send_many(self, messages: Iterable[tuple[Buffer | SealedMemory, Iterable[int | Any]]]) -> None:  # noqa: C901, PLR0912, PLR0915 - compiled path first, then the Python one inline
        """Send ``(payload, fds)`` messages in order, as few system calls as the kernel allows.

        Each message arrives as if sent by `send` (the receiver calls
        `recv` once per message); on the default transport consecutive
        messages share one ``sendmsg`` while their fds total at most 253.
        Messages from other threads never come between these.  A payload
        sent as sealed shared memory (a `SealedMemory`, or one above
        `fdchannel.shm.share_above`'s threshold) goes in a write of its own,
        in order.  Needs a peer of this version or later when fds are
        batched (an older one refuses the frames with `ProtocolError`).

        Args:
            messages: ``(payload, fds)`` pairs, each as `send` takes them;
                the fds stay the caller's.

        Raises:
            ValueError: Before writing anything, for a message `send` would
                refuse (every message is checked first); also for a call on
                a closed channel.
            TypeError: A payload or fds of the wrong type, before writing
                anything.
            BufferError: A payload that is not contiguous, likewise.
            BlockingIOError: The call stopped part way (also `TimeoutError`
                and the kernel's `OSError`): the exception's
                ``messages_taken`` counts the messages taken, in order
                (sent, or pending for `flush` when ``characters_written``
                is more than 0); send the rest again.
        """
        fast = self._fast
        if fast is not None:
            try:
                sent = fast.send_many(self, messages)
            except BaseException as exc:
                if fast.sent_many >= 0 and "messages_taken" not in exc.__dict__:  # (no call, as in send)
                    # A signal handler's error as the call returned: all had
                    # left (this thread's count: another thread may have sent
                    # on this channel since).
                    exc.messages_taken = fast.sent_many  # type: ignore[attr-defined]
                raise
            if sent is True:
                return  # one write in C (fdchannel._fastpath), or its rest handed over
            if sent is not False:
                messages = sent  # with the fd numbers its fileno() calls gave: none runs twice
        pins: list[memoryview] = []  # as in send(), each payload held until the call ends
        try:
            prepared = _batch.prepare(self, messages, pins)
            count = len(prepared)  # (a call: not in the handlers below)
        except BaseException:
            if pins:  # (prepare's own release may have been cut short by a second handler's error)
                _batch.release(pins)
            raise
        done = False
        try:
            with self._send_lock:
                if self._closed or self._broken is not None or self._suspect or self._unclaimed:
                    self._check_leftovers(False)
                    self._claim()
                self._suspect = True
                try:
                    if self._simple and not self._outbox.pending:
                        _batch.send_groups(self, prepared, self._deadline())
                    else:
                        _batch.send_each(self, prepared)
                except BaseException as exc:
                    if pins:
                        _batch.release(pins)  # first, as in send()
                    self._send_interrupted(exc)
                    raise
                self._suspect = False
                done = True
        except BaseException as exc:
            if done:
                # A signal handler's error as the lock was released: all had left.
                exc.messages_taken = count  # type: ignore[attr-defined]
                if pins:
                    try:
                        _batch.release(pins)
                    except BaseException as again:  # a second handler's error: it says so too
                        again.messages_taken = count  # type: ignore[attr-defined]
                        raise
            else:
                if pins:
                    _batch.release(pins)  # as in send()
                if isinstance(exc, OSError | ChannelClosed):
                    _batch.closed_meanwhile(self, exc)
            raise
        finally:
            if self._closed:
                self._drop_held()

    def _send_queued(self, payload: Buffer | SealedMemory, nums: list[int], size: int) -> None:
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

        Returns when nothing is pending (at once if nothing was).

        Raises:
            BlockingIOError: Non-blocking and the socket filled up first
                (``characters_written`` is the bytes written by this call).
            TimeoutError: The timeout expired first (``characters_written``
                as for `BlockingIOError`).
            OSError: From the kernel.
            ProtocolError: An earlier error left the channel unusable.
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
        stalls = 0
        try:
            while True:
                n = write_pending(self._io, self._sock, outbox, self._send_flags)
                written += n
                if not outbox.pending:
                    return
                stalls = 0 if n else stalls + 1
                if stalls > 1:
                    self._pause(stall_delay(stalls), deadline)
                self._wait(True, deadline)
        except (BlockingIOError, TimeoutError) as exc:
            if raised_in_signal_handler(exc):
                self._push_failed(exc, before, written)
                raise
            self._push_paused(exc, before, written)
            raise
        except BaseException as exc:
            self._push_failed(exc, before, written)
            raise

    # -- the locks, for the core ----------------------------------------------

    def _claim(self) -> None:
        """First use in a forked child: refuse an end another child already uses (`ValueError`)."""
        if self._unclaimed:
            _handoff.claim_forked_end(self)
            self._unclaimed = False

    def _after_fork(self) -> None:
        """In a child just forked: free the locks that threads of the parent held.

        Those threads do not exist here, so nothing would ever release them.
        Their call was in the middle of the stream (a frame half written, a
        message half read) that the parent goes on with: in the child the
        channel is then unusable and says so, and `close` works at once.
        """
        self._unclaimed = not self._closed
        busy = []
        if self._send_lock.locked():
            self._send_lock = threading.Lock()
            busy.append("send()")
        if self._recv_lock.locked():
            self._recv_lock = threading.Lock()
            busy.append("recv()")
        self._session.after_fork()
        if busy and not self._closed:
            self._break(
                ChannelBroken(
                    f"this process was forked while another thread was inside {' and '.join(busy)}: "
                    "the stream is the parent's mid-call, so this copy can only be closed"
                )
            )

    def _send_guard(self) -> threading.Lock:
        return self._send_lock

    def _recv_guard(self) -> threading.Lock:
        return self._recv_lock

    # -- receiving ------------------------------------------------------------

    def recv(self) -> Message:
        """Receive one whole message; its fds are now the caller's.

        Returns:
            The message; each of its fds is an `OwnedFd` (non-inheritable)
                that the caller owns.  ``with msg:`` closes those not taken.

        Raises:
            ChannelClosed: The peer closed the channel between messages.
            ProtocolError: Anything malformed (`LimitExceeded`,
                `TruncatedControlData`, ...); the channel is unusable after.
            BlockingIOError: Non-blocking and no whole message has arrived
                (what did arrive stays buffered for the next call).
            TimeoutError: No whole message arrived within the timeout
                (likewise nothing is lost).
            OSError: From the kernel, with its errno.
            ValueError: The channel is closed.
        """
        fast = self._fast
        if fast is not None:
            try:
                msg: Message | None = fast.recv(self)
            except BaseException as exc:
                lost = fast.delivered
                if lost is not None:
                    # A signal handler's error as the call returned the message.
                    # First a mark that needs no call: should a second
                    # handler's error cut the call below short, the next
                    # recv() still says the message was lost (_check_leftovers).
                    self._delivering = True
                    fast.delivered = None
                    self._recv_lost(exc, lost)
                raise
            if msg is not None:
                del fast[msg]  # it reached us: no longer in flight (no call: see _speedups.c)
                return msg  # one read, one message, in C (fdchannel._fastpath)
        return self._recv(None)

    def recv_into(self, buffer: Buffer) -> tuple[int, tuple[OwnedFd, ...]]:
        """Receive one whole message with its payload written into *buffer*.

        A large payload is read by the kernel straight into *buffer*: no
        buffer is allocated and nothing is copied per message.  *buffer* is
        free for reuse as soon as the call returns or raises.  A payload that
        came as sealed shared memory is copied in, and the memory let go.

        Args:
            buffer: A writable, contiguous buffer.

        Returns:
            ``(nbytes, fds)``: the payload is ``buffer[:nbytes]`` and *fds*
                are the message's `OwnedFd` objects, now the caller's.

        Raises:
            TypeError: A read-only buffer.
            BufferError: A buffer that is not contiguous.
            BufferTooShort: The payload does not fit (a `ValueError`): the
                whole message is on the exception, nothing is lost.
            ChannelClosed: As for `recv`, and every other error of `recv`,
                with the same meaning.
        """
        view = _into.writable_bytes(buffer)
        msg = self._recv(view)
        try:
            return _into.place(msg, view)
        except BufferTooShort:
            raise  # the whole message is on it: nothing lost
        except BaseException as exc:
            # Out of memory, or a signal handler's error, with the message in
            # hand: lost, and the channel says so, as recv() does.
            self._delivering = True  # (no call first: see Channel.recv)
            self._recv_lost(exc, msg)
            raise

    def _recv(self, into: memoryview | None) -> Message:  # noqa: C901, PLR0912, PLR0915 - one loop for recv and recv_into
        """`recv`, and `recv_into` when *into* is its buffer."""
        msg: Message | None = None
        try:
            with self._recv_lock:
                if (
                    self._closed
                    or self._broken is not None
                    or self._delivering
                    or self._decoder.landed
                    or self._unclaimed
                ):
                    self._check_leftovers(True)
                    self._claim()
                decoder = self._decoder
                deadline = None
                if into is not None:  # (recv(): no call)
                    _into.offer(decoder, into)
                try:
                    while True:
                        if decoder.frames or decoder.error is not None or decoder.eof:
                            msg = self._next_message()
                            if msg is not None:
                                self._delivering = False
                                return msg
                        unfinished = decoder.deadline  # a frame_timeout runs
                        try:
                            if unfinished is not None:
                                msg = self._read_unfinished(unfinished)
                            else:
                                # Blocking (no timeout): the read itself waits,
                                # unless the buffer grew (it shrinks before a wait).
                                msg = self._read(self._dontwait if decoder.grown else 0)
                        except BlockingIOError as exc:
                            if raised_in_signal_handler(exc):
                                raise
                            if decoder.grown:
                                decoder.shrink()  # idle: the large buffer goes back
                            if deadline is None and self._timeout:
                                deadline = time.monotonic() + self._timeout
                            unfinished = decoder.deadline
                            if unfinished is not None and (deadline is None or unfinished < deadline):
                                self._wait_unfinished(unfinished)
                            else:
                                self._wait(False, deadline)
                            continue
                        if msg is not None:
                            self._delivering = False
                            return msg
                except BaseException as exc:
                    self._recv_stopped(exc)
                    raise
                finally:
                    if into is not None:
                        decoder.set_into(None)
        except BaseException as exc:
            if msg is not None:
                self._delivering = True  # (no call first: see Channel.recv)
                self._recv_lost(exc, msg)
            raise
        finally:
            # close() in another thread skips what a busy lock guards, and it
            # sets the flag before trying the locks: one of the two always
            # finds the lock free and drops what the channel holds.
            if self._closed:
                self._drop_held()

    def __iter__(self) -> Iterator[Message]:
        """Yield messages until the peer closes the channel.

        Yields:
            Each message, as `recv` returns it; `ChannelClosed` ends the
                loop, and any other error of `recv` propagates.
        """
        while True:
            try:
                yield self.recv()
            except ChannelClosed:
                return

    def _recv_stopped(self, exc: BaseException) -> None:
        super()._recv_stopped(exc)
        # The end of the stream too: close() shuts the socket down to wake
        # this call, which may then read EOF in the middle of a frame (a
        # ProtocolError) before it sees the flag.
        if isinstance(exc, OSError | ChannelClosed) or (isinstance(exc, ProtocolError) and self._decoder.eof):
            self._closed_meanwhile(exc)

    def _closed_meanwhile(self, exc: BaseException) -> None:
        """Raise `ValueError` instead of *exc* if `close` in another thread cut the call short."""
        if self._closed:
            raise ValueError(f"{self._kind} closed by another thread during the call") from exc

    def _wake_waiters(self) -> None:
        # A thread blocked in poll() or in the kernel's recvmsg/sendmsg on
        # this socket is not woken by close(): shutting the socket down wakes
        # it (the call then raises ValueError).  Only when a call is in
        # progress here, since shutdown() also ends the socket for any other
        # process holding a copy.
        if self._recv_lock.locked() or self._send_lock.locked():
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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

    def _pause(self, delay: float, deadline: float | None) -> None:
        """Sleep *delay* seconds, never past *deadline* (a write that cannot go yet: `stall_delay`)."""
        if deadline is not None:
            delay = min(delay, deadline - time.monotonic())
        if delay > 0 and self._timeout != 0.0:
            time.sleep(delay)

    def _wait(self, write: bool, deadline: float | None) -> None:
        """Wait until the socket is writable (or readable), or raise as the timeout says."""
        if self._timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, "the channel is non-blocking and the socket is not ready")
        if self._closed:  # by another thread; its fd number may be reused already
            raise ValueError(f"I/O operation on a closed {self._kind}")
        if not wait_ready((self._fileno,), write=write, deadline=deadline):
            raise TimeoutError("timed out")

    def _read_unfinished(self, unfinished: float) -> Message | None:
        """`_read`, for a message begun and not finished: never blocks past its deadline (*unfinished*)."""
        if self._dontwait:
            return self._read(self._dontwait)
        if self._timeout is None:
            # A blocking socket and no MSG_DONTWAIT (Windows): wait first.
            self._wait_unfinished(unfinished)
        return self._read(0)

    def _wait_unfinished(self, unfinished: float) -> None:
        """Wait for more of the unfinished message, until its deadline (then fail the channel)."""
        if self._timeout == 0.0:
            if time.monotonic() >= unfinished:
                self._expire_unfinished()
            raise BlockingIOError(errno.EAGAIN, "the channel is non-blocking and the socket is not ready")
        if self._closed:
            raise ValueError(f"I/O operation on a closed {self._kind}")
        if not wait_ready((self._fileno,), deadline=unfinished):
            self._expire_unfinished()

    def close(self) -> None:
        """Close the socket and every fd the channel still holds.  Idempotent.

        Pending outgoing data is sent if the socket takes it without waiting,
        otherwise dropped.  Messages received but not yet returned by `recv`
        are closed with their fds.  A thread blocked in `send` or `recv` is
        woken (the socket is shut down first when a call is in progress:
        closing an fd wakes no thread blocked on it) and its call raises
        `ValueError`; what the call held is dropped.
        """
        super().close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_fastpath.register(Channel)

#: Every open Channel of this process, for `_after_fork_in_child`.
_live: weakref.WeakSet[Channel] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for channel in list(_live):
        channel._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
