"""Connecting to a listener whose backlog is full waits for it, within the timeout, then fails clearly.

On Linux a non-blocking AF_UNIX connect to a full backlog fails with EAGAIN
and leaves the socket unconnected (no connect in progress), yet writable:
a loop that waits for writability "connects" it.  Real listeners
(``listen(0)``: one pending connection fills it), real connects.
"""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fdchannel import Channel, Listener, aio

from ._aio import loop_kind, run  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux AF_UNIX backlog (EAGAIN)")

Run = Callable[..., Any]

WAIT = 0.3


@pytest.fixture
def full(tmp_path: Path) -> Iterator[tuple[str, Listener]]:
    """A listener with listen(0) and one connection pending: its backlog is full."""
    path = str(tmp_path / "srv")
    with Listener(path, backlog=0) as listener:
        listener.settimeout(10)
        first = Channel.connect(path, timeout=5)
        try:
            yield path, listener
        finally:
            first.close()


def test_connect_waits_for_a_full_backlog_then_times_out(full: tuple[str, Listener]) -> None:
    path, _listener = full
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="backlog is full"):
        Channel.connect(path, timeout=WAIT)
    assert time.monotonic() - started >= WAIT


def test_connect_is_accepted_once_the_backlog_has_room(full: tuple[str, Listener]) -> None:
    path, listener = full
    got: list[Channel] = []
    failed: list[BaseException] = []

    def connect() -> None:
        try:
            got.append(Channel.connect(path, timeout=20))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        with listener.accept() as first_accepted, listener.accept() as second:
            thread.join(20)
            assert not failed, failed
            (ch,) = got
            with ch:
                ch.send(b"through", [0])
                with second.recv() as msg:
                    assert msg.payload == b"through"
            assert first_accepted is not None
    finally:
        thread.join(20)
        for ch in got:
            ch.close()


def test_aio_connect_waits_for_a_full_backlog_then_times_out(full: tuple[str, Listener], run: Run) -> None:
    path, _listener = full

    async def body() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="backlog is full"):
            await aio.connect(path, timeout=WAIT)
        return time.monotonic() - started

    assert run(body()) >= WAIT


def test_aio_connect_without_a_timeout_waits_and_can_be_cancelled(
    full: tuple[str, Listener], run: Run
) -> None:
    """It used to return at once a channel whose socket was not connected (send: ENOTCONN)."""
    path, _listener = full

    async def body() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(aio.connect(path), WAIT)  # cancelled while it waits: nothing leaks

    run(body())


def test_aio_connect_is_accepted_once_the_backlog_has_room(full: tuple[str, Listener], run: Run) -> None:
    path, listener = full

    async def body() -> None:
        connecting = asyncio.ensure_future(aio.connect(path))  # no timeout: waits as long as it takes
        first = await asyncio.to_thread(listener.accept)
        second = await asyncio.to_thread(listener.accept)
        with first, second:
            async with await connecting as ch:
                await ch.send(b"through", [0])
                with await asyncio.to_thread(second.recv) as msg:
                    assert msg.payload == b"through"

    run(body())
