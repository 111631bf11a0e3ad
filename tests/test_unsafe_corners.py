"""Corners where a number could cross into the wrong hands: pickling, bools, collection under -W error."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import pickle
import sys
import warnings

import pytest

from fdchannel import Channel, Message, OwnedFd
from fdchannel.aio import AsyncChannel

from ._proc import finish_process
from .test_process import _mp_helpers_running  # noqa: F401 - fixture

TIMEOUT = 30.0


def test_an_owned_fd_refuses_pickling() -> None:
    r, w = os.pipe()
    os.close(w)
    with OwnedFd(r) as fd, pytest.raises(TypeError, match="OwnedFd cannot be pickled"):
        pickle.dumps(fd)


def test_a_message_refuses_pickling() -> None:
    r, w = os.pipe()
    os.close(w)
    with Message(b"x", (OwnedFd(r),)) as msg, pytest.raises(TypeError, match="Message cannot be pickled"):
        pickle.dumps(msg)


def test_an_async_channel_refuses_pickling_outside_multiprocessing() -> None:
    a, b = AsyncChannel.pair()
    with pytest.raises(TypeError, match="AsyncChannel cannot be pickled"):
        pickle.dumps(a)
    a.close()
    b.close()


def _async_child(channel: AsyncChannel) -> None:
    async def main() -> None:
        async with channel:
            msg = await channel.recv()
            await channel.send(b"child got " + msg.payload)

    asyncio.run(main())


@pytest.mark.usefixtures("_mp_helpers_running")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_an_async_channel_goes_to_a_multiprocessing_child(method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method on {sys.platform}")
    ctx = multiprocessing.get_context(method)
    a, b = AsyncChannel.pair()
    proc = ctx.Process(target=_async_child, args=(b,))
    proc.start()
    b.close()

    async def main() -> bytes:
        async with a:
            await a.send(b"hello")
            async with asyncio.timeout(TIMEOUT):
                return (await a.recv()).payload

    try:
        assert asyncio.run(main()) == b"child got hello"
    finally:
        finish_process(proc)


def test_a_bool_is_not_an_fd() -> None:
    a, b = Channel.pair()
    with a, b, pytest.raises(TypeError, match="bool"):
        a.send(b"x", fds=[True])


def test_collected_owned_fd_is_closed_even_when_the_warning_is_an_error() -> None:
    r, w = os.pipe()
    os.close(w)
    fd = OwnedFd(r)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with pytest.raises(ResourceWarning):
            fd.__del__()  # what the collector runs
    with pytest.raises(OSError) as info:
        os.fstat(r)
    assert info.value.errno == errno.EBADF  # (Windows words it "Invalid handle")
