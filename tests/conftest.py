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
    """Fail the test if it leaves any fd open that was not open before.

    An fd still held by garbage that a collection would close is no leak:
    only when something new is open does this collect (a full collection
    per test would cost more than most tests) and look again.
    """
    before = open_fds()
    yield
    leaked = _new_fds(before)
    if leaked:
        gc.collect()
        leaked = _new_fds(before)
    assert not leaked, f"test leaked fds: {leaked}"


def _new_fds(before: dict[int, str]) -> dict[int, str]:
    return {fd: target for fd, target in open_fds().items() if before.get(fd) != target}


from ._transports import PAIR_FACTORIES, PairFactory  # noqa: E402


@pytest.fixture(params=PAIR_FACTORIES)
def make_pair(request: pytest.FixtureRequest) -> PairFactory:
    """A function returning a connected (a, b) channel pair for one transport."""
    factory: PairFactory = request.param
    return factory
