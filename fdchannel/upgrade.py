"""Zero-downtime restarts: hand a server's named fds to its successor.

A server names the fds a successor must inherit (listening sockets, an
eventfd, a memfd of state) with `Upgrader.register`.  An upgrade hands all
of them over in one message to a successor that is either

- started by this process (`Upgrader.upgrade`, the *child model*, as
  tableflip, gunicorn or nginx do), or
- started by anyone else and connecting to this process's control `Listener`
  (`Upgrader.accept_upgrade`, the *sibling model*, as tableroll), the peer's
  uid checked before anything is sent.

The successor sets itself up with what it inherited (`Upgrader.socket`,
`Upgrader.take`) and calls `Upgrader.ready`; only then is this process told
to exit (`wait_exit`, `fileno`): it stops accepting, leaves the sockets it
handed over alone (never ``shutdown()``: the successor shares them), drains
its in-flight work (`track`, `drain`) and exits.  If the successor exits,
crashes, refuses (`Upgrader.refuse`) or is not ready within the timeout, it
is killed, this process keeps serving as before and the caller gets an
`UpgradeFailed` (`UpgradeRefused`, `UpgradeTimeout`) saying why.  One upgrade
at a time: another request meanwhile gets `UpgradeInProgress`.

`AsyncUpgrader` is the same on asyncio.  Under systemd the fds can also go
through the service manager's fd store (`Upgrader.store_fds`, ``systemd=True``).

POSIX only (fd inheritance by name, AF_UNIX control sockets); on Windows the
constructor raises `OSError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Self

from . import _upgrade_wire as wire
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
from ._peer import PeerCredentials
from ._process import spawn
from ._upgrade_aio import AsyncUpgrader
from ._upgrade_base import CONNECT_ERRORS, DEFAULT_MAX_FDS, Base, log, wake_pipe
from ._upgrade_base import say_busy as _say_busy
from ._wait import ready_among, wait_ready

__all__ = [
    "AsyncUpgrader",
    "UpgradeError",
    "UpgradeFailed",
    "UpgradeInProgress",
    "UpgradeRefused",
    "UpgradeTimeout",
    "Upgrader",
]


def _poke(fd: int) -> None:
    with contextlib.suppress(OSError):  # full: a byte is there already
        os.write(fd, b"x")


def _nothing() -> None:
    pass


class Upgrader(Base):
    """The blocking upgrade API (see the module).  One per process; use it from any thread.

    At construction a successor receives what its predecessor handed over:
    started by `upgrade` (``FDCHANNEL_UPGRADE`` set) it reads its channel
    from the environment; else, given *control_path*, it connects there and
    is a successor if a process listens (the peer must run as one of
    *allow_uids*, default this process's effective uid).  A first generation
    finds nobody.  ``systemd=True`` also inherits the fds socket activation
    passed (`fdchannel.systemd.listen_fds`) when no predecessor handed any.

    *pid_file* is replaced atomically by `ready`.  *ready_timeout* bounds
    each handover, from start (or connect) to ``ready``.  *authorize*, given
    the `PeerCredentials` of a would-be successor on the control endpoint,
    may refuse it (as `Listener`'s).  *max_fds* bounds one handover.

    The upgrader owns the inherited fds until they are taken, its control
    endpoint and its channel to the predecessor; `close` releases them.
    The registered fds stay the caller's.  Raises `UpgradeError` when the
    predecessor could not hand over (it went away, sent garbage, or is
    busy: `UpgradeInProgress`), `ActivationError` for malformed systemd
    variables, `OSError` on Windows.
    """

    def __init__(
        self,
        *,
        control_path: str | bytes | os.PathLike[Any] | None = None,
        pid_file: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
        allow_uids: Collection[int] | None = None,
        authorize: Callable[[PeerCredentials], object] | None = None,
        max_fds: int = DEFAULT_MAX_FDS,
        systemd: bool = False,
    ) -> None:
        super().__init__(
            control_path=control_path,
            pid_file=pid_file,
            ready_timeout=ready_timeout,
            allow_uids=allow_uids,
            authorize=authorize,
            max_fds=max_fds,
            systemd=systemd,
        )
        try:
            self._find_predecessor()
            self._inherit_systemd()
        except BaseException:
            self._release_all()
            raise

    def _find_predecessor(self) -> None:
        if os.environ.get(wire.ENV_MARKER) == "1":
            channel = Channel.from_environ(max_fds=self._max_fds)
            os.environ.pop(wire.ENV_MARKER, None)
        elif self.control_path is not None:
            try:
                channel = Channel.connect(
                    self.control_path, timeout=self.ready_timeout, max_fds=self._max_fds
                )
            except CONNECT_ERRORS:
                return  # nobody there: the first generation
            try:
                self._check_predecessor(channel)
            except BaseException:
                channel.close()
                raise
        else:
            return
        self._predecessor = channel
        try:
            channel.settimeout(self.ready_timeout)
            try:
                msg = channel.recv()
            except (ChannelClosed, ConnectionError, TimeoutError) as exc:
                raise UpgradeError(
                    f"the predecessor went away before it handed over its fds ({exc!r})"
                ) from exc
            self._take_handover(msg)
        except BaseException:
            self._predecessor = None
            channel.close()
            raise

    # -- the successor's side ----------------------------------------------------------

    def ready(self) -> None:
        """Say this process is set up and serving: the predecessor may now exit.

        Writes the pid file, tells systemd (``systemd=True``; waiting at
        most *ready_timeout* for room in its queue, then logging a warning
        and going on without), tells the predecessor, and (sibling model) waits for it to release the control
        endpoint, then opens it here; in the first generation it just opens
        it.  A predecessor that died meanwhile is logged, not raised: this
        process has the fds and serves.  Raises `ValueError` if called twice
        or after `refuse`, and `OSError` from the pid file or the endpoint.
        """
        if self._ready or self._closed:
            raise ValueError("ready() was called already (or the upgrader is closed)")
        self._ready = True
        self._announce()
        channel, self._predecessor = self._predecessor, None
        if channel is not None:
            with channel:
                try:
                    channel.send(wire.encode("ready", pid=os.getpid()))
                    if self.control_path is not None:
                        # The predecessor closes its endpoint before it answers.
                        wire.decode(channel.recv().payload)
                except (FdChannelError, OSError) as exc:
                    log.warning("upgrade: the predecessor went away during the handover (%r)", exc)
        self._open_control()

    def refuse(self, reason: str) -> None:
        """Tell the predecessor this process cannot take over (it keeps serving); then exit.

        Closes the channel to it; the fds inherited stay here until `close`.
        """
        if self._ready:
            raise ValueError("refuse() after ready()")
        self._ready = True
        channel, self._predecessor = self._predecessor, None
        if channel is not None:
            with channel:
                try:
                    channel.send(wire.encode("refused", reason=str(reason)))
                except (FdChannelError, OSError) as exc:
                    log.warning("upgrade: could not tell the predecessor (%r)", exc)

    # -- the running process's side ----------------------------------------------------

    @contextlib.contextmanager
    def _one_upgrade(self) -> Iterator[None]:
        if self._exiting:
            raise UpgradeInProgress(f"this process was upgraded already (to pid {self.successor_pid})")
        if not self._busy.acquire(blocking=False):
            raise UpgradeInProgress("an upgrade is already running")
        try:
            yield
        finally:
            self._busy.release()

    def upgrade(
        self,
        args: Sequence[Any] | None = None,
        *,
        timeout: float | None = None,
        **popen_kwargs: Any,
    ) -> int:
        """Start a successor (child model), hand it every registered fd, wait until it is ready.

        *args* default to this process's command line (``sys.executable``
        and ``sys.argv``); *popen_kwargs* go to `fdchannel.spawn`.  Returns
        the successor's pid once it called `ready`; from then on `exiting`
        is true and `fileno` readable.  *timeout* (default *ready_timeout*)
        bounds the whole handover.

        Raises `UpgradeInProgress` when another upgrade runs (or one
        succeeded already); `UpgradeTimeout`, `UpgradeRefused` or
        `UpgradeFailed` (the successor was then killed and reaped, and this
        process goes on serving); `OSError` when the program cannot start.
        """
        with self._one_upgrade():
            if args is None:
                args = [sys.executable, *sys.argv]
            env = dict(popen_kwargs.pop("env", None) or os.environ)
            env[wire.ENV_MARKER] = "1"
            proc, channel = spawn(args, env=env, **popen_kwargs)
            handle = wire.ProcessHandle(popen=proc)
            with channel:
                channel.max_fds = self._max_fds
                self._hand_over(channel, handle, self.ready_timeout if timeout is None else timeout)
            assert handle.pid is not None
            return handle.pid

    def accept_upgrade(self, timeout: float | None = None) -> int:
        """Wait for a successor on the control endpoint (sibling model) and hand over to it.

        Needs *control_path*; the endpoint is open once `ready` ran.  Peers
        that fail the uid or *authorize* check are refused by the endpoint
        and waiting goes on.  Waiting is no upgrade in progress: `upgrade`
        may run meanwhile (a successor connecting then is told busy, and
        this call raises `UpgradeInProgress`); several threads may wait.
        Returns the successor's pid once it is ready (`exiting` is then
        true).  Raises `TimeoutError` when no successor came within
        *timeout* (None: wait forever; ``0.0`` polls and raises
        `BlockingIOError`, as `Listener.accept`), `UpgradeInProgress` when
        an upgrade runs or, at once, when another upgrade succeeded while
        this one waited, and the `UpgradeFailed` family as `upgrade` (the
        successor was killed; also when its credentials could not be read;
        their ``exit_code`` is None here: a sibling is not this process's
        child, so its exit status goes to its own parent);
        `ValueError` if the upgrader was or gets closed.
        """
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be non-negative or None")
        if self._exiting:
            raise UpgradeInProgress(f"this process was upgraded already (to pid {self.successor_pid})")
        listener = self._listener
        if listener is None:
            raise ValueError("no control endpoint: give control_path and call ready() first")
        channel = self._wait_successor(listener, timeout)
        with channel:
            try:
                # At once, before anything can let the peer go: its pidfd
                # names the very process that connected.
                handle = wire.sibling_handle(channel)
            except OSError as exc:
                raise UpgradeFailed(f"the successor's credentials could not be read ({exc})") from exc
            try:
                try:
                    one = self._one_upgrade()
                    one.__enter__()
                except UpgradeInProgress as exc:
                    _say_busy(channel, str(exc))
                    raise
                try:
                    self._hand_over(channel, handle, self.ready_timeout)
                finally:
                    one.__exit__(None, None, None)
            finally:
                handle.close()
        return handle.pid or 0

    def _wait_successor(self, listener: Listener, timeout: float | None) -> Channel:
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._try_accept(listener)  # before any fd is made: one may be waiting
        if channel is not None:
            return channel
        if timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, "no successor is waiting on the control endpoint")
        wake_r, wake_w = wake_pipe()  # its write end never blocks
        try:
            with self._watch_control(lambda: _poke(wake_w)) as (watched, fd):
                while True:
                    channel = self._try_accept(watched)
                    if channel is not None:
                        return channel
                    if not wait_ready((fd, wake_r), deadline=deadline):
                        raise TimeoutError(f"no successor connected within {timeout}s")
                    if self._listener is not watched:
                        raise self._endpoint_gone()
        finally:
            os.close(wake_r)
            os.close(wake_w)

    def _hand_over(self, channel: Channel, handle: wire.ProcessHandle, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        reply: dict[str, Any] | None = None
        try:
            payload, fds = wire.handover(self._registry)
            channel.settimeout(timeout)
            channel.send(payload, fds)
            reply = self._await_reply(channel, deadline)
            if reply["kind"] != "ready":
                raise UpgradeFailed("not ready")
        except (FdChannelError, OSError) as exc:
            raise self._failure(handle, exc, reply) from exc
        except BaseException:
            handle.kill()  # an interrupt, a registered fd closed meanwhile: no half-started successor
            raise
        self._succeeded(handle)
        try:
            channel.send(wire.encode("released"))
        except (FdChannelError, OSError):
            pass  # it does not wait for this in the child model, and may be gone

    def _await_reply(self, channel: Channel, deadline: float) -> dict[str, Any]:
        """The successor's answer, while telling would-be successors on the endpoint that we are busy."""
        with contextlib.ExitStack() as stack:
            watch = [channel.fileno()]
            listener = None
            if self._listener is not None:
                with contextlib.suppress(
                    ValueError, UpgradeInProgress
                ):  # closed meanwhile: no one to turn away
                    listener, fd = stack.enter_context(self._watch_control(_nothing))
                    watch.append(fd)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the successor did not answer in time")
                readable = ready_among(watch, left)
                if channel.fileno() in readable:
                    channel.settimeout(max(deadline - time.monotonic(), 0.001))
                    with channel.recv() as msg:
                        return wire.decode(msg.payload)
                if listener is not None and watch[-1] in readable and not self._turn_away(listener):
                    watch.pop()  # the endpoint was closed
                    listener = None

    def _turn_away(self, listener: Listener) -> bool:
        """Tell a would-be successor on the endpoint that we are busy; False once it is closed."""
        try:
            other = self._try_accept(listener)
        except (ValueError, UpgradeInProgress):
            return False
        if other is not None:
            with other:
                _say_busy(other, "an upgrade is already running")
        return True

    # -- the old process's exit ------------------------------------------------------

    def wait_exit(self, timeout: float | None = None) -> bool:
        """Block until a successor took over (True) or *timeout* passed (False)."""
        if self._exiting:
            return True
        ready_among((self._exit_r,), timeout)
        return self._exiting

    def drain(self, timeout: float) -> int:
        """Wait up to *timeout* seconds for the `track` blocks to finish; how many are left (0: all done)."""
        deadline = time.monotonic() + timeout
        with self._work_done:
            while self._work:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._work_done.wait(left)
            return self._work

    def close(self) -> None:
        """Close the control endpoint, the channel to the predecessor and every fd not taken.  Idempotent."""
        self._release_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
