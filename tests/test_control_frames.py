"""A malformed transport control frame makes either channel unusable, and says so."""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fdchannel import Channel, ProtocolError
from fdchannel._codec import pack_header
from fdchannel.aio import AsyncChannel
from fdchannel.transports import PidfdGetfd

from ._aio import loop_kind, run  # noqa: F401 - fixtures
from ._transports import PIDFD_UNAVAILABLE

Run = Callable[..., Any]

pytestmark = pytest.mark.skipif(PIDFD_UNAVAILABLE is not None, reason=PIDFD_UNAVAILABLE or "")

BAD_CONTROL = pack_header(PidfdGetfd.wire_id, 0, 0, 3, control=True) + b"bad"


@pytest.fixture
def raw_and_sock() -> Iterator[tuple[socket.socket, socket.socket]]:
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(10)
    with raw:
        yield raw, other


def test_blocking_recv(raw_and_sock: tuple[socket.socket, socket.socket]) -> None:
    raw, other = raw_and_sock
    with Channel(other, transport=PidfdGetfd()) as ch:
        ch.settimeout(10)
        raw.sendall(BAD_CONTROL)
        with pytest.raises(ProtocolError, match="malformed PidfdGetfd control frame"):
            ch.recv()
        with pytest.raises(ProtocolError, match=r"unusable.*malformed"):
            ch.recv()
        with pytest.raises(ProtocolError, match=r"unusable.*malformed"):
            ch.send(b"x")


def test_blocking_send_sees_it_while_reading_acknowledgements(
    raw_and_sock: tuple[socket.socket, socket.socket],
) -> None:
    raw, other = raw_and_sock
    with Channel(other, transport=PidfdGetfd()) as ch:
        ch.settimeout(10)
        raw.sendall(BAD_CONTROL)
        with pytest.raises(ProtocolError, match="malformed PidfdGetfd control frame") as first:
            ch.send(b"x")  # send() reads pending control frames first
        with pytest.raises(ProtocolError, match="unusable") as later:
            ch.recv()
        assert later.value.__cause__ is first.value


def test_async_recv_and_send(raw_and_sock: tuple[socket.socket, socket.socket], run: Run) -> None:
    raw, other = raw_and_sock

    async def body() -> None:
        async with AsyncChannel(other, transport=PidfdGetfd()) as ch:
            raw.sendall(BAD_CONTROL)
            with pytest.raises(ProtocolError, match="malformed PidfdGetfd control frame"):
                await ch.recv()
            with pytest.raises(ProtocolError, match=r"unusable.*malformed"):
                await ch.send(b"x")

    run(body())


def test_async_send_sees_it_first(raw_and_sock: tuple[socket.socket, socket.socket], run: Run) -> None:
    raw, other = raw_and_sock

    async def body() -> None:
        async with AsyncChannel(other, transport=PidfdGetfd()) as ch:
            raw.sendall(BAD_CONTROL)
            # The same outcome as the blocking channel's send(): the peer's
            # own error, from the send() that read it, then chained ones.
            with pytest.raises(ProtocolError, match="malformed PidfdGetfd control frame") as first:
                await ch.send(b"x")
            with pytest.raises(ProtocolError, match="unusable") as later:
                await ch.recv()
            assert later.value.__cause__ is first.value

    run(body())
