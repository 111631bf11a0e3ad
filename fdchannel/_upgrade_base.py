"""What `Upgrader` and `AsyncUpgrader` share: the registry, the inherited fds, the exit signal.

Below `fdchannel.upgrade` and `fdchannel._upgrade_aio`, which add the waits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from typing import Any, Final

from . import _upgrade_wire as wire
from . import systemd as _systemd
from ._channel import Channel
from ._errors import (
    ChannelClosed,
    FdChannelError,
    UpgradeError,
    UpgradeFailed,
    UpgradeInProgress,
    UpgradeRefused,
    UpgradeTimeout,
)
from ._listener import Listener
from ._ownedfd import OwnedFd, fileno_of
from ._peer import PeerCredentials

__all__ = ["CONNECT_ERRORS", "DEFAULT_MAX_FDS", "Base", "log", "say_busy"]

log: Final = logging.getLogger("fdchannel.upgrade")

#: fds one handover may carry unless told otherwise (both ends agree on it).
DEFAULT_MAX_FDS: Final = 65536
CONNECT_ERRORS: Final = (FileNotFoundError, ConnectionRefusedError)
_successors: list[Any] = []


def _require_posix() -> None:
    if sys.platform == "win32":
        raise OSError(errno.ENOTSUP, "fdchannel.upgrade needs POSIX fd inheritance and AF_UNIX")


def _euid() -> int:
    if sys.platform == "win32":
        raise OSError(errno.ENOTSUP, "no uids on Windows")
    return os.geteuid()


def _exit_pipe() -> tuple[int, int]:
    """The pipe `fileno` reads: a byte in it means "exit"; its write end never blocks."""
    r, w = os.pipe()
    if sys.platform != "win32":
        os.set_blocking(w, False)
    return r, w


class Base:
    """What both forms share: the registry, what was inherited, the exit signal, in-flight work."""

    def __init__(
        self,
        *,
        control_path: str | bytes | os.PathLike[Any] | None,
        pid_file: str | os.PathLike[str] | None,
        ready_timeout: float,
        allow_uids: Collection[int] | None,
        authorize: Callable[[PeerCredentials], object] | None,
        max_fds: int,
        systemd: bool,
    ) -> None:
        _require_posix()
        if ready_timeout <= 0:
            raise ValueError("ready_timeout must be positive")
        self.control_path = control_path
        self.pid_file = pid_file
        self.ready_timeout = ready_timeout
        self._allow_uids = frozenset({_euid()} if allow_uids is None else allow_uids)
        self._authorize = authorize
        self._max_fds = max_fds
        self._systemd = systemd
        self._registry: dict[str, list[Any]] = {}
        #: What the predecessor (or the service manager) handed over: name -> fds.
        #: Owned here until taken (`take`, `socket`); `close` closes the rest.
        self.inherited: dict[str, list[OwnedFd]] = {}
        #: The pid of the process this one took over from, if any.
        self.predecessor_pid: int | None = None
        #: The pid of the successor of the last successful upgrade, if any.
        self.successor_pid: int | None = None
        self._predecessor: Channel | None = None
        self._listener: Listener | None = None
        self._busy = threading.Lock()
        self._exiting = False
        self._ready = False
        self._closed = False
        self._exit_r, self._exit_w = _exit_pipe()
        self._work = 0
        self._work_done = threading.Condition()
        self._idle_callbacks: list[Callable[[], object]] = []

    # -- what the successor inherits --------------------------------------------------

    def register(self, name: str, *fds: int | Any) -> None:
        """Hand *fds* (ints or objects with ``fileno()``) to every successor under *name*.

        The fds stay the caller's: the upgrader only borrows them, so they
        must stay open while they are registered (`unregister` first when
        closing one).  A name may hold several fds.  Names follow systemd's
        rules (1-255 printable ASCII, no ``:``) so the fd store can keep
        them.  Raises `ValueError` for a bad or taken name or no fd.
        """
        _systemd.check_fdname(name)
        if not fds:
            raise ValueError("register() needs at least one fd")
        for fd in fds:
            fileno_of(fd)  # reject closed objects and non-fds now, not during an upgrade
        if name in self._registry:
            raise ValueError(f"{name!r} is registered already; unregister() it first")
        self._registry[name] = list(fds)

    def unregister(self, name: str) -> None:
        """Stop handing *name* over; `KeyError` if it is not registered."""
        del self._registry[name]

    @property
    def registered(self) -> dict[str, list[Any]]:
        """A copy of the registry: name -> the objects registered."""
        return {name: list(fds) for name, fds in self._registry.items()}

    def take(self, name: str) -> OwnedFd | None:
        """Take the one fd inherited under *name* (now the caller's), or None if none came.

        `ValueError` if several fds came under *name* (use `take_all`).
        """
        fds = self.inherited.get(name)
        if not fds:
            return None
        if len(fds) > 1:
            raise ValueError(f"{len(fds)} fds were inherited under {name!r}; use take_all()")
        del self.inherited[name]
        return fds[0]

    def take_all(self, name: str) -> list[OwnedFd]:
        """Take every fd inherited under *name* (now the caller's): ``[]`` if none came."""
        return self.inherited.pop(name, [])

    def socket(self, name: str, create: Callable[[], socket.socket]) -> socket.socket:
        """The socket inherited under *name*, or ``create()``'s; registered under *name* either way.

        The returned socket is the caller's (keep it open while it is
        registered).  Raises what `take` and *create* raise.
        """
        fd = self.take(name)
        sock = fd.socket() if fd is not None else create()
        try:
            self.register(name, sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _adopt(self, fds: dict[str, list[OwnedFd]]) -> None:
        for name, group in fds.items():
            self.inherited.setdefault(name, []).extend(group)

    def _inherit_systemd(self) -> None:
        if self._systemd and not self.inherited:
            self._adopt(_systemd.listen_fds())

    # -- the exit signal and in-flight work ------------------------------------------

    @property
    def exiting(self) -> bool:
        """True once a successor took over: stop accepting, drain, exit."""
        return self._exiting

    def fileno(self) -> int:
        """An fd that becomes readable when this process should exit, for ``poll``/``select``."""
        return self._exit_r

    def _signal_exit(self) -> None:
        self._exiting = True
        try:
            os.write(self._exit_w, b"x")
        except OSError:
            pass

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the work inside the block as in flight, for `drain` (any thread, or asyncio)."""
        with self._work_done:
            self._work += 1
        try:
            yield
        finally:
            with self._work_done:
                self._work -= 1
                idle = not self._work
                if idle:
                    self._work_done.notify_all()
                    callbacks = list(self._idle_callbacks)
            if idle:
                for callback in callbacks:
                    callback()

    @property
    def in_flight(self) -> int:
        """How many `track` blocks are running."""
        return self._work

    # -- pid file, systemd -------------------------------------------------------------

    def _announce(self) -> None:
        if self.pid_file is not None:
            wire.write_pid_file(self.pid_file, os.getpid())
        if self._systemd:
            # A successor is a new main pid; the unit needs NotifyAccess=all for it.
            _systemd.notify({"MAINPID": os.getpid(), "READY": 1})

    def store_fds(self) -> bool:
        """Push every registered fd into systemd's fd store (``FDSTORE=1``, ``FDNAME=`` its name).

        Call it before exiting on a restart that has no successor
        (``systemctl restart``); the next start gets the fds back by socket
        activation, and ``systemd=True`` makes its `Upgrader` inherit them.
        The unit needs ``FileDescriptorStoreMax=`` at least the number of
        fds.  Returns False when not run by a manager (``NOTIFY_SOCKET``
        unset).  Raises what `fdchannel.systemd.fdstore` raises.
        """
        sent = False
        for name, fds in self._registry.items():
            sent = _systemd.fdstore(name, fds)
            if not sent:
                return False
        return sent

    # -- the control endpoint (sibling model) ----------------------------------------

    def _open_control(self) -> None:
        if self.control_path is None or self._listener is not None or self._exiting:
            return
        self._listener = Listener(
            self.control_path, mode=0o600, authorize=self._authorize_peer, max_fds=self._max_fds
        )

    def _authorize_peer(self, creds: PeerCredentials) -> bool:
        if creds.uid not in self._allow_uids:
            return False
        return self._authorize is None or bool(self._authorize(creds))

    def _check_predecessor(self, channel: Channel) -> None:
        creds = channel.peer_credentials()
        if creds.uid not in self._allow_uids:
            raise UpgradeError(
                f"the process at {self.control_path!r} runs as uid {creds.uid}, not one of "
                f"{sorted(self._allow_uids)}: refusing its fds"
            )

    def _close_control(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- handover ---------------------------------------------------------------------

    def _take_handover(self, msg: Any) -> None:
        """Adopt the fds of the ``fds`` message *msg*; closes them all if it is not one."""
        try:
            fields = wire.decode(msg.payload)
            if fields["kind"] == "busy":
                raise UpgradeInProgress(f"the running process refused: {fields.get('reason')}")
            if fields["kind"] != "fds":
                raise UpgradeFailed(f"expected the fds, got a {fields['kind']!r} message")
            fds = wire.split_fds(fields, msg.fds)
        except BaseException:
            msg.close()
            raise
        pid = fields.get("pid")
        self.predecessor_pid = pid if isinstance(pid, int) else None
        self._adopt(fds)

    def _failure(self, handle: wire.ProcessHandle, exc: BaseException | None, reply: Any) -> UpgradeFailed:
        """Kill the successor and say why the upgrade failed."""
        who = f"the successor (pid {handle.pid})"
        if reply is not None and reply.get("kind") == "refused":
            reason = str(reply.get("reason"))
            # It said why and should exit by itself; it is killed if not.
            code = handle.exit_code(min(self.ready_timeout, 5.0))
            code = handle.kill() if code is None else code
            return UpgradeRefused(f"{who} refused to take over: {reason}", reason, code)
        if isinstance(exc, TimeoutError):
            code = handle.kill()
            return UpgradeTimeout(f"{who} was not ready within {self.ready_timeout}s; it was killed", code)
        if isinstance(exc, (ChannelClosed, ConnectionError)):
            code = handle.exit_code(min(self.ready_timeout, 5.0))
            code = handle.kill() if code is None else code
            how = "" if code is None else f" with code {code}" if code >= 0 else f" by signal {-code}"
            return UpgradeFailed(f"{who} exited{how} before it was ready", code)
        code = handle.kill()
        detail = f"sent {reply.get('kind')!r}" if reply is not None else f"failed: {exc!r}"
        return UpgradeFailed(f"{who} {detail} before it was ready; it was killed", code)

    def _succeeded(self, handle: wire.ProcessHandle) -> None:
        self.successor_pid = handle.pid
        if handle.popen is not None:
            # Kept, never waited for: the successor outlives us.  Dropping
            # the Popen would warn that it is still running.
            _successors.append(handle.popen)
        self._close_control()
        self._signal_exit()
        log.info("upgrade: pid %s took over from pid %s", handle.pid, os.getpid())

    def _release_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_control()
        if self._predecessor is not None:
            self._predecessor.close()
            self._predecessor = None
        for group in self.inherited.values():
            for owned in group:
                owned.close()
        self.inherited.clear()
        for fd in {self._exit_r, self._exit_w}:
            os.close(fd)


def say_busy(channel: Channel, reason: str) -> None:
    """Tell a would-be successor why it cannot take over now (best effort: it may be gone)."""
    try:
        channel.settimeout(1.0)
        channel.send(wire.encode("busy", reason=reason))
    except (FdChannelError, OSError):
        pass
