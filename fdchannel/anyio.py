"""anyio support: `AnyioChannel`, `connect`, `serve` and `pair`.

`AnyioChannel` is the anyio twin of `fdchannel.Channel` and
`fdchannel.aio.AsyncChannel`, on both of anyio's backends (asyncio, with or
without uvloop, and trio): the same wire format, decoder, transports and
ownership rules, over a non-blocking socket that waits with
``anyio.wait_readable``/``wait_writable``.  Install it with
``pip install 'fdchannel[anyio]'``.

Every ``send``/``recv``/``flush`` starts with a cancellation point: in a
cancelled scope it raises before touching anything.  It yields to the
scheduler when it has to wait, and otherwise once every 64 calls (as
`fdchannel.aio` does), so a peer that keeps the socket ready cannot starve
other tasks.  Cancellation (so ``anyio.move_on_after``/``fail_after`` and
task-group cancellation) is safe at every ``await``:

* a cancelled `AnyioChannel.recv` loses nothing: what was read stays
  buffered and the next ``recv()`` returns it;
* a cancelled `AnyioChannel.send` never corrupts the stream.  The
  cancellation exception (``anyio.get_cancelled_exc_class()``) carries
  ``characters_written``: ``0`` means the message was not taken (not
  sent); more means it was taken and its remainder (payload copied, fds
  duplicated: close yours at once) is finished before anything else, by
  the next ``send()`` or by `AnyioChannel.flush`.  Catch it to read it, and
  re-raise::

      try:
          await channel.send(payload, fds)
      except anyio.get_cancelled_exc_class() as exc:
          taken = exc.characters_written > 0
          raise
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final

try:
    import anyio
    import anyio.lowlevel
except ImportError as _exc:  # pragma: no cover - anyio is in the test extra
    raise ImportError(
        "fdchannel.anyio needs anyio (4.7 or later), which is not installed: pip install 'fdchannel[anyio]'"
    ) from _exc

from ._structured import Server, StructuredChannel, connect_with, serve_with

__all__ = ["AnyioChannel", "Server", "connect", "pair", "serve"]


class _Anyio:
    """anyio's waiting primitives, for `StructuredChannel`."""

    name: Final = "anyio"
    closed_resource_error: Final = anyio.ClosedResourceError
    wait_readable = staticmethod(anyio.wait_readable)
    wait_writable = staticmethod(anyio.wait_writable)
    notify_closing = staticmethod(anyio.notify_closing)
    checkpoint = staticmethod(anyio.lowlevel.checkpoint)
    checkpoint_if_cancelled = staticmethod(anyio.lowlevel.checkpoint_if_cancelled)
    sleep = staticmethod(anyio.sleep)
    move_on_after = staticmethod(anyio.move_on_after)
    event = staticmethod(anyio.Event)
    cancel_scope = staticmethod(anyio.CancelScope)
    task_group = staticmethod(anyio.create_task_group)

    @staticmethod
    def is_cancelled(exc: BaseException) -> bool:
        # Without asking the running backend (cheap, and right in any
        # context): asyncio's cancellation, or trio's when trio is loaded.
        if isinstance(exc, asyncio.CancelledError):
            return True
        trio = sys.modules.get("trio")
        return trio is not None and isinstance(exc, trio.Cancelled)


class AnyioChannel(StructuredChannel):
    """A message channel over a connected stream socket, for anyio (asyncio or trio backend).

    Each message is a payload of bytes and any number of fds; the receiver
    gets it back whole as one `Message` whose fds it owns.  The channel owns
    its socket (made non-blocking) and every fd it received but has not yet
    returned.  Sending never takes ownership of the caller's fds.

    Several tasks may call `send` at once (frames never interleave) and
    several may call `recv` at once (each gets whole messages).  Use a
    channel from one thread (one event loop) at a time.

    Errors: `ChannelClosed` when the peer closed between messages,
    `ProtocolError` for anything malformed (the channel is unusable after
    it), `OSError` subclasses from the kernel with errno intact, `ValueError`
    for calls on a closed channel.  See the module docstring for what
    cancellation does.
    """

    _kind = "AnyioChannel"
    _backend = _Anyio()


def pair(**kwargs: Any) -> tuple[AnyioChannel, AnyioChannel]:
    """`AnyioChannel.pair`: two connected channels over a new AF_UNIX socketpair (the caller's)."""
    return AnyioChannel.pair(**kwargs)


async def connect(path: str | bytes | os.PathLike[Any], **kwargs: Any) -> AnyioChannel:
    """Connect to the `serve` (or `fdchannel.Listener`) at *path*; the channel is the caller's.

    *path* is a filesystem path or, on Linux, an abstract name starting with
    ``"\\0"``.  ``expect_uid=`` (a uid or several) requires the server to run
    as that user, as on `fdchannel.Channel.connect`.  Other keyword arguments
    go to `AnyioChannel`.  Raises `OSError`
    (``FileNotFoundError``, ``ConnectionRefusedError``, ...) as
    ``socket.connect`` does.  Cancelled: the socket is closed, nothing leaks.
    """
    channel: AnyioChannel = await connect_with(AnyioChannel, path, kwargs)
    return channel


async def serve(
    handler: Callable[[AnyioChannel], Awaitable[object]],
    path: str | bytes | os.PathLike[Any],
    *,
    backlog: int = 128,
    mode: int = 0o600,
    task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Listen on the Unix socket *path* and run ``await handler(channel)`` per connection.

    The handler comes first, as in ``trio.serve_tcp(handler, port)`` and
    `asyncio.start_unix_server`.

    Meant for ``server = await task_group.start(serve, handler, path)``: it
    reports the `Server` once listening.  Handlers run in a task group of
    ``serve`` itself; each gets an `AnyioChannel` owned by the server (closed
    when the handler returns or raises).  An exception a handler raises is
    logged on the ``fdchannel.structured`` logger and serving goes on
    (cancellation is not caught).  ``serve`` returns after ``server.close()``
    once every handler finished; cancelling it cancels the handlers and
    closes the listener.

    The listening side is a `fdchannel.Listener`: the socket file gets the
    permission bits *mode* and no looser ones at any moment; a stale file is
    replaced, a live one raises `OSError` (``EADDRINUSE``), a path holding
    anything but a socket raises `FileExistsError`; ``"\\0name"`` is a Linux
    abstract socket.  *options* go to the `Listener` (``allow_uids``,
    ``allow_gids``, ``authorize``: refused peers are closed before anything
    is read, counted in ``server.listener.refused`` and logged) and to each
    channel (``max_payload``, ``max_fds``, ``max_held_fds``, ``frame_timeout``,
    ``budget``, ``transport``; as for a `fdchannel.Listener`, the channels
    share one `fdchannel.Budget` and get a 30 s ``frame_timeout`` unless
    told otherwise).
    """
    await serve_with(AnyioChannel, path, handler, task_status, backlog=backlog, mode=mode, options=options)
