"""The async channel for structured concurrency, written once for trio and for anyio.

`StructuredChannel` is the third twin of `fdchannel.Channel` and
`fdchannel.aio.AsyncChannel` (see docs/internals.md): every step that does
not wait is a `ChannelCore` method; only the waiting is here, through a
`Backend` (`fdchannel.trio` and `fdchannel.anyio` supply one each).  This
module imports neither library.

Each ``send``/``recv``/``flush`` starts with a cancellation point (in a
cancelled scope it raises before anything is touched).  It yields to the
scheduler when it waits and, as `fdchannel.aio` does, after `_FAIRNESS`
calls in a row that did not wait (a full checkpoint, at the start, where a
cancellation still loses nothing): a schedule point in every call would
double what a message costs (see benchmarks/bench_aio.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Final, Protocol, Self

from typing_extensions import Buffer

from ._async_surface import AsyncSurface
from ._budget import Budget
from ._channel import Channel
from ._codec import HEADER_SIZE, SCM_MAX_FD, Decoder
from ._core import DEFAULT_MAX_FDS, DEFAULT_MAX_PAYLOAD
from ._errors import ChannelClosed, FdChannelError, LimitExceeded
from ._interrupt import raised_in_signal_handler
from ._listener import Listener
from ._message import Message
from ._outbox import set_written
from ._peer import check_server, unix_address, unix_socket
from ._shared import SealedMemory, share_large
from .transports import Session, Transport

__all__ = ["Backend", "Event", "Gate", "Server", "StructuredChannel", "connect_with", "serve_with"]

#: After this many calls in a row that completed without waiting, one full
#: checkpoint: a peer that keeps the socket ready must not starve other tasks.
_FAIRNESS: Final = 64


class Event(Protocol):
    """What `Gate` needs of ``trio.Event`` / ``anyio.Event``."""

    def set(self) -> None: ...
    def is_set(self) -> bool: ...
    def wait(self) -> Awaitable[Any]: ...


class TaskGroup(Protocol):
    """What `serve_with` needs of a trio nursery / an anyio task group."""

    def start_soon(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


class Backend(Protocol):
    """The waiting primitives of one async library (all but `is_cancelled` need a running loop)."""

    @property
    def name(self) -> str: ...
    @property
    def closed_resource_error(self) -> type[BaseException]: ...

    def wait_readable(self, fd: int) -> Awaitable[None]: ...
    def wait_writable(self, fd: int) -> Awaitable[None]: ...
    def notify_closing(self, fd: int) -> None: ...
    def checkpoint(self) -> Awaitable[None]: ...
    def checkpoint_if_cancelled(self) -> Awaitable[None]: ...
    def sleep(self, seconds: float) -> Awaitable[None]: ...
    def move_on_after(self, seconds: float) -> Any:
        """A cancel scope (``with``) that ends its body quietly after *seconds*."""

    def is_cancelled(self, exc: BaseException) -> bool: ...
    def event(self) -> Event: ...
    def cancel_scope(self) -> Any:
        """A new, not yet entered cancel scope (``trio.CancelScope`` / ``anyio.CancelScope``)."""

    def task_group(self) -> Any:
        """A new nursery / task group: an async context manager yielding a `TaskGroup`."""


class Gate:
    """A FIFO lock whose free case takes no ``await`` (as `fdchannel.aio`'s).

    A waiter parks on an event of its own; `leave` hands the gate to the
    first waiter by setting its event (the gate stays busy: it is theirs).
    A waiter cancelled after the hand-over passes it on, so it is never lost.
    The channel leaves it inline (see `StructuredChannel.recv`): a signal
    handler's error at a call's entry must not leave it taken for good.
    """

    __slots__ = ("_backend", "_busy", "_waiters")

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._busy = False
        self._waiters: deque[Event] = deque()

    def locked(self) -> bool:
        return self._busy

    def try_enter(self) -> bool:
        if self._busy or self._waiters:
            return False
        self._busy = True
        return True

    async def enter(self) -> None:
        """Wait for the gate (FIFO).  Cancelled: the gate is not taken."""
        if self.try_enter():
            return
        event = self._backend.event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.leave()  # handed over just as we were cancelled: pass it on
            else:
                self._waiters.remove(event)
            raise

    def leave(self) -> None:
        """Hand the gate to the first waiter, or free it.

        Cut short by a signal handler's error, it may run again: the first
        waiter stays listed until its event is set (setting it twice is
        harmless), and goes with no call after that.
        """
        waiters = self._waiters
        if waiters:
            waiters[0].set()
            del waiters[0]
        else:
            self._busy = False


class StructuredChannel(AsyncSurface):
    """The channel of `fdchannel.trio.TrioChannel` and `fdchannel.anyio.AnyioChannel`."""

    _backend: ClassVar[Backend]
    _recv_ok = (OSError, FdChannelError, ValueError)

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

        The socket is made non-blocking.  *max_payload* and *max_fds* bound one
        message both ways, as on `fdchannel.Channel` (a message exactly at a
        limit is allowed); *max_held_fds*, *frame_timeout* and *budget*
        bound what the peer can make this end hold, as there.  Raises
        `ValueError` for a socket the transport cannot use (the socket then
        stays the caller's).
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
        self._send_gate = Gate(self._backend)
        self._recv_gate = Gate(self._backend)
        self._thread = threading.get_ident()  # the run's (a Budget's eviction from elsewhere only wakes)
        # Tasks inside wait_readable/wait_writable: close() must wake them
        # (notify_closing) before the fd goes.
        self._waiting = 0
        self._streak = 0
        if greet and self._has_control:
            self._flush_control_nowait()

    # -- construction ---------------------------------------------------

    @classmethod
    def pair(cls, *, transport: Transport | None = None, **kwargs: Any) -> tuple[Self, Self]:
        """Return two connected channels over a new AF_UNIX socketpair.

        Both sockets are non-inheritable and both channels the caller's.
        Keyword arguments go to both ends.
        """
        return cls._pair(transport, kwargs)

    @classmethod
    def from_channel(cls, channel: Channel) -> Self:
        """Take over a blocking `Channel`: its socket and all of its state.

        The new channel owns the socket, the messages and fds *channel* had
        received but not yet returned, and any remainder a timed-out or
        non-blocking ``send()`` left pending (finished first).  *channel* is
        closed afterwards without closing anything.  Raises `ValueError` if
        *channel* is closed or is an end inherited across ``fork`` that
        another child uses already, and `RuntimeError` if another thread is
        inside its ``send()`` or ``recv()``; nothing moves then.
        """
        return cls._take_over(channel)

    # -- waiting ----------------------------------------------------------

    async def _wait_readable(self) -> None:
        """Wait until the socket is readable.  Closed meanwhile: `ChannelClosed`."""
        backend = self._backend
        self._waiting += 1
        try:
            await backend.wait_readable(self._fileno)
        except backend.closed_resource_error:
            raise ChannelClosed("the channel was closed while waiting in recv()") from None
        finally:
            self._waiting -= 1
            self._streak = 0  # a wait is a schedule point
        if self._closed:
            raise ChannelClosed("the channel was closed while waiting in recv()")

    async def _wait_unfinished(self, unfinished: float) -> None:
        """Wait for more of a message begun, until its deadline (then fail the channel)."""
        remaining = unfinished - time.monotonic()
        if remaining > 0:
            with self._backend.move_on_after(remaining) as scope:
                await self._wait_readable()
            if not scope.cancelled_caught:
                return  # readable in time
        if time.monotonic() >= unfinished:
            self._expire_unfinished()

    async def _wait_writable(self) -> None:
        """Wait until the socket is writable.  Closed meanwhile: `ValueError`."""
        backend = self._backend
        self._waiting += 1
        try:
            await backend.wait_writable(self._fileno)
        except backend.closed_resource_error:
            raise ValueError("the channel was closed while waiting in send()") from None
        finally:
            self._waiting -= 1
            self._streak = 0
        if self._closed:
            raise ValueError("the channel was closed while waiting in send()")

    # -- the gates, for the core ----------------------------------------------

    def _send_guard(self) -> Gate:
        return self._send_gate

    def _recv_guard(self) -> Gate:
        return self._recv_gate

    def _evicted(self, exc: LimitExceeded) -> None:
        if threading.get_ident() != self._thread:
            # A read in another thread (a Budget shared with a threaded
            # server): the gates are the run's; only the socket is shut
            # down, which wakes a task waiting in recv, and the decoder
            # fails at its next step (`Decoder.evicted`).
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            return
        super()._evicted(exc)

    def _wake_waiters(self) -> None:
        if self._waiting:
            # Before the fd is closed: trio and anyio want to be told, and
            # the waiting tasks get ClosedResourceError.
            try:
                self._backend.notify_closing(self._fileno)
            except RuntimeError:  # pragma: no cover - close() outside the channel's run
                pass

    def _drop_held(self) -> None:
        # One thread: a task suspended in send() or recv() touches nothing
        # until it runs again, and then it finds the channel closed.  The
        # fds a read left landed (cut short by a signal handler) go too.
        self._outbox.discard()
        self._drop_buffered()

    def _checkpoint(self) -> Awaitable[None]:
        """The cancellation point a call starts with; a full checkpoint every `_FAIRNESS` calls."""
        self._streak += 1
        if self._streak >= _FAIRNESS:
            self._streak = 0
            return self._backend.checkpoint()
        return self._backend.checkpoint_if_cancelled()

    def _recv_stopped(self, exc: BaseException) -> None:
        if self._backend.is_cancelled(exc) and not raised_in_signal_handler(exc):
            # Delivered only at an await, where nothing is in hand.
            self._delivering = False
            return
        super()._recv_stopped(exc)

    # -- sending ------------------------------------------------------------

    async def send(self, payload: Buffer | SealedMemory = b"", fds: Iterable[int | Any] = ()) -> None:  # noqa: C901, PLR0912, PLR0915 - inline, as aio
        """Send one message: *payload* and *fds*, delivered together.

        *fds* are ints or objects with ``fileno()``; they stay the caller's
        (close them as soon as ``send()`` returns or raises, also when it was
        cancelled).  Waits while the socket is full (backpressure).
        *payload* is borrowed until ``send()`` returns: do not change it
        (resizing it then raises `BufferError` where it is tried).

        Raises `ValueError` before writing anything when the message exceeds
        ``max_payload``/``max_fds``, names an impossible fd number or the
        channel's own socket, or the channel is closed (also while waiting);
        `BufferError` for a payload that is not contiguous; `OSError`
        (``EBADF``) for a number that is not an open fd, before writing
        anything; `ProtocolError` if an earlier error left the channel
        unusable (`ChannelBroken` when this end broke it); `OSError` (such as
        `BrokenPipeError`) from the kernel.

        Cancelled: the cancellation exception carries ``characters_written``.
        ``0``: the message was not taken (nothing of it left, nothing is
        queued: send it again if you like).  More: it was taken, its
        remainder is `pending` (payload copied, fds duplicated) and is
        written before anything else, by the next ``send()`` or by `flush`;
        never send it again.
        """
        if self._share_above is not None:
            payload = share_large(self, payload)
        nums, size, pin = self._message(payload, fds)  # pin: held until the call ends
        gate = self._send_gate
        try:
            await self._checkpoint()
            if not gate.try_enter():
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
                if self._simple and len(nums) <= SCM_MAX_FD and not self._outbox.pending:
                    # The common case: no await unless the socket is full.
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
        finally:
            # Inline, as in recv(): no call before the gate is let go.
            waiters = gate._waiters
            if not waiters:
                gate._busy = False
            else:
                first = waiters[0]
                try:
                    gate.leave()
                except BaseException as exc:
                    last = exc
                    if done:
                        # The message had left whole: stored first, with no
                        # call (a second handler's error may cut the retry).
                        exc.characters_written = HEADER_SIZE + size  # type: ignore[attr-defined]
                    while waiters and waiters[0] is first:  # cut short before the hand-over: done now
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

    async def _send_queued(self, payload: Buffer | SealedMemory, nums: list[int], size: int) -> None:
        """The general send: control frames and older data first, then the message."""
        try:
            self._prepare_send()
            delay = 0.0005
            while self._peer_needed(nums):
                # Polled: a recv() may be waiting for readability, and it
                # reads the greeting for us then.
                await self._backend.sleep(delay)
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

        Raises as `send` does.  Cancelling it leaves the rest pending.
        """
        await self._checkpoint()
        gate = self._send_gate
        await gate.enter()
        try:
            self._check_usable()
            if self._has_control:
                self._outbox.add_control(self._session.take_control())
            if self._outbox.pending:
                await self._push(None)
        finally:
            waiters = gate._waiters  # inline, as in send()
            if not waiters:
                gate._busy = False
            else:
                first = waiters[0]
                try:
                    gate.leave()
                except BaseException as exc:
                    last = exc
                    while waiters and waiters[0] is first:  # as in send()
                        try:
                            gate.leave()
                        except BaseException as again:
                            last = again
                    raise last  # noqa: B904 - the last handler's error (the first is its context)

    async def _sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)

    def _is_cancellation(self, exc: BaseException) -> bool:
        return self._backend.is_cancelled(exc)

    # -- receiving ------------------------------------------------------------

    async def recv(self) -> Message:  # noqa: C901, PLR0912, PLR0915 - the recv loop, inline
        """Receive one whole message; its fds are now the caller's.

        Raises `ChannelClosed` when the peer closed between messages (or the
        channel was closed while this call waited), `ProtocolError` for
        anything malformed (the channel is unusable after it), `ValueError`
        on a closed channel, `OSError` from the kernel.  Cancelled: nothing
        is lost; what arrived stays buffered for the next ``recv()``.
        """
        gate = self._recv_gate
        await self._checkpoint()  # nothing in hand yet: a cancellation here loses nothing
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
            decoder = self._decoder
            while True:
                # No await between a message in hand and the return.
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
            # Inline: a call here is a point where a signal handler's error
            # could leave the gate taken for good (every later call waits).
            waiters = gate._waiters
            if not waiters:
                gate._busy = False
            else:
                first = waiters[0]
                try:
                    gate.leave()
                except BaseException as exc:
                    last = exc
                    if msg is not None:
                        self._delivering = True  # first, with no call: see Channel.recv
                    while waiters and waiters[0] is first:  # cut short before the hand-over: done now
                        try:
                            gate.leave()
                        except BaseException as again:  # a storm of signals: the last error is raised
                            last = again
                    if msg is not None:
                        self._recv_lost(exc, msg)
                    raise last  # noqa: B904 - the last handler's error (the first is its context)


# -- named endpoints -------------------------------------------------------------

_log = logging.getLogger("fdchannel.structured")


async def connect_with(
    cls: type[StructuredChannel], path: str | bytes | os.PathLike[Any], kwargs: dict[str, Any]
) -> Any:
    """The logic of ``connect()``: a channel of *cls* connected to *path*, or nothing left open."""
    backend = cls._backend
    address = unix_address(path)
    expect_uid = kwargs.pop("expect_uid", None)
    sock = unix_socket()
    try:
        sock.setblocking(False)
        delay = 0.0005
        while True:
            try:
                sock.connect(address)
                break
            except BlockingIOError as exc:
                if exc.errno != errno.EAGAIN:  # EINPROGRESS: the kernel finishes it
                    await backend.wait_writable(sock.fileno())
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err), address) from None
                    break
                # AF_UNIX says EAGAIN while the listener's backlog is full:
                # the socket is not connecting, so try again (a wait for
                # writability would report success at once).
                await backend.sleep(delay)
                delay = min(delay * 2, 0.05)
        check_server(sock, expect_uid, address)
        return cls(sock, **kwargs)
    except BaseException:
        sock.close()
        raise


Handler = Callable[[Any], Awaitable[object]]

#: accept() errors meaning "out of fds or memory": pause instead of spinning.
_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about one connection only.
_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ENOTCONN})


class Server:
    """A listening Unix socket whose handlers run in a nursery / task group.

    Given to ``task_status.started()`` by ``serve()``.  The server owns its
    `fdchannel.Listener` (socket and socket file).  Each handler gets a
    channel owned by the server: it is closed when the handler returns or
    raises.
    """

    def __init__(self, listener: Listener, backend: Backend) -> None:
        self._listener = listener
        self._backend = backend
        self._accepting = False
        # Each running handler's cancel scope, and the channel it was given
        # (closed by serve() if the handler never got to run).
        self._handlers: dict[Any, StructuredChannel] = {}

    @property
    def path(self) -> str | bytes:
        """The path or abstract name the server listens on."""
        return self._listener.path

    @property
    def listener(self) -> Listener:
        """The underlying `fdchannel.Listener` (owned by the server); see ``refused``."""
        return self._listener

    def is_serving(self) -> bool:
        """True while new connections are accepted."""
        return not self._listener.closed

    def close(self) -> None:
        """Stop accepting, close the listening socket and remove the socket file.

        Handlers already running go on; ``serve()`` returns once they all
        finished (`close_clients` cancels them).  Idempotent.
        """
        if self._listener.closed:
            return
        if self._accepting:
            try:
                self._backend.notify_closing(self._listener.fileno())
            except RuntimeError:  # pragma: no cover - close() outside the server's run
                pass
        self._listener.close()

    def close_clients(self) -> None:
        """Cancel every running handler (their channels are then closed); serving goes on."""
        for scope in list(self._handlers):
            scope.cancel()

    async def _accept_loop(self, cls: type[StructuredChannel], handler: Handler, group: TaskGroup) -> None:
        listener = self._listener
        backend = self._backend
        while not listener.closed:
            try:
                # Timeout 0.0: refused peers are closed, counted and logged by
                # the listener; BlockingIOError once nothing is queued.
                channel = listener.accept()
            except BlockingIOError:
                self._accepting = True
                try:
                    await backend.wait_readable(listener.fileno())
                except backend.closed_resource_error:
                    return
                finally:
                    self._accepting = False
                continue
            except ValueError:
                return  # closed by close()
            except OSError as exc:
                if exc.errno in _PAUSE_ERRNOS:
                    _log.error("server %r: accept() failed: %s; pausing for 1s", self.path, exc)
                    await backend.sleep(1.0)
                    continue
                if exc.errno in _SKIP_ERRNOS:
                    continue
                raise
            try:
                ours = cls.from_channel(channel)
            except BaseException:
                channel.close()
                raise
            scope = backend.cancel_scope()
            self._handlers[scope] = ours
            try:
                group.start_soon(self._run_handler, handler, ours, scope)
            except BaseException:
                del self._handlers[scope]
                ours.close()
                raise
            # A checkpoint per connection: a flood of peers must not starve the run.
            await backend.checkpoint()

    async def _run_handler(self, handler: Handler, channel: StructuredChannel, scope: Any) -> None:
        try:
            with scope:
                await handler(channel)
        except Exception:
            _log.exception("server %r: handler raised", self.path)
        finally:
            self._handlers.pop(scope, None)
            channel.close()

    def _close_channels(self) -> None:
        """Close the channels of handlers that never ran (their task was cancelled first)."""
        for channel in self._handlers.values():
            channel.close()
        self._handlers.clear()


async def serve_with(
    cls: type[StructuredChannel],
    path: str | bytes | os.PathLike[Any],
    handler: Handler,
    task_status: Any,
    *,
    backlog: int,
    mode: int,
    options: dict[str, Any],
) -> None:
    """The logic of ``serve()``: listen, report the `Server`, accept until closed or cancelled."""
    backend = cls._backend
    listener = Listener(path, backlog=backlog, mode=mode, **options)
    server = Server(listener, backend)
    try:
        listener.settimeout(0.0)
        group: TaskGroup
        async with backend.task_group() as group:
            task_status.started(server)
            await server._accept_loop(cls, handler, group)
    finally:
        listener.close()
        server._close_channels()
