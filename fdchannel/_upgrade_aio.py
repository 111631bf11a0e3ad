"""`AsyncUpgrader`: `fdchannel.upgrade.Upgrader` on asyncio (imported from there)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Self

from . import _upgrade_wire as wire
from ._channel import Channel
from ._errors import ChannelClosed, FdChannelError, UpgradeError, UpgradeFailed, UpgradeInProgress
from ._peer import PeerCredentials
from ._process import spawn
from ._upgrade_base import CONNECT_ERRORS, DEFAULT_MAX_FDS, Base, log
from ._upgrade_base import say_busy as _say_busy
from .aio import AsyncChannel

__all__ = ["AsyncUpgrader"]


class AsyncUpgrader(Base):
    """`Upgrader` for asyncio: the same arguments, ownership and errors; waits are coroutines.

    Build it with ``await AsyncUpgrader.create(...)`` (a successor receives
    its fds there).  `register`, `take`, `socket`, `track`, `fileno` and
    `store_fds` are the same as `Upgrader`'s; `ready`, `refuse`, `upgrade`,
    `accept_upgrade`, `wait_exit` and `drain` are coroutines.  Cancelling
    one of them during a handover kills the successor; this process keeps
    serving.
    """

    def __init__(self, **kwargs: Any) -> None:
        """Use `create`: a successor must receive its fds, which takes a wait."""
        super().__init__(**kwargs)
        self._async_predecessor: AsyncChannel | None = None
        self._running = False

    @classmethod
    async def create(
        cls,
        *,
        control_path: str | bytes | os.PathLike[Any] | None = None,
        pid_file: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
        allow_uids: Collection[int] | None = None,
        authorize: Callable[[PeerCredentials], object] | None = None,
        max_fds: int = DEFAULT_MAX_FDS,
        systemd: bool = False,
    ) -> Self:
        """Build an upgrader and receive what the predecessor hands over (see `Upgrader`)."""
        self = cls(
            control_path=control_path,
            pid_file=pid_file,
            ready_timeout=ready_timeout,
            allow_uids=allow_uids,
            authorize=authorize,
            max_fds=max_fds,
            systemd=systemd,
        )
        try:
            await self._find_predecessor()
            self._inherit_systemd()
        except BaseException:
            self.close()
            raise
        return self

    async def _find_predecessor(self) -> None:
        if os.environ.get(wire.ENV_MARKER) == "1":
            blocking = Channel.from_environ(max_fds=self._max_fds)
            os.environ.pop(wire.ENV_MARKER, None)
        elif self.control_path is not None:
            try:
                # A local connect completes at once or fails at once.
                blocking = Channel.connect(
                    self.control_path, timeout=self.ready_timeout, max_fds=self._max_fds
                )
            except CONNECT_ERRORS:
                return
            try:
                self._check_predecessor(blocking)
            except BaseException:
                blocking.close()
                raise
        else:
            return
        channel = _to_async(blocking)
        try:
            try:
                async with asyncio.timeout(self.ready_timeout):
                    msg = await channel.recv()
            except (ChannelClosed, ConnectionError, TimeoutError) as exc:
                raise UpgradeError(
                    f"the predecessor went away before it handed over its fds ({exc!r})"
                ) from exc
            self._take_handover(msg)
        except BaseException:
            channel.close()
            raise
        self._async_predecessor = channel

    # -- the successor's side ----------------------------------------------------------

    async def ready(self) -> None:
        """As `Upgrader.ready`."""
        if self._ready or self._closed:
            raise ValueError("ready() was called already (or the upgrader is closed)")
        self._ready = True
        self._announce()
        channel, self._async_predecessor = self._async_predecessor, None
        if channel is not None:
            try:
                async with asyncio.timeout(self.ready_timeout):
                    await channel.send(wire.encode("ready", pid=os.getpid()))
                    if self.control_path is not None:
                        wire.decode((await channel.recv()).payload)
            except (FdChannelError, OSError) as exc:
                log.warning("upgrade: the predecessor went away during the handover (%r)", exc)
            finally:
                channel.close()
        self._open_control()

    async def refuse(self, reason: str) -> None:
        """As `Upgrader.refuse`."""
        if self._ready:
            raise ValueError("refuse() after ready()")
        self._ready = True
        channel, self._async_predecessor = self._async_predecessor, None
        if channel is not None:
            try:
                async with asyncio.timeout(self.ready_timeout):
                    await channel.send(wire.encode("refused", reason=str(reason)))
            except (FdChannelError, OSError) as exc:
                log.warning("upgrade: could not tell the predecessor (%r)", exc)
            finally:
                channel.close()

    # -- the running process's side ----------------------------------------------------

    @contextlib.contextmanager
    def _one_upgrade(self) -> Iterator[None]:
        if self._exiting:
            raise UpgradeInProgress(f"this process was upgraded already (to pid {self.successor_pid})")
        if self._running or not self._busy.acquire(blocking=False):
            raise UpgradeInProgress("an upgrade is already running")
        self._running = True
        try:
            yield
        finally:
            self._running = False
            self._busy.release()

    async def upgrade(
        self, args: Sequence[Any] | None = None, *, timeout: float | None = None, **popen_kwargs: Any
    ) -> int:
        """As `Upgrader.upgrade`."""
        with self._one_upgrade():
            if args is None:
                args = [sys.executable, *sys.argv]
            env = dict(popen_kwargs.pop("env", None) or os.environ)
            env[wire.ENV_MARKER] = "1"
            proc, blocking = spawn(args, env=env, **popen_kwargs)
            handle = wire.ProcessHandle(popen=proc)
            try:
                blocking.max_fds = self._max_fds
                channel = _to_async(blocking)
            except BaseException:
                handle.kill()
                raise
            try:
                await self._hand_over(channel, handle, self.ready_timeout if timeout is None else timeout)
            finally:
                channel.close()
            assert handle.pid is not None
            return handle.pid

    async def accept_upgrade(self, timeout: float | None = None) -> int:
        """As `Upgrader.accept_upgrade`."""
        listener = self._listener
        if listener is None:
            raise ValueError("no control endpoint: give control_path and call ready() first")
        if self._exiting:
            raise UpgradeInProgress(f"this process was upgraded already (to pid {self.successor_pid})")
        # Waiting for a successor is no upgrade yet: upgrade() may run meanwhile.
        async with asyncio.timeout(timeout):
            blocking = await _accept(listener)
        try:
            with self._one_upgrade():
                creds = blocking.peer_credentials()
                channel = _to_async(blocking)
                handle = wire.ProcessHandle(pid=creds.pid)
                try:
                    await self._hand_over(channel, handle, self.ready_timeout)
                finally:
                    channel.close()
                    handle.close()
        except UpgradeInProgress as exc:
            if not blocking.closed:
                _say_busy(blocking, str(exc))
            raise
        finally:
            blocking.close()
        return creds.pid or 0

    async def _hand_over(self, channel: AsyncChannel, handle: wire.ProcessHandle, timeout: float) -> None:
        reply: dict[str, Any] | None = None
        turn_away = asyncio.ensure_future(self._turn_away_all())
        try:
            async with asyncio.timeout(timeout):
                payload, fds = wire.handover(self._registry)
                await channel.send(payload, fds)
                with await channel.recv() as msg:
                    reply = wire.decode(msg.payload)
            if reply["kind"] != "ready":
                raise UpgradeFailed("not ready")
        except (FdChannelError, OSError) as exc:
            raise self._failure(handle, exc, reply) from exc
        except BaseException:
            handle.kill()
            raise
        finally:
            turn_away.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turn_away
        self._succeeded(handle)
        with contextlib.suppress(FdChannelError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await channel.send(wire.encode("released"))

    async def _turn_away_all(self) -> None:
        """While a handover runs, answer would-be successors on the endpoint that we are busy."""
        listener = self._listener
        if listener is None:
            return
        while True:
            other = await _accept(listener)
            with other:
                _say_busy(other, "an upgrade is already running")

    # -- the old process's exit ------------------------------------------------------

    async def wait_exit(self) -> None:
        """Return once a successor took over (wrap in ``asyncio.timeout`` to bound it)."""
        if self._exiting:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._exit_r, _resolve, done)
        try:
            await done
        finally:
            loop.remove_reader(self._exit_r)

    async def drain(self, timeout: float) -> int:
        """As `Upgrader.drain`, without blocking the loop."""
        loop = asyncio.get_running_loop()
        idle = asyncio.Event()

        def on_idle() -> None:
            loop.call_soon_threadsafe(idle.set)

        self._idle_callbacks.append(on_idle)
        deadline = time.monotonic() + timeout
        try:
            while self._work:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                idle.clear()
                if not self._work:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await idle.wait()
            return self._work
        finally:
            self._idle_callbacks.remove(on_idle)

    def close(self) -> None:
        """As `Upgrader.close`."""
        if self._async_predecessor is not None:
            self._async_predecessor.close()
            self._async_predecessor = None
        self._release_all()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _to_async(channel: Channel) -> AsyncChannel:
    try:
        return AsyncChannel.from_channel(channel)
    except BaseException:
        channel.close()
        raise


async def _accept(listener: Any) -> Channel:
    """The next accepted channel of a `Listener`, waiting on the loop (refused peers are skipped)."""
    loop = asyncio.get_running_loop()
    while True:
        listener.settimeout(0.0)
        try:
            channel: Channel = listener.accept()
            channel.settimeout(None)
            return channel
        except BlockingIOError:
            pass
        ready: asyncio.Future[None] = loop.create_future()
        fd = listener.fileno()
        loop.add_reader(fd, _resolve, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
