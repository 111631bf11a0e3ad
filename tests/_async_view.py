"""Run the blocking Channel's behaviour tests against AsyncChannel (and TrioChannel, AnyioChannel).

`BlockingView` drives an `AsyncChannel` from ordinary threads: each pair
gets an event loop running in a thread of its own, and every call is a
coroutine submitted to it and waited for.  Calls from several threads
become concurrent tasks on that loop, and a call that times out is
cancelled, so the tests of concurrency and of a receive timeout exercise
the async channel's locks and its cancellation.  The structured kinds of
`tests/_structured.py` (``trio``, ``anyio-asyncio``, ``anyio-uvloop``,
``anyio-trio``) run
the same way, their run in a thread behind an anyio portal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import sys
import threading
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, Self, TypeVar

import pytest

from fdchannel import ChannelClosed, Message
from fdchannel.aio import AsyncChannel
from fdchannel.transports import PidfdGetfd, Transport, UnixRights, WinDuplicate

from ._aio import LOOP_FACTORIES
from ._structured import STRUCTURED_KINDS, PortalThread, channel_class, kind_marks
from ._transports import needs_pidfd

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread until `stop`."""

    def __init__(self, kind: str) -> None:
        factory = LOOP_FACTORIES[kind]
        assert factory is not None
        self.loop: asyncio.AbstractEventLoop = factory()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("timed out") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive(), "event loop thread did not stop"
        self.loop.close()


class BlockingView:
    """The blocking surface the shared tests use, over an `AsyncChannel`."""

    def __init__(self, channel: AsyncChannel, loop: _LoopThread | PortalThread) -> None:
        self.channel = channel
        self._loop = loop
        self._timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def send(self, payload: Any = b"", fds: Iterable[Any] = ()) -> None:
        self._loop.run(self.channel.send(payload, fds), self._timeout)

    def recv(self) -> Message:
        return self._loop.run(self.channel.recv(), self._timeout)

    def close(self) -> None:
        async def close() -> None:
            self.channel.close()

        self._loop.run(close(), self._timeout)

    @property
    def closed(self) -> bool:
        return self.channel.closed

    def fileno(self) -> int:
        return self.channel.fileno()

    @property
    def max_payload(self) -> int:
        return self.channel.max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self.channel.max_payload = value

    @property
    def max_fds(self) -> int:
        return self.channel.max_fds

    @max_fds.setter
    def max_fds(self, value: int) -> None:
        self.channel.max_fds = value

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.recv()
            except ChannelClosed:
                return

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncPairFactory:
    """``factory(**kwargs) -> (a, b)``: `BlockingView` ends of `AsyncChannel.pair`.

    Every pair made shares one loop thread; `shutdown` (after the test)
    closes what the test left open and stops the loop.
    """

    def __init__(self, kind: str, transport: type[Transport]) -> None:
        self.kind = kind
        self.transport = transport
        self._loop: _LoopThread | PortalThread | None = None
        self._views: list[BlockingView] = []
        self._cls: Any = channel_class(kind) if kind in STRUCTURED_KINDS else AsyncChannel

    def _start(self) -> _LoopThread | PortalThread:
        if self._loop is None:
            self._loop = PortalThread(self.kind) if self.kind in STRUCTURED_KINDS else _LoopThread(self.kind)
        return self._loop

    def __call__(self, **kwargs: Any) -> tuple[BlockingView, BlockingView]:
        self._start()
        assert self._loop is not None
        a, b = self._cls.pair(transport=self.transport(), **kwargs)
        views = BlockingView(a, self._loop), BlockingView(b, self._loop)
        self._views.extend(views)
        return views

    def adopt(self, sock: socket.socket, **kwargs: Any) -> BlockingView:
        """Wrap connected *sock* (now the channel's) in an `AsyncChannel` and a view."""
        loop = self._start()
        view = BlockingView(self._cls(sock, transport=self.transport(), **kwargs), loop)
        self._views.append(view)
        return view

    def shutdown(self) -> None:
        loop, self._loop = self._loop, None
        views, self._views = self._views, []
        if loop is None:
            return
        try:
            for view in views:
                view.settimeout(10)
                view.close()
        finally:
            loop.stop()

    def __repr__(self) -> str:
        return f"{self._cls.__name__}-{self.transport.__name__}-{self.kind}"


def _loop_marks(kind: str) -> list[Any]:
    if kind in STRUCTURED_KINDS:
        return kind_marks(kind)
    if LOOP_FACTORIES[kind] is None:
        return [pytest.mark.skipif(True, reason=f"{kind} cannot be imported")]
    return []


#: The platform's own in-process transport: SCM_RIGHTS on POSIX, DuplicateHandle on Windows.
NATIVE: type[Transport] = WinDuplicate if sys.platform == "win32" else UnixRights


def async_loop_params() -> list[Any]:
    """pytest params: ``(kind, NATIVE)`` for an `AsyncPairFactory`, per loop kind."""
    return [
        pytest.param((kind, NATIVE), id=_name(kind), marks=_loop_marks(kind))
        for kind in (*LOOP_FACTORIES, *STRUCTURED_KINDS)
    ]


def _name(kind: str) -> str:
    """The test id of a kind: its channel class and what runs it."""
    if kind in STRUCTURED_KINDS:
        return f"{STRUCTURED_KINDS[kind][0]}-{kind.removeprefix('anyio-')}"
    return f"AsyncChannel-{kind}"


def async_pair_params() -> list[Any]:
    """pytest params: ``(kind, transport)`` for an `AsyncPairFactory`, per loop kind and transport."""
    params = []
    for kind in (*LOOP_FACTORIES, *STRUCTURED_KINDS):
        marks = _loop_marks(kind)
        name = _name(kind)
        if sys.platform == "win32":
            params.append(pytest.param((kind, WinDuplicate), id=f"{name}-WinDuplicate", marks=marks))
            continue
        params.append(pytest.param((kind, UnixRights), id=f"{name}-UnixRights", marks=marks))
        params.append(pytest.param((kind, PidfdGetfd), id=f"{name}-PidfdGetfd", marks=[*marks, needs_pidfd]))
    return params
