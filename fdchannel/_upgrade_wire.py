"""What `fdchannel.upgrade` sends between a process and its successor, and small helpers.

Every message is one `Channel` message whose payload is a JSON object with a
``"kind"``:

- ``fds`` (old to new): ``names`` lists ``[name, count]`` pairs; the message
  carries the fds of every name, in that order (any number: the channel
  splits them into batches on the wire).  ``pid`` is the old process.
- ``ready`` (new to old): set up and serving; ``pid`` is the successor.
- ``refused`` (new to old): the successor cannot take over; ``reason`` says why.
- ``busy`` (old to a would-be successor): another upgrade runs or this
  process already handed over; ``reason`` says which.
- ``released`` (old to new, after ``ready``): the old process stopped
  accepting and closed its control endpoint (the successor may bind it now).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ._errors import UpgradeFailed
from ._ownedfd import OwnedFd, fileno_of
from ._wait import ready_among

__all__ = [
    "ENV_MARKER",
    "VERSION",
    "ProcessHandle",
    "decode",
    "encode",
    "sibling_handle",
    "split_fds",
    "write_pid_file",
]

#: Set (to "1") in the environment of a successor started by `Upgrader.upgrade`.
ENV_MARKER: Final = "FDCHANNEL_UPGRADE"
VERSION: Final = 1
KINDS: Final = frozenset({"fds", "ready", "refused", "busy", "released"})


def encode(kind: str, **fields: object) -> bytes:
    return json.dumps({"fdchannel-upgrade": VERSION, "kind": kind, **fields}).encode()


def decode(payload: bytes | bytearray) -> dict[str, Any]:
    """The message's fields; `UpgradeFailed` for anything this protocol does not send."""
    try:
        message = json.loads(bytes(payload))
    except ValueError:
        message = None
    if (
        not isinstance(message, dict)
        or message.get("fdchannel-upgrade") != VERSION
        or message.get("kind") not in KINDS
    ):
        raise UpgradeFailed(f"the peer sent no upgrade message: {bytes(payload[:80])!r}")
    return message


def handover(registry: Mapping[str, Sequence[Any]]) -> tuple[bytes, list[int]]:
    """The ``fds`` message for *registry* (name to fds), and its fds in order."""
    names = [[name, len(fds)] for name, fds in registry.items()]
    nums = [fileno_of(fd) for fds in registry.values() for fd in fds]
    return encode("fds", names=names, pid=os.getpid()), nums


def split_fds(message: dict[str, Any], fds: Sequence[OwnedFd]) -> dict[str, list[OwnedFd]]:
    """The fds of an ``fds`` message, by name.  On a malformed message the caller closes *fds*."""
    names = message.get("names")
    if not isinstance(names, list) or not all(
        isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], int)
        and entry[1] >= 0
        for entry in names
    ):
        raise UpgradeFailed(f"the predecessor sent a malformed fd list: {names!r:.200}")
    if sum(count for _, count in names) != len(fds):
        raise UpgradeFailed(f"the predecessor named {names!r:.200} but sent {len(fds)} fds")
    result: dict[str, list[OwnedFd]] = {}
    at = 0
    for name, count in names:
        result.setdefault(name, []).extend(fds[at : at + count])
        at += count
    return result


def write_pid_file(path: str | os.PathLike[str], pid: int) -> None:
    """Replace *path* atomically with *pid*: a reader sees the old file or the new one, never half."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with open(fd, "w") as f:
            f.write(f"{pid}\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0o600; pid files are read by others
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class ProcessHandle:
    """A successor process to kill and wait for: our child (a Popen) or a sibling (a pid).

    A sibling is held by a pidfd where Linux has them, so a signal never
    reaches another process that reused the number: given *pidfd* (the
    kernel's pidfd of the process that connected, ``SO_PEERPIDFD``, Linux
    6.5+; the handle takes it over) it names that process whatever happened
    since.  Without one (*pid* only: older kernels) it is opened here with
    ``pidfd_open``, which can name a process that reused the pid if the
    successor exited between its connect and this call; elsewhere signals
    go by pid, with the same window.  Siblings cannot be reaped here:
    waiting means watching the pidfd (elsewhere, polling with signal 0).
    *gone* says the sibling is known to have exited already.
    """

    def __init__(
        self, *, popen: Any = None, pid: int | None = None, pidfd: OwnedFd | None = None, gone: bool = False
    ) -> None:
        self.popen = popen
        self.pid: int | None = popen.pid if popen is not None else pid
        self._pidfd = -1
        self._gone = gone
        if pidfd is not None:
            self._pidfd = pidfd.detach()
        elif (
            popen is None
            and pid is not None
            and not gone
            and sys.platform == "linux"
            and hasattr(os, "pidfd_open")
        ):
            try:
                self._pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._gone = True

    def exit_code(self, timeout: float) -> int | None:
        """Wait at most *timeout* for the process to end; its exit code (None if unknown or alive)."""
        if self.popen is not None:
            try:
                code: int = self.popen.wait(timeout)
                return code
            except Exception:  # subprocess.TimeoutExpired
                return None
        self._wait_gone(timeout)
        return None

    def alive(self) -> bool:
        if self.popen is not None:
            return bool(self.popen.poll() is None)
        return not self._wait_gone(0.0)

    def _wait_gone(self, timeout: float) -> bool:
        if self.pid is None or self._gone:
            return True
        if self._pidfd >= 0:
            return bool(ready_among((self._pidfd,), max(timeout, 0.0)))
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def kill(self) -> int | None:
        """Kill the process (if alive) and wait for it (bounded); its exit code when known."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            code: int = self.popen.wait()
            return code
        if self.pid is not None and not self._gone:
            try:
                if sys.platform == "linux" and self._pidfd >= 0:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                elif sys.platform != "win32":
                    os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
            self._wait_gone(5.0)
        return None

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def sibling_handle(channel: Any) -> ProcessHandle:
    """A `ProcessHandle` of the peer of accepted *channel*, by the kernel's pidfd where there is one.

    ``SO_PEERPIDFD`` (Linux 6.5+) names the process that connected even if
    it exited and its pid was reused; where the kernel lacks it
    (``ENOPROTOOPT``) the pid is opened instead (see `ProcessHandle`).  A
    kernel that has it but cannot make a pidfd of a peer that exited
    already (``EINVAL`` before Linux 6.16 or so) means the peer is gone: the
    handle then signals nobody.  Raises `OSError` when the credentials
    cannot be read (``EMFILE`` for the pidfd, ...).
    """
    try:
        creds = channel.peer_credentials(pidfd=True)
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT or sys.platform != "linux":
            return ProcessHandle(pid=channel.peer_credentials().pid)
        if exc.errno == errno.EINVAL:
            return ProcessHandle(pid=channel.peer_credentials().pid, gone=True)
        raise
    return ProcessHandle(pid=creds.pid, pidfd=creds.pidfd)
