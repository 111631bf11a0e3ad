"""Real child processes for tests, with timeouts instead of hangs.

POSIX only at call time (fork, waitpid, resource limits); the module itself
imports everywhere, so a test module that needs one of these only in some
tests marks those with `needs_fork` or `needs_rlimit`.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import open_fds

TIMEOUT = 30.0

#: For the tests that fork a child (`fork_child`, `run_child`).
needs_fork = pytest.mark.skipif(sys.platform == "win32", reason="needs os.fork(), which Windows lacks")
#: For the tests that lower RLIMIT_NOFILE (`limit_fds_to_free_slots`).
needs_rlimit = pytest.mark.skipif(
    sys.platform == "win32", reason="needs setrlimit(RLIMIT_NOFILE): Windows has no resource limits"
)


def fork_child(body: Callable[[], object]) -> int:
    """Run *body* in a forked child that exits 0 on success, 1 on any exception."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float = TIMEOUT) -> int:
    """Wait for *pid* at most *timeout* seconds; kill it and fail on a hang.

    Returns the exit code (negative signal number if killed by a signal).
    """
    if not hasattr(os, "pidfd_open"):  # macOS, the BSDs: poll waitpid
        return _poll_child(pid, timeout)
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout}s")
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _poll_child(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout}s")
        time.sleep(0.005)


def run_child(body: Callable[[], object], timeout: float = TIMEOUT) -> None:
    """Fork, run *body* in the child, and assert it succeeded."""
    code = wait_child(fork_child(body), timeout)
    assert code == 0, f"child failed with exit code {code}"


def limit_fds_to_free_slots(free: int) -> None:
    """Lower RLIMIT_NOFILE so that exactly *free* more fds can be opened."""
    import resource

    used = sorted(fd for fd in open_fds() if isinstance(fd, int))
    limit = 0
    while limit - sum(fd < limit for fd in used) < free or limit in used:
        limit += 1
    # Numbers below `limit` hold exactly `free` holes; the fd limit makes
    # everything from `limit` up unusable.
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def finish_process(proc: Any, timeout: float = TIMEOUT) -> None:
    """Join a started `multiprocessing.Process` and assert it exited 0; kill it on a hang.

    Always releases the process object (``close``), so no pipe of it is left open.
    """
    try:
        proc.join(timeout)
        assert proc.exitcode == 0, f"process exited with {proc.exitcode}"
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        proc.close()
