"""asyncio support: `AsyncChannel`, `connect` and `start_server`.

`AsyncChannel` is the asyncio twin of `fdchannel.Channel`: the same wire
format, the same sans-IO decoder, the same transports, over a non-blocking
socket driven by the event loop's reader/writer callbacks (no thread per
channel).  It works on the default event loop and on uvloop.

Cancellation (and so ``asyncio.timeout()``) is safe at every ``await``:

* a cancelled `AsyncChannel.recv` loses nothing: whatever was read stays
  buffered in the channel and the next ``recv()`` returns it;
* a cancelled `AsyncChannel.send` never corrupts the stream.  If no byte of
  the message had been written, the message is not sent.  Otherwise the
  message is *taken*: its remainder (payload copied, fds duplicated, so the
  caller may close its own at once) is finished before anything else is
  written, by the next ``send()`` or by `AsyncChannel.flush`.  The
  ``CancelledError`` carries ``characters_written`` (``0``: not taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import time
import warnings
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Final, Literal, Self

from typing_extensions import Buffer

from . import _batch
from ._async_surface import AsyncSurface
from ._budget import Budget
from ._channel import Channel
from ._codec import HEADER_SIZE, SCM_MAX_FD, Decoder
from ._core import DEFAULT_MAX_FDS, DEFAULT_MAX_PAYLOAD
from ._errors import ChannelClosed, FdChannelError, LimitExceeded
from ._interrupt import raised_in_signal_handler
from ._listener import SERVER_FRAME_TIMEOUT, Listener
from ._message import Message
from ._outbox import set_written
from ._peer import (
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_MAX,
    PeerCredentials,
    backlog_full,
    check_server,
    connect_step,
    unix_address,
    unix_socket,
)
from ._shared import SealedMemory, share_large
from .transports import Session, Transport

__all__ = ["AsyncChannel", "Server", "connect", "start_server"]

_log = logging.getLogger("fdchannel.aio")

#: After this many operations in a row that completed without waiting, one
#: ``await asyncio.sleep(0)``: a peer that keeps the socket ready must not
#: starve the other tasks of the loop.
_FAIRNESS: Final = 64


class _Gate:
    """A FIFO lock whose free case takes no ``await``: a call takes it synchronously.

    `asyncio.Lock` can only be taken by awaiting a coroutine, which the
    fast paths of `AsyncChannel` would pay on every message.  Ownership is
    handed to the next waiter on `leave`; a waiter cancelled after the hand-
    over passes it on, so the gate is never lost.  The channel leaves it
    inline, and runs `leave` again if a signal handler's error cut it short
    (``_turns`` did not move): no hand-over is lost or made twice.
    """

    __slots__ = ("_busy", "_turns", "_waiters")

    def __init__(self) -> None:
        self._busy = False
        self._turns = 0  # hand-overs and releases `leave` completed
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._busy

    def try_enter(self) -> bool:
        """Take the gate if it is free and nobody is queued for it."""
        if self._busy or self._waiters:
            return False
        self._busy = True
        return True

    async def enter(self) -> None:
        """Wait for the gate (FIFO).  Cancelled: the gate is not taken."""
        if self.try_enter():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.leave()  # handed over just as we were cancelled: pass it on
            elif fut in self._waiters:
                # (leave() may have dropped it already, skipping it as done)
                self._waiters.remove(fut)
            raise

    def leave(self) -> None:
        """Release the gate, handing it to the first live waiter.

        A woken waiter stays listed until the hand-over ends, so that a run
        cut short after waking it finds it again (woken, not cancelled) and
        wakes no second one.
        """
        waiters = self._waiters
        while waiters:
            fut = waiters[0]
            if not fut.done():
                fut.set_result(None)  # the gate stays busy: it is theirs now
            elif fut.cancelled():
                del waiters[0]
                continue
            del waiters[0]
            self._turns += 1
            return
        self._busy = False
        self._turns += 1


class AsyncChannel(AsyncSurface):
    """A message channel over a connected stream socket, for asyncio.

    Each message is a payload of bytes and any number of fds; the receiver
    gets it back whole as one `Message` whose fds it owns.  The channel owns
    its socket (made non-blocking) and every fd it received but has not yet
    returned.  Sending never takes ownership of the caller's fds: close them
    as soon as ``send()`` returns or raises (also when it was cancelled).

    One channel belongs to one event loop (the first that waits on it).
    Several tasks may call `send` at once (frames never interleave) and
    several may call `recv` at once (each gets whole messages).

    Errors: `ChannelClosed` when the peer closed between messages,
    `ProtocolError` for anything malformed (the channel is unusable after
    it), `OSError` subclasses from the kernel with errno intact, `ValueError`
    for calls on a closed channel.  See the module docstring for what
    cancellation does.
    """

    _kind = "AsyncChannel"
    _recv_ok = (OSError, FdChannelError, ValueError, asyncio.CancelledError)

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

        The socket is made non-blocking.  The limits bound one message both
        ways, as on `fdchannel.Channel` (a message exactly at a limit is
        allowed).

        Args:
            sock: A connected stream socket; the channel owns it from now on.
            transport: How fds travel; ``None`` means
                `default_transport()`.  Both ends must use the same one.
            max_payload: The largest payload of one message, in bytes
                (default `DEFAULT_MAX_PAYLOAD`, 64 MiB).
            max_fds: The most fds one message may carry (default
                `DEFAULT_MAX_FDS`, 1024).
            max_held_fds: The most fds held for messages not returned by
                `recv` yet, as on `fdchannel.Channel`.
            frame_timeout: Seconds the peer has to finish a message it
                began (default ``None``: no limit).
            budget: A `fdchannel.Budget` shared with other channels
                (default ``None``).

        Raises:
            ValueError: *sock* is not a stream socket, a limit is negative
                or *max_held_fds* is below *max_fds*, or the transport
                cannot use *sock* (the socket then stays the caller's).
        """
        transport, session, decoder = self._open(
            sock, transport, max_payload, max_fds, max_held_fds, frame_timeout, budget
        )
        self._setup(sock, transport, session, decoder, max_payload=max_payload, max_fds=max_fds)

    def _setup(
        self,
        sock: socket.socket,
        transport: Transport,
        session: Session,
        decoder: Decoder,
        *,
        max_payload: int,
        max_fds: int,
        greet: bool = True,
    ) -> None:
        sock.setblocking(False)
        self._adopt(sock, transport, session, decoder, max_payload=max_payload, max_fds=max_fds)
        self._send_gate = _Gate()
        self._recv_gate = _Gate()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Reader/writer callbacks stay registered after a wake-up until one
        # fires with nobody waiting: a receiver that waits again and again
        # then costs no epoll_ctl pair per message.
        self._reading = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._writing = False
        self._write_waiter: asyncio.Future[None] | None = None
        self._streak = 0
        if greet and self._has_control:
            # A session may greet its peer (WinDuplicate announces its pid);
            # a fresh socket takes that without waiting.
            self._flush_control_nowait()

    # -- construction ---------------------------------------------------

    @classmethod
    def pair(cls, *, transport: Transport | None = None, **kwargs: Any) -> tuple[AsyncChannel, AsyncChannel]:
        """Return two connected channels over a new AF_UNIX socketpair.

        Both sockets are non-inheritable.

        Args:
            transport: The transport of both ends (default:
                `default_transport()`).
            **kwargs: Go to both constructors (``max_payload``, ``max_fds``).

        Returns:
            The two ends, each owned by the caller.

        Raises:
            OSError: The socketpair could not be created.
        """
        ends = cls._pair(transport, kwargs)
        # Each end can close its partner after a fork (close_other).
        ends[0]._other_end, ends[1]._other_end = weakref.ref(ends[1]), weakref.ref(ends[0])
        return ends

    @classmethod
    async def connect(cls, path: str | bytes | os.PathLike[Any], **kwargs: Any) -> AsyncChannel:
        """Connect to the `start_server` (or `fdchannel.Listener`) at *path*: `fdchannel.aio.connect`."""
        return await connect(path, **kwargs)

    @classmethod
    def from_channel(cls, channel: Channel) -> AsyncChannel:
        """Take over a blocking `Channel`: its socket and all of its state.

        The new channel owns the socket, the messages and fds *channel* had
        received but not yet returned, and any remainder of a message a
        timed-out or non-blocking ``send()`` left pending (it is finished
        first).  Transport and limits carry over.  *channel* is closed
        afterwards without closing anything (its ``closed`` is true and its
        methods raise `ValueError`).

        Args:
            channel: The blocking channel to take over.

        Returns:
            The new channel, owned by the caller.

        Raises:
            ValueError: *channel* is closed, or it is an end inherited
                across ``fork`` that another child uses already (nothing
                moves).
            RuntimeError: Another thread is inside *channel*'s ``send()`` or
                ``recv()`` (nothing moves).
        """
        return cls._take_over(channel)

    # -- waiting on the loop ------------------------------------------------

    def _enter_loop(self) -> None:
        """At each public call, before any gate: bind the channel to the running loop.

        A channel whose loop has been closed (one ``asyncio.run()`` after
        another) moves to the running one; only here, with no gate held.
        """
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop is loop:
            self._loop = loop
            return
        if not self._loop.is_closed():
            raise RuntimeError(f"{self!r} is bound to another event loop")
        # The old loop's reader and writer went with it.  New gates too: a
        # task abandoned with the old loop may still hold one.
        self._loop = loop
        self._reading = self._writing = False
        self._read_waiter = self._write_waiter = None
        self._send_gate = _Gate()
        self._recv_gate = _Gate()

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        """The channel's loop, which must be the running one (see `_enter_loop`)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(f"{self!r} is bound to another event loop")
        return loop

    async def _wait_readable(self) -> None:
        """Wait until the socket is readable.  On close: `ChannelClosed`."""
        loop = self._bind_loop()
        if _lacks_readiness(loop):
            await self._wait_readable_proactor(loop)
            return
        fut: asyncio.Future[None] = loop.create_future()
        self._read_waiter = fut
        if not self._reading:
            loop.add_reader(self._fileno, self._on_readable)
            self._reading = True
        try:
            await fut
        except BaseException:
            # Cancelled: stop watching now; nobody may come back for it.
            self._read_waiter = None
            self._stop_reading()
            raise
        self._read_waiter = None
        if self._closed:
            raise ChannelClosed("the channel was closed while waiting in recv()")

    async def _wait_unfinished(self, unfinished: float) -> None:
        """Wait for more of a message begun, until its deadline (then fail the channel)."""
        remaining = unfinished - time.monotonic()
        if remaining > 0:
            try:
                async with asyncio.timeout(remaining):
                    await self._wait_readable()
                return
            except TimeoutError:
                pass  # this wait's own timeout: an outer one stays a cancellation
        if time.monotonic() >= unfinished:
            self._expire_unfinished()

    def _on_readable(self) -> None:
        waiter = self._read_waiter
        if waiter is None or waiter.done():
            # Nobody waits: stop watching, or a level-triggered poller would
            # call again at once for data nobody is reading.
            self._stop_reading()
        else:
            waiter.set_result(None)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._fileno)

    async def _wait_writable(self) -> None:
        """Wait until the socket is writable.  On close: `ValueError`."""
        loop = self._bind_loop()
        if _lacks_readiness(loop):
            await self._wait_writable_proactor()
            return
        fut: asyncio.Future[None] = loop.create_future()
        self._write_waiter = fut
        if not self._writing:
            loop.add_writer(self._fileno, self._on_writable)
            self._writing = True
        try:
            await fut
        except BaseException:
            self._write_waiter = None
            self._stop_writing()
            raise
        self._write_waiter = None
        if self._closed:
            raise ValueError("the channel was closed while waiting in send()")

    def _on_writable(self) -> None:
        waiter = self._write_waiter
        if waiter is None or waiter.done():
            self._stop_writing()
        else:
            waiter.set_result(None)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.remove_writer(self._fileno)

    async def _fair(self) -> None:
        """After `_FAIRNESS` calls in a row that did not wait, let the loop run others."""
        self._streak += 1
        if self._streak >= _FAIRNESS:
            self._streak = 0
            await asyncio.sleep(0)

    # -- the gates, for the core ----------------------------------------------

    def _send_guard(self) -> _Gate:
        return self._send_gate

    def _recv_guard(self) -> _Gate:
        return self._recv_gate

    def _evicted(self, exc: LimitExceeded) -> None:
        loop = self._loop
        if loop is not None and not _in_loop(loop):
            # A read in another thread (a Budget shared with a threaded
            # server): the gates are this loop's, so its thread does it.
            with contextlib.suppress(RuntimeError):  # the loop is closed: close() did it all
                loop.call_soon_threadsafe(super()._evicted, exc)
            return
        super()._evicted(exc)

    # Windows' default ProactorEventLoop completes operations instead of
    # reporting readiness (no add_reader/add_writer).  Readable: a zero-byte
    # receive completes when data (or the end of the stream) is there and
    # consumes nothing, so the read itself stays the channel's, as on every
    # other loop.  Writable: only under backpressure, so it is polled, with
    # a back-off from 0.5 ms to 50 ms, and a cancellation never leaves a
    # write of unknown size behind.

    async def _wait_readable_proactor(self, loop: asyncio.AbstractEventLoop) -> None:
        wake: asyncio.Future[None] = loop.create_future()
        self._read_waiter = wake  # close() completes it
        peek = asyncio.ensure_future(loop.sock_recv_into(self._sock, _EMPTY))
        try:
            await asyncio.wait((peek, wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._read_waiter = None
            if not peek.done():
                peek.cancel()
            # A receive that failed (a reset, a closed socket) is seen by the
            # next read; its exception must not be reported as unretrieved.
            peek.add_done_callback(_swallow)
        if self._closed:
            raise ChannelClosed("the channel was closed while waiting in recv()")

    async def _wait_writable_proactor(self) -> None:
        delay = 0.0005
        while not self._closed and not _writable_now(self._fileno):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        if self._closed:
            raise ValueError("the channel was closed while waiting in send()")

    def _wake_waiters(self) -> None:
        self._stop_reading()
        self._stop_writing()
        for waiter in (self._read_waiter, self._write_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)  # the woken task sees _closed

    def _drop_held(self) -> None:
        # One thread: a task suspended in send() or recv() touches nothing
        # until it runs again, and then it finds the channel closed.
        self._outbox.discard()
        self._drop_buffered()

    # -- sending ------------------------------------------------------------

    async def send(self, payload: Buffer | SealedMemory = b"", fds: Iterable[int | Any] = ()) -> None:  # noqa: C901, PLR0912, PLR0915 - the send fast path, inline
        """Send one message: *payload* and *fds*, delivered together.

        Waits while the socket is full (backpressure): memory held by the
        channel stays at most one message however slowly the peer reads.
        Cancelled: not sent if ``characters_written`` on the
        ``CancelledError`` is ``0``; otherwise taken and finished before any
        later message (see `flush`).

        Args:
            payload: The message's bytes, borrowed until ``send()`` returns:
                do not change it meanwhile (resizing it then raises
                `BufferError` where it is tried).
            fds: Ints or objects with ``fileno()``; they stay the caller's,
                who may close them as soon as the call returns or raises.

        Raises:
            ValueError: Before writing anything: the message exceeds
                ``max_payload``/``max_fds``, names an impossible fd number
                (negative, a closed file object) or the channel's own
                socket, or the channel is closed.
            BufferError: The payload is not contiguous.
            OSError: ``EBADF`` before writing anything for a number that is
                not an open fd; otherwise from the kernel (such as
                `BrokenPipeError`).
            ProtocolError: An earlier error left the channel unusable
                (`ChannelBroken` when this end broke it).
            RuntimeError: Called from another event loop than the one the
                channel was first used on.
        """
        if self._loop is not asyncio.get_running_loop():
            self._enter_loop()  # RuntimeError from another loop, before anything is touched
        if self._share_above is not None:
            payload = share_large(self, payload)
        nums, size, pin = self._message(payload, fds)  # pin: held until the call ends
        gate = self._send_gate
        try:
            if not gate.try_enter():
                # Cancelled while waiting for the gate: nothing was taken.
                await gate.enter()
        except BaseException as exc:
            if pin is not None:
                pin.release()  # nothing was written: a handler's error here says nothing either
            set_written(exc, 0)
            raise
        done = False
        try:
            try:
                if self._closed or self._broken is not None or self._suspect:
                    self._check_leftovers(False)
                self._suspect = True
                if (
                    self._streak < _FAIRNESS - 1
                    and self._simple
                    and len(nums) <= SCM_MAX_FD
                    and not self._outbox.pending
                ):
                    # The common case: no await unless the socket is full.
                    self._streak += 1
                    sent = self._send_whole(payload, nums, size)
                    if sent is not None:
                        await self._push(sent)
                else:
                    await self._send_queued(payload, nums, size)
            except BaseException as exc:
                if pin is not None:
                    # The caller's buffer is free as it handles the error.  A
                    # handler's error here leaves the call suspect, as one at
                    # the next line would.
                    pin.release()
                    pin = None
                self._send_interrupted(exc)
                raise
            self._suspect = False
            done = True
        except BaseException as exc:
            if done:
                # A signal handler's error as the gate was left: the
                # message had left whole.  Stored without a call, where a
                # second handler's error could replace *exc* first.
                exc.characters_written = HEADER_SIZE + size  # type: ignore[attr-defined]
            raise
        finally:
            if not gate._waiters:
                gate._busy = False  # as in recv(): no call, no interrupt point
            else:
                turn = gate._turns
                try:
                    gate.leave()
                except BaseException as exc:
                    last = exc
                    if done:  # first, with no call: as above
                        exc.characters_written = HEADER_SIZE + size  # type: ignore[attr-defined]
                    while gate._turns == turn:  # cut short: the hand-over is finished now
                        try:
                            gate.leave()
                        except BaseException as again:  # a storm of signals: the last error is raised
                            if done:
                                again.characters_written = HEADER_SIZE + size  # type: ignore[attr-defined]
                            last = again
                    if done and pin is not None:  # (not done: let go above, or nothing was written)
                        try:
                            pin.release()
                        except BaseException as again:
                            again.characters_written = HEADER_SIZE + size  # type: ignore[attr-defined]
                            last = again
                    raise last  # noqa: B904 - the last handler's error (the first is its context)

    async def send_many(self, messages: Iterable[tuple[Buffer | SealedMemory, Iterable[int | Any]]]) -> None:  # noqa: C901, PLR0912, PLR0915 - each error path inline, as send()
        """Send ``(payload, fds)`` messages in order, as few system calls as the kernel allows.

        As `fdchannel.Channel.send_many`: every message is checked first,
        consecutive ones share a ``sendmsg`` on the default transport, and
        when the call stops part way (cancelled, a kernel error) the
        exception's ``messages_taken`` counts the messages taken (sent, or
        pending for `flush`); send the rest again.  Waits while the socket
        is full.  A payload sent as sealed shared memory goes in a write of
        its own, in order.
        """
        if self._loop is not asyncio.get_running_loop():
            self._enter_loop()
        pins: list[memoryview] = []  # as in send(), each payload held until the call ends
        try:
            prepared = _batch.prepare(self, messages, pins)
            count = len(prepared)  # (a call: not in the handlers below)
        except BaseException:
            if pins:  # (prepare's own release may have been cut short by a second handler's error)
                _batch.release(pins)
            raise
        try:
            await self._send_gate.enter()
        except BaseException as exc:
            if pins:
                _batch.release(pins)  # as in send()
            exc.messages_taken = 0  # type: ignore[attr-defined]
            raise
        done = False
        try:
            if self._closed or self._broken is not None or self._suspect:
                self._check_leftovers(False)
            self._suspect = True
            try:
                if self._simple and not self._outbox.pending:
                    await _batch.send_groups_async(self, prepared)
                else:
                    await _batch.send_each_async(self, prepared)
            except BaseException as exc:
                if pins:
                    _batch.release(pins)  # first, as in send()
                self._send_interrupted(exc)
                raise
            self._suspect = False
            done = True
        except BaseException:
            if not done and pins:
                _batch.release(pins)  # refused before a write (a broken channel): free as it is handled
            raise
        finally:
            gate = self._send_gate  # left as in send()
            if not gate._waiters:
                gate._busy = False
            else:
                turn = gate._turns
                try:
                    gate.leave()
                except BaseException as exc:
                    # A signal handler's error as the gate was left: all had
                    # left (stored first, with no call, as in send()).
                    last = exc
                    if done:
                        exc.messages_taken = count  # type: ignore[attr-defined]
                    while gate._turns == turn:  # cut short: finished now (as in send())
                        try:
                            gate.leave()
                        except BaseException as again:
                            if done:
                                again.messages_taken = count  # type: ignore[attr-defined]
                            last = again
                    if done and pins:
                        try:
                            _batch.release(pins)
                        except BaseException as again:
                            again.messages_taken = count  # type: ignore[attr-defined]
                            last = again
                    raise last  # noqa: B904 - the last handler's error (the first is its context)

    async def _send_queued(self, payload: Buffer | SealedMemory, nums: list[int], size: int) -> None:
        """The general send: control frames and older data first, then the message."""
        try:
            await self._fair()
            self._check_usable()  # the state may have changed while others ran
            self._prepare_send()
            delay = 0.0005
            while self._peer_needed(nums):
                # Polled: a recv() may be parked on the one reader slot, and
                # it reads the greeting for us then.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                self._check_usable()  # closed meanwhile: ValueError, as a wait for writability says
            if self._outbox.pending:
                # Older data goes first; if it cannot, this message is not taken.
                await self._push(None)
        except BaseException as exc:
            set_written(exc, 0)
            raise
        out, sent = self._start_message(payload, nums, size)
        if sent is None:
            return
        try:
            await self._push(sent)
        except BaseException as exc:
            self._not_taken(exc, out)
            raise

    async def flush(self) -> None:
        """Write what a cancelled ``send()`` left pending; return when none is.

        Cancelling it leaves the rest pending.

        Raises:
            OSError: From the kernel.
            ProtocolError: An earlier error left the channel unusable.
            ValueError: The channel is closed.
            RuntimeError: Called from another event loop.
        """
        if self._loop is not asyncio.get_running_loop():
            self._enter_loop()
        await self._send_gate.enter()
        try:
            self._check_usable()
            if self._has_control:
                self._outbox.add_control(self._session.take_control())
            if self._outbox.pending:
                await self._push(None)
        finally:
            gate = self._send_gate  # left as in send()
            if not gate._waiters:
                gate._busy = False
            else:
                turn = gate._turns
                try:
                    gate.leave()
                except BaseException as exc:
                    last = exc
                    while gate._turns == turn:  # cut short: finished now (as in send())
                        try:
                            gate.leave()
                        except BaseException as again:
                            last = again
                    raise last  # noqa: B904 - the last handler's error (the first is its context)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _is_cancellation(self, exc: BaseException) -> bool:
        return isinstance(exc, asyncio.CancelledError)

    # -- receiving ------------------------------------------------------------

    async def recv(self) -> Message:  # noqa: C901, PLR0912, PLR0915 - the recv fast path: one loop, no call per step
        """Receive one whole message; its fds are now the caller's.

        Cancelled: nothing is lost; what arrived stays buffered for the next
        ``recv()``.

        Returns:
            The message; each of its fds is an `OwnedFd` the caller owns.

        Raises:
            ChannelClosed: The peer closed between messages, or the channel
                was closed while this call waited.
            ProtocolError: Anything malformed; the channel is unusable after.
            ValueError: The channel is closed.
            OSError: From the kernel, with its errno.
            RuntimeError: Called from another event loop than the one the
                channel was first used on (the channel stays as it was).
        """
        if self._loop is not asyncio.get_running_loop():
            self._enter_loop()  # RuntimeError from another loop, before anything is touched
        gate = self._recv_gate
        waited = False
        if not gate.try_enter():
            closed_before = self._closed
            await gate.enter()
            waited = not closed_before
        msg: Message | None = None
        try:
            if self._closed or self._broken is not None or self._delivering or self._decoder.landed:
                if waited and self._closed:
                    # Closed while this task waited for the gate: as for the
                    # task that waited for data, so `async for` ends.
                    raise ChannelClosed("the channel was closed while waiting in recv()")
                self._check_leftovers(True)
            self._streak += 1
            if self._streak >= _FAIRNESS:  # inline: no coroutine per message
                self._streak = 0
                await asyncio.sleep(0)  # nothing in hand yet: a cancel here loses nothing
            decoder = self._decoder
            while True:
                # No await between a frame in hand and the return: it must
                # reach the caller.
                if decoder.frames or decoder.error is not None or decoder.eof:
                    msg = self._next_message()
                    if msg is not None:
                        self._delivering = False
                        return msg
                try:
                    msg = self._read(0)
                except BlockingIOError as exc:
                    if raised_in_signal_handler(exc):
                        raise
                    self._streak = 0
                    if decoder.grown:
                        decoder.shrink()  # about to wait: an idle channel keeps a small buffer
                    unfinished = decoder.deadline  # a frame_timeout runs
                    if unfinished is None:
                        await self._wait_readable()
                    else:
                        await self._wait_unfinished(unfinished)
                    continue
                if msg is not None:
                    self._delivering = False
                    return msg
        except BaseException as exc:
            self._recv_stopped(exc)
            raise
        finally:
            if not gate._waiters:
                # No call, so no point where a signal handler could run
                # and leave the gate taken for good.
                gate._busy = False
            else:
                turn = gate._turns
                try:
                    gate.leave()
                except BaseException as exc:
                    last = exc
                    if msg is not None:
                        self._delivering = True  # (no call first: see Channel.recv)
                    while gate._turns == turn:  # cut short: the hand-over is finished now
                        try:
                            gate.leave()
                        except BaseException as again:  # a storm of signals: the last error is raised
                            last = again
                    if msg is not None:
                        self._recv_lost(exc, msg)
                    raise last  # noqa: B904 - the last handler's error (the first is its context)


# -- named endpoints -------------------------------------------------------------


async def connect(
    path: str | bytes | os.PathLike[Any],
    *,
    timeout: float | None = None,
    expect_uid: int | Collection[int] | None = None,
    **kwargs: Any,
) -> AsyncChannel:
    """Connect to the `start_server` (or `fdchannel.Listener`) at *path*.

    While the listener's backlog is full the connect is retried until it is
    accepted or *timeout* seconds passed.  Cancelled: the socket is closed,
    nothing leaks.

    Args:
        path: A filesystem path or, on Linux, an abstract name starting with
            ``"\\0"``.
        timeout: How long to wait for a listener whose backlog is full
            (``None``, the default: as long as it takes).
        expect_uid: A uid (or several) the server must run as, checked
            before anything is sent, as on `fdchannel.Channel.connect`.
        **kwargs: Go to `AsyncChannel` (``transport``, ``max_payload``,
            ``max_fds``).

    Returns:
        The new channel, owned by the caller.

    Raises:
        OSError: As ``socket.connect`` raises it (`FileNotFoundError`,
            `ConnectionRefusedError`, ...).
        TimeoutError: The listener did not accept within *timeout*.
        PermissionError: The server is not one of *expect_uid*; nothing
            was sent.
    """
    address = unix_address(path)
    sock = unix_socket()
    try:
        sock.setblocking(False)
        # time.monotonic(), not loop.time(): uvloop's is cached per iteration.
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = CONNECT_RETRY_FIRST
        # Not loop.sock_connect(): on a full backlog the connect fails with
        # EAGAIN and the socket stays unconnected, yet writable, so a loop
        # that waits for writability reports a connection that does not
        # exist (both the default loop and uvloop did).
        while not connect_step(sock, address):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise backlog_full(address, timeout or 0.0)
                delay = min(delay, left)
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX)
        check_server(sock, expect_uid, address)
        return AsyncChannel(sock, **kwargs)
    except BaseException:
        sock.close()
        raise


_EMPTY: Final = bytearray()
_proactor_class: Any = getattr(asyncio, "ProactorEventLoop", None)


def _lacks_readiness(loop: asyncio.AbstractEventLoop) -> bool:
    """True for a loop without add_reader/add_writer (Windows' ProactorEventLoop)."""
    return _proactor_class is not None and isinstance(loop, _proactor_class)


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _writable_now(fd: int) -> bool:
    return bool(select.select([], [fd], [], 0)[1])


def _swallow(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


Handler = Callable[[AsyncChannel], Awaitable[object]]
#: A peer check: called with the peer's credentials, true accepts.
Authorize = Callable[[PeerCredentials], object]


def _closer(channel: AsyncChannel) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback closing *channel*, whatever became of the task."""

    def close(_task: asyncio.Task[None]) -> None:
        channel.close()

    return close


class Server:
    """A listening Unix socket that runs a handler task per connection.

    Returned by `start_server`; mirrors `asyncio.Server`: `close`,
    `wait_closed`, `serve_forever`, `start_serving`, `is_serving` and
    ``async with`` (which closes and waits on exit).  The server owns its
    `fdchannel.Listener` (socket and socket file).  Each handler gets an
    `AsyncChannel` owned by the server: it is closed when the handler
    returns or raises, so a handler must be done with it by then (or hand
    its fds on).
    """

    def __init__(self, listener: Listener, handler: Handler) -> None:
        self._listener = listener
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = self._loop.create_future()
        self._serving_forever: asyncio.Future[None] | None = None

    @property
    def path(self) -> str | bytes:
        """The path or abstract name the server listens on."""
        return self._listener.path

    @property
    def listener(self) -> Listener:
        """The underlying `fdchannel.Listener` (owned by the server); its ``refused`` counts refused peers."""
        return self._listener

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket, as `asyncio.Server.sockets` has them (empty once closed).

        Owned by the server: use it for ``getsockname()`` and options, do
        not close it.
        """
        return () if self._listener.closed else (self._listener._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on, as `asyncio.Server.get_loop`."""
        return self._loop

    def is_serving(self) -> bool:
        """True while new connections are accepted."""
        return self._serving

    async def start_serving(self) -> None:
        """Start accepting connections (a no-op if already serving).

        Raises:
            RuntimeError: The server is closed.
        """
        if self._listener.closed:
            raise RuntimeError(f"server {self.path!r} is closed")
        if not self._serving:
            self._serving = True
            self._loop.add_reader(self._listener.fileno(), self._on_acceptable)

    def _on_acceptable(self) -> None:
        # Accept what is queued, up to a bound so one busy listener does not
        # keep the loop from everything else.
        for _ in range(64):
            if self._listener.closed:
                return
            try:
                # Timeout 0.0: refused peers are closed, counted and logged by
                # the listener; BlockingIOError once nothing is queued.
                channel = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: stop accepting for a moment instead of
                    # spinning on a listener that stays readable (as asyncio does).
                    _log.error("server %r: accept() failed: %s; pausing for 1s", self.path, exc)
                    self._pause_accepting(1.0)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.ENOTCONN):
                    continue
                raise
            try:
                achannel = AsyncChannel.from_channel(channel)
            except BaseException:
                channel.close()
                raise
            task = self._loop.create_task(self._run_handler(achannel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # A task cancelled before its first step never runs the
            # handler's finally: the channel is closed here too.
            task.add_done_callback(_closer(achannel))

    def _pause_accepting(self, delay: float) -> None:
        if not self._serving:
            return
        self._loop.remove_reader(self._listener.fileno())
        self._serving = False

        def resume() -> None:
            if not self._listener.closed and not self._serving:
                self._serving = True
                self._loop.add_reader(self._listener.fileno(), self._on_acceptable)

        self._loop.call_later(delay, resume)

    async def _run_handler(self, channel: AsyncChannel) -> None:
        try:
            await self._handler(channel)
        except Exception:
            _log.exception("server %r: handler raised", self.path)
        finally:
            channel.close()

    def close(self) -> None:
        """Stop accepting, close the listening socket and remove the socket file.

        Handlers already running go on; `wait_closed` waits for them and
        `close_clients` cancels them.  Idempotent.
        """
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        waiter = self._serving_forever
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def close_clients(self) -> None:
        """Cancel every running handler task; each one's channel is then closed.

        asyncio's `close_clients` (3.13) closes the connections and lets the
        handlers notice; here the handler task is cancelled (its ``finally``
        blocks run) and its channel closed, which is also what
        `asyncio.Server.abort_clients` amounts to for a channel: queued
        output is dropped, not flushed.
        """
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until `close` was called and every handler task has finished."""
        await asyncio.shield(self._closed)
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def serve_forever(self) -> None:
        """Accept connections until `close` is called; cancelling it closes the server.

        As `asyncio.Server.serve_forever`.

        Raises:
            RuntimeError: Another task is already in it, or the server is
                closed.
        """
        if self._serving_forever is not None:
            raise RuntimeError(f"server {self.path!r} is already in serve_forever()")
        await self.start_serving()
        self._serving_forever = waiter = self._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self._serving_forever = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(
    client_connected_cb: Handler,
    path: str | bytes | os.PathLike[Any],
    *,
    backlog: int = 128,
    mode: int = 0o600,
    start_serving: bool = True,
    allow_uids: Collection[int] | None = None,
    allow_gids: Collection[int] | None = None,
    authorize: Authorize | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_fds: int = DEFAULT_MAX_FDS,
    max_held_fds: int | None = None,
    frame_timeout: float | None = SERVER_FRAME_TIMEOUT,
    budget: Budget | Literal["new"] | None = "new",
    transport: Transport | None = None,
) -> Server:
    """Listen on the Unix socket *path* and run ``await client_connected_cb(channel)`` per connection.

    Shaped like `asyncio.start_unix_server`, callback first, then the path
    (the old order ``start_server(path, handler)`` still works, with a
    `DeprecationWarning`), but the callback receives one `AsyncChannel`
    (owned by the server, closed when the callback returns) instead of a
    reader/writer pair.  The listening side is a `fdchannel.Listener`: the
    socket file gets the permission bits *mode* and no looser ones at any
    moment; a stale file left by a dead listener is replaced, a live one
    raises `OSError` (``EADDRINUSE``), a path holding anything but a socket
    raises `FileExistsError` and is left alone; a name starting with
    ``"\\0"`` is a Linux abstract socket.  Exceptions raised by the
    callback are logged on the ``fdchannel.aio`` logger and the server keeps
    serving.

    Args:
        client_connected_cb: ``async def handler(channel)``, run as a task
            per connection with an `AsyncChannel` the server owns.
        path: The socket's filesystem path, or ``"\\0name"`` for a Linux
            abstract name.
        backlog: The listen queue's length.
        mode: The socket file's permission bits (``0o600``: the owner only).
        start_serving: Accept at once; ``False`` waits for
            `Server.start_serving` or `Server.serve_forever`.
        allow_uids: Peers must run as one of these uids.
        allow_gids: Peers' primary or supplementary group must be one of
            these.
        authorize: Called with each peer's `PeerCredentials`; true accepts.
            Refused peers are closed before anything is read, counted in
            ``server.listener.refused`` and logged.
        max_payload: As for `AsyncChannel` (64 MiB).
        max_fds: As for `AsyncChannel` (1024).
        max_held_fds: As for `AsyncChannel` (``max_fds + 253``).
        frame_timeout: Seconds a peer has to finish a message it began
            (default 30 s; ``None``: no limit); then its channel fails
            with `LimitExceeded`, the fds it held closed.
        budget: The `fdchannel.Budget` every accepted channel shares, in
            ``server.listener.budget``: ``"new"`` (the default) makes one
            for this server (half the soft ``RLIMIT_NOFILE`` in fds,
            512 MiB); ``None``: none.
        transport: As for `AsyncChannel` (`default_transport()`).

    Returns:
        The serving `Server`, owned by the caller (``async with`` closes it
            and waits for its handlers).

    Raises:
        OSError: ``EADDRINUSE`` when a live listener holds *path*,
            ``ENAMETOOLONG`` for a path clients could not connect to, or
            from the kernel (``EACCES``, ...).
        FileExistsError: *path* holds something that is not a socket (left
            alone).
        ValueError: *mode* is not permission bits (0o000-0o777).
        TypeError: The callback is not callable, or an unknown keyword
            argument.
    """
    if not callable(client_connected_cb) and callable(path):
        warnings.warn(
            "start_server(path, handler) is deprecated: pass the handler first, as "
            "asyncio.start_unix_server(client_connected_cb, path) does",
            DeprecationWarning,
            stacklevel=2,
        )
        client_connected_cb, path = path, client_connected_cb
    if not callable(client_connected_cb):
        raise TypeError(
            f"start_server() takes the handler first, then the path; got {type(client_connected_cb).__name__}"
        )
    listener = Listener(
        path,
        backlog=backlog,
        mode=mode,
        allow_uids=allow_uids,
        allow_gids=allow_gids,
        authorize=authorize,
        max_payload=max_payload,
        max_fds=max_fds,
        max_held_fds=max_held_fds,
        frame_timeout=frame_timeout,
        budget=budget,
        transport=transport,
    )
    try:
        listener.settimeout(0.0)
        server = Server(listener, client_connected_cb)
        if start_serving:
            await server.start_serving()
    except BaseException:
        listener.close()
        raise
    return server
