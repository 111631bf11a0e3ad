"""fdchannel.shm where sealed memory does not exist: it says so, and the threshold mode sends in band."""

from __future__ import annotations

import sys

import pytest

from fdchannel import shm
from fdchannel.shm import SealedMemory

from ._transports import PairFactory

no_memfd = pytest.mark.skipif(
    sys.platform == "linux", reason="Linux has memfd seals: test_shm.py covers it with real memfds"
)


def test_availability_matches_the_platform() -> None:
    assert shm.available() is (sys.platform == "linux")


@no_memfd
def test_creating_sealed_memory_says_what_is_missing() -> None:
    with pytest.raises(NotImplementedError, match="needs Linux"):
        SealedMemory.copy(b"data")
    with pytest.raises(NotImplementedError, match="share_above"):
        SealedMemory.build(10, lambda view: None)


@no_memfd
def test_share_above_falls_back_to_in_band_bytes(make_pair: PairFactory) -> None:
    a, b = make_pair()
    with a, b:
        shm.share_above(a, 10)
        a.send(b"x" * 1000)
        with b.recv() as msg:
            assert msg.shared is None
            assert msg.payload == b"x" * 1000
