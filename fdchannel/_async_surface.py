"""What every async channel has besides its waiting: iteration, closing, pickling.

`fdchannel.aio.AsyncChannel` and the trio/anyio `StructuredChannel` wait in
their own ways; this is the part of their surface that does not wait, so it
is written once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from ._core import ChannelCore
from ._errors import ChannelClosed
from ._handoff import reduce_channel
from ._message import Message

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["AsyncSurface"]


class AsyncSurface(ChannelCore):
    """The non-waiting part of an async channel's public surface (a base class)."""

    if TYPE_CHECKING:

        async def recv(self) -> Message: ...

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
