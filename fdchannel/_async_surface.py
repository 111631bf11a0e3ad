"""What every async channel has besides its waiting: iteration, closing, pickling.

`fdchannel.aio.AsyncChannel` and the trio/anyio `StructuredChannel` wait in
their own ways; this is the part of their surface that does not wait, so it
is written once.
"""

from __future__ import annotations

import socket
import weakref
from typing import TYPE_CHECKING, Any, Self

from ._codec import Decoder
from ._core import ChannelCore
from ._errors import ChannelClosed
from ._guard import run_held
from ._handoff import reduce_channel
from ._message import Message
from ._sockio import stall_delay, write_pending

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._channel import Channel
    from .transports import Session, Transport

__all__ = ["AsyncSurface"]


class AsyncSurface(ChannelCore):
    """The non-waiting part of an async channel's public surface (a base class)."""

    if TYPE_CHECKING:

        async def recv(self) -> Message: ...

    # -- taking over a blocking Channel (both kinds' from_channel) ------------------

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
        raise NotImplementedError

    @classmethod
    def _take_over(cls, channel: Channel) -> Self:
        """``from_channel``: *channel*'s state in a new channel of *cls*, or nothing moved."""
        ch: Any = channel  # its private state, by design: same package
        if ch._closed:
            raise ValueError("cannot take over a closed Channel")
        taken: list[Self] = []

        def move() -> None:
            # An end inherited across fork serves one process, taken over
            # or not: another child's use raises ValueError here.
            ch._claim()
            # Made first: from the set-up on, nothing between it and the
            # hand-over below is a call (no point where a signal handler runs).
            fresh = Decoder(wire_id=0, in_band=False, max_payload=0, max_fds=0, max_aux=0)
            new = cls.__new__(cls)
            try:
                new._setup(
                    ch._sock,
                    ch._transport,
                    ch._session,
                    ch._decoder,
                    max_payload=ch.max_payload,
                    max_fds=ch.max_fds,
                    greet=False,
                )
                # Chunks a blocking channel leaves pending are detached: they
                # own their bytes and fds, so the whole outbox changes hands
                # (before any control frame: it may hold a frame's rest).
                new._outbox, ch._outbox = ch._outbox, new._outbox
                # The decoder is this channel's now: the old one's clean-up
                # (a call on it after this, its close) must not release it.
                ch._decoder = fresh
                new._broken = ch._broken
                new._eof = ch._eof
                new._share_above = ch._share_above
                ch._closed = True
                taken.append(new)
            except BaseException:
                if not taken:
                    # Cut short in the set-up: nothing moved.  The half-made
                    # channel must not close the socket as it goes (no call
                    # before this store), and the decoder reports to *ch* again.
                    new._closed = True
                    ch._decoder.on_evict = weakref.WeakMethod(ch._evicted)
                raise
            if new._has_control:
                new._flush_control_nowait()

        def move_receiving() -> None:
            if not run_held(ch._recv_guard(), move):
                raise RuntimeError("the Channel is in use by another thread (recv)")

        if not run_held(ch._send_guard(), move_receiving):
            raise RuntimeError("the Channel is in use by another thread (send)")
        return taken[0]

    # -- what a subclass supplies: its way of waiting ------------------------------

    async def _wait_writable(self) -> None:
        raise NotImplementedError

    async def _sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def _is_cancellation(self, exc: BaseException) -> bool:
        raise NotImplementedError

    async def _push(self, before: int | None) -> None:
        """Write queued chunks until none is left, waiting for writability.

        *before*: bytes of the current message written before the call
        (``None`` when flushing older data).  How a cancellation or a failure
        ends the message is the outbox's rule (`Outbox.paused`, `Outbox.failed`).
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
                    await self._sleep(stall_delay(stalls))  # writable, yet nothing went: do not spin
                await self._wait_writable()
        except BaseException as exc:
            if self._is_cancellation(exc):
                self._push_paused(exc, before, written)
            else:
                self._push_failed(exc, before, written)
            raise

    def __aiter__(self) -> AsyncIterator[Message]:
        """Iterate with ``async for``: messages until the peer closes the channel.

        Returns:
            The channel itself; each step awaits `recv`, `ChannelClosed`
                ends the loop and any other error propagates.
        """
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except ChannelClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Close the socket and every fd the channel holds.  Idempotent.

        The remainder of a cancelled send is written if the socket takes it
        without waiting, otherwise dropped (the peer then sees a message cut
        short).  Messages received but not yet returned are closed with their
        fds.  Tasks waiting in `recv` get `ChannelClosed`, tasks waiting in
        `send` get `ValueError`.
        """
        super().close()

    def __reduce__(self) -> tuple[Any, ...]:
        # As Channel: multiprocessing.Process(args=(channel,)) hands the
        # socket to the child (which rebuilds a channel of this class);
        # anything else is a TypeError.
        return reduce_channel(self)

    async def aclose(self) -> None:
        """Close the channel as `close` does; an ``await`` for ``async with`` symmetry."""
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
