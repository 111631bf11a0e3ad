"""Shared fixtures: every test proves it leaked no fd."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest


def open_fds() -> dict[int, str]:
    """Map each fd open in this process to what it points at."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory fd listdir itself used
            continue
    return fds


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    """Fail the test if it leaves any fd open that was not open before."""
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    after = open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert not leaked, f"test leaked fds: {leaked}"


from ._transports import PAIR_FACTORIES, PairFactory  # noqa: E402


@pytest.fixture(params=PAIR_FACTORIES)
def make_pair(request: pytest.FixtureRequest) -> PairFactory:
    """A function returning a connected (a, b) channel pair for one transport."""
    factory: PairFactory = request.param
    return factory
