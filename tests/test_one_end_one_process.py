"""A channel end reaches one process: multiprocessing paths that would share it refuse, visibly.

``Pool(initargs=(channel,))`` and ``ProcessPoolExecutor(initargs=(channel,))``
hand the same arguments to every worker: under ``spawn``/``forkserver`` by
pickling them once per worker, under ``fork`` by inheritance.  Several
workers on one end interleave their frames.  Real pools, real processes.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from fdchannel import Channel

from ._proc import needs_fork

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX start methods")

if sys.platform != "win32":
    # The resource tracker's pipe stays open for the life of the process once
    # a spawn start method ran: open it now, outside any test, so the
    # fd-leak check sees only what tests leave.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()

_channel: Channel | None = None
_sync: Any = None


def _keep(channel: Channel, sync: Any = None) -> None:
    global _channel, _sync
    _channel, _sync = channel, sync


def _send_from_worker(i: int) -> int:
    assert _channel is not None
    if _sync is not None:
        arrived, go = _sync
        arrived.release()
        assert go.wait(20)  # both workers hold a task: each sends from its own process
    _channel.send(b"worker %d" % i)
    return i


def _reap() -> None:
    """Join the pool's exited workers: multiprocessing keeps them (and their pipes) until asked."""
    multiprocessing.active_children()


def test_a_spawn_pool_refuses_one_end_for_every_worker() -> None:
    ours, theirs = Channel.pair()
    with ours, theirs:
        ctx = multiprocessing.get_context("spawn")
        try:
            with pytest.raises(ValueError, match="already handed to another process"):
                ctx.Pool(2, initializer=_keep, initargs=(theirs,))
        finally:
            _reap()


def test_a_spawn_process_pool_executor_refuses_one_end_for_every_worker() -> None:
    ours, theirs = Channel.pair()
    with ours, theirs:
        ctx = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(2, mp_context=ctx, initializer=_keep, initargs=(theirs,))
        try:
            with pytest.raises(ValueError, match="already handed to another process"):
                # The executor starts a worker per task until it has two.
                for i in range(2):
                    executor.submit(_send_from_worker, i)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            _reap()


def test_one_process_still_takes_the_end() -> None:
    ours, theirs = Channel.pair()
    with ours, theirs:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1, initializer=_keep, initargs=(theirs,)) as pool:
            assert pool.apply(_send_from_worker, (7,)) == 7
        ours.settimeout(20)
        with ours.recv() as msg:
            assert msg.payload == b"worker 7"


@needs_fork
def test_a_fork_pool_refuses_the_second_worker_that_uses_one_end() -> None:
    ctx = multiprocessing.get_context("fork")
    ours, theirs = Channel.pair()
    arrived, go = ctx.Semaphore(0), ctx.Event()
    with ours, theirs:
        with ctx.Pool(2, initializer=_keep, initargs=(theirs, (arrived, go))) as pool:
            results = [pool.apply_async(_send_from_worker, (i,)) for i in range(2)]
            for _ in range(2):
                assert arrived.acquire(timeout=20)
            go.set()
            outcomes = []
            for r in results:
                try:
                    outcomes.append(r.get(30))
                except ValueError as exc:
                    assert "already in use by another process" in str(exc)
                    outcomes.append("refused")
        # One worker sent, the other was refused: never two writers on one end.
        assert sorted(map(str, outcomes))[1] == "refused", outcomes
        assert sum(o == "refused" for o in outcomes) == 1, outcomes
        ours.settimeout(20)
        with ours.recv() as msg:
            assert msg.payload in (b"worker 0", b"worker 1")
    _reap()
