"""A closed or failed channel lets go of its buffers at once, without the cyclic GC.

The cyclic collector is disabled while each test runs: whatever is still
alive after ``close()`` and ``del`` is held by a reference cycle (or by the
channel itself), and stays until a collection nobody scheduled.
"""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import threading
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fdchannel import Channel, ProtocolError
from fdchannel._codec import pack_header
from fdchannel.aio import AsyncChannel
from fdchannel.transports import UnixRights

from ._aio import loop_kind, run  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="AF_UNIX socketpair with SCM_RIGHTS")

Run = Callable[..., Any]

#: Bytes of a large message that arrive before the peer breaks the stream.
PART = 8 * 1024 * 1024
#: What may stay allocated after a channel is freed: CPython's free lists
#: keep up to 2,000 small tuples each (tracemalloc counts them), nothing
#: near the megabytes of a message.
SLACK = 512 * 1024


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _send_part(raw: socket.socket, then_end: bool) -> threading.Thread:
    """In a thread: declare a 16 MiB payload and send PART of it, then (if *then_end*) end the stream."""

    def send() -> None:
        raw.sendall(pack_header(UnixRights().wire_id, 0, 0, 2 * PART) + bytes(PART))
        if then_end:
            raw.shutdown(socket.SHUT_WR)

    raw.settimeout(30)
    thread = threading.Thread(target=send)
    thread.start()
    return thread


def _break_mid_message(raw: socket.socket) -> threading.Thread:
    """A ProtocolError for the reader: the stream ends in the middle of a message."""
    return _send_part(raw, True)


def test_a_channel_broken_by_a_protocol_error_is_freed_without_gc(no_gc: None) -> None:
    raw, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with raw:
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            ch = Channel(sock, max_payload=2 * PART)
            ch.settimeout(10)
            sender = _break_mid_message(raw)
            with pytest.raises(ProtocolError):
                ch.recv()
            sender.join(30)
            # Failing released the partial message at once, before close().
            failed, _ = tracemalloc.get_traced_memory()
            assert failed - before < PART // 4, f"{(failed - before) >> 20} MiB still held after the failure"
            with pytest.raises(ProtocolError):
                ch.recv()  # the later error, chained to the first
            ch.close()
            ref = weakref.ref(ch)
            del ch
            assert ref() is None, gc.get_referrers(ref())
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert after - before < SLACK, f"{after - before} bytes still held after close() and del"


def test_a_closed_channel_holding_a_partial_message_is_freed_without_gc(no_gc: None) -> None:
    raw, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with raw:
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            ch = Channel(sock, max_payload=2 * PART)
            sender = _send_part(raw, False)
            ch.settimeout(0.0)
            while ch._decoder.received < PART:
                with pytest.raises(BlockingIOError):
                    ch.recv()  # half a message in hand, kept for the next call
            sender.join(30)
            ch.close()
            ref = weakref.ref(ch)
            del ch
            assert ref() is None
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert after - before < SLACK, f"{after - before} bytes still held after close() and del"


def test_an_async_channel_broken_by_a_protocol_error_is_freed_without_gc(no_gc: None, run: Run) -> None:
    async def body() -> tuple[bool, int, int]:
        raw, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with raw:
            tracemalloc.start()
            try:
                before, _ = tracemalloc.get_traced_memory()
                ch = AsyncChannel(sock, max_payload=2 * PART)
                sender = _break_mid_message(raw)
                with pytest.raises(ProtocolError):
                    await ch.recv()
                await asyncio.to_thread(sender.join, 30)
                failed, _ = tracemalloc.get_traced_memory()
                ch.close()
                ref = weakref.ref(ch)
                del ch
                alive = ref() is not None
                after, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        return alive, failed - before, after - before

    alive, failed, after = run(body())
    assert failed < PART // 4, f"{failed >> 20} MiB still held after the failure"
    assert not alive
    assert after < SLACK, f"{after} bytes still held after close() and del"
