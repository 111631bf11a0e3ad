"""Handing a channel end to another process: the environment, pickling, fork.

What `Channel.from_environ`, `Channel.close_other` and `Channel.__reduce__`
call; it sits below `fdchannel.Channel` and never imports it (the class comes
in as an argument).  `fdchannel.spawn`, which creates channels, sits above.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Final, TypeVar

from ._core import ChannelCore
from ._errors import FdChannelError

__all__ = ["ENV_VAR", "channel_from_environ", "claim_forked_end", "reduce_channel"]

#: The environment variable that tells a child which fd is its channel end.
ENV_VAR: Final = "FDCHANNEL_FD"

_C = TypeVar("_C", bound=ChannelCore)

#: On Windows the variable names an inherited pipe handle, "pipe:<handle>",
#: from which the child reads its socket as a ``socket.share()`` blob:
#: Winsock sockets do not survive handle inheritance everywhere (Wine, LSPs).
SHARE_PREFIX: Final = "pipe:"


if sys.platform == "win32":

    def _channel_from_share(cls: type[_C], value: str, kwargs: dict[str, Any]) -> _C:
        """Windows: read the parent's ``socket.share()`` blob from the inherited pipe; wrap it."""
        import msvcrt
        import socket

        try:
            handle = int(value[len(SHARE_PREFIX) :])
            fd = msvcrt.open_osfhandle(handle, os.O_RDONLY)
        except (ValueError, OSError) as exc:
            raise FdChannelError(f"{ENV_VAR}={value!r} names no inherited pipe handle ({exc})") from exc
        with open(fd, "rb") as pipe:
            blob = pipe.read()
        try:
            sock = socket.fromshare(blob)
        except OSError as exc:
            raise FdChannelError(
                f"{ENV_VAR}={value}: the parent's socket could not be taken ({exc})"
            ) from exc
        try:
            return cls(sock, **kwargs)
        except BaseException:
            sock.close()
            raise


def channel_from_environ(cls: type[_C], unset: bool, kwargs: dict[str, Any]) -> _C:
    """The logic of `Channel.from_environ`."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        raise FdChannelError(
            f"{ENV_VAR} is not set: this process was not started by fdchannel.spawn() (or the "
            "variable was already consumed)"
        )
    if sys.platform == "win32" and value.startswith(SHARE_PREFIX):
        channel = _channel_from_share(cls, value, kwargs)
    else:
        try:
            fd = int(value)
            if fd < 0:
                raise ValueError(value)
        except ValueError:
            raise FdChannelError(f"{ENV_VAR}={value!r} is not a file descriptor number") from None
        try:
            channel = cls.from_fd(fd, **kwargs)
        except (OSError, ValueError) as exc:
            raise FdChannelError(
                f"{ENV_VAR}={value}: fd {fd} is not a connected stream socket ({exc}); it was left open"
            ) from exc
    if unset:
        # The fd is the channel's now; a grandchild must not try to adopt it.
        os.environ.pop(ENV_VAR, None)
    return channel


# -- fork ---------------------------------------------------------------------------


def claim_forked_end(channel: ChannelCore) -> None:
    """In a forked process, before the first use of an inherited end: make it this process's alone.

    Every child of a fork holds the same socket (a `multiprocessing.Pool`
    or `ProcessPoolExecutor` under the ``fork`` start method forks one child
    per worker with the initializer's channel in each), and frames written
    by two of them interleave.  The first child to use the end takes a POSIX
    record lock on its socket, which belongs to that process (not to the
    shared file description) and goes with it; a second child gets
    `ValueError`.  Where the platform has no record locks on sockets
    nothing is enforced.  Nor once the child closes any other fd of the
    same socket (a dup): POSIX then drops the process's record locks on it.
    No lock does better: `flock` and OFD locks belong to the shared file
    description, which every child holds.
    """
    if sys.platform == "win32":  # pragma: no cover - no fork there
        return
    import errno
    import fcntl

    try:
        fcntl.lockf(channel._fileno, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ValueError(
                f"this {channel._kind} end is already in use by another process forked from the same "
                "parent (a multiprocessing Pool or ProcessPoolExecutor worker?): one end may serve one "
                "process; give each worker a channel of its own"
            ) from None
        # No record locks on sockets here: nothing to enforce.


# -- pickling ---------------------------------------------------------------------


def reduce_channel(channel: ChannelCore) -> tuple[Any, ...]:
    """The logic of `Channel.__reduce__`: only while multiprocessing starts a process."""
    popen = None
    # multiprocessing sets the spawning popen only while it pickles a new
    # process's arguments; if it was never imported it is not pickling us.
    if "multiprocessing" in sys.modules:
        from multiprocessing import context

        popen = context.get_spawning_popen()
    if popen is None:
        raise TypeError(
            f"a {channel._kind} cannot be pickled: it owns a socket.  Pass it as an argument of "
            "multiprocessing.Process (any start method), or send its fd over another Channel"
        )
    if channel.closed:
        raise ValueError("cannot hand a closed Channel to a new process")
    if channel.pending or not channel._decoder.at_boundary or channel._decoder.frames:
        # The copy would start mid-stream: buffered bytes and fds stay here.
        raise ValueError("cannot hand a Channel with buffered or pending data to a new process")
    if getattr(channel, "_handed_over", False):
        # Pool(initargs=...) and ProcessPoolExecutor(initargs=...) pickle
        # the same arguments once per worker: several processes would
        # share one end and their frames interleave.
        raise ValueError(
            f"this {channel._kind} end was already handed to another process: one end may serve "
            "one process; give each worker a channel of its own"
        )
    channel._handed_over = True  # type: ignore[attr-defined]
    # A Budget belongs to this process: the other end's new owner has none.
    options = {
        "max_payload": channel.max_payload,
        "max_fds": channel.max_fds,
        "max_held_fds": channel.max_held_fds,
        "frame_timeout": channel.frame_timeout,
        "transport": channel.transport,
    }
    paired = getattr(channel, "_other_end", None) is not None
    if sys.platform == "win32":
        # A SOCKET must not go through DuplicateHandle: multiprocessing's
        # resource sharer hands the child a WSADuplicateSocket copy instead.
        from multiprocessing.resource_sharer import DupSocket

        return _rebuild_from_socket, (type(channel), DupSocket(channel._sock), options, paired)
    from multiprocessing import reduction

    return _rebuild_channel, (type(channel), reduction.DupFd(channel.fileno()), options, paired)


def _no_other_end() -> None:
    return None


def _rebuild_from_socket(cls: type[_C], dup: Any, options: dict[str, Any], paired: bool) -> _C:
    """`_rebuild_channel` for Windows: the child receives a socket object, not an fd."""
    sock = dup.detach()
    try:
        channel = cls(sock, **options)
    except BaseException:
        sock.close()
        raise
    if paired:
        channel._other_end = _no_other_end
    return channel


def _rebuild_channel(cls: type[_C], dupfd: Any, options: dict[str, Any], paired: bool = False) -> _C:
    fd: int = dupfd.detach()
    try:
        channel = cls.from_fd(fd, **options)
    except BaseException:
        os.close(fd)
        raise
    if paired:
        # A pair end: close_other() stays valid and has nothing to close
        # here, so one target body serves every start method.
        channel._other_end = _no_other_end
    return channel
