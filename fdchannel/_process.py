"""Handing a channel end to another process: `spawn`, `from_environ`, pickling, fork."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from ._errors import FdChannelError

if TYPE_CHECKING:
    from ._channel import Channel

__all__ = ["ENV_VAR", "channel_from_environ", "close_other", "reduce_channel", "spawn"]

#: The environment variable that tells a child which fd is its channel end.
ENV_VAR: Final = "FDCHANNEL_FD"


def spawn(
    args: str | bytes | os.PathLike[str] | os.PathLike[bytes] | Sequence[Any], **popen_kwargs: Any
) -> tuple[subprocess.Popen[Any], Channel]:
    """Start *args* as a child process connected to the caller by a `Channel`.

    The child inherits one end of a new socketpair (and, of the caller's
    fds, only those it names in ``pass_fds``); ``FDCHANNEL_FD`` in its
    environment names the fd, and `Channel.from_environ` in the child wraps
    it.  The other end is returned: it is owned by the caller and is
    non-inheritable, so children spawned later do not get it.

    *popen_kwargs* go to `subprocess.Popen`; ``env`` (default: this
    process's environment) and ``pass_fds`` are merged with what the channel
    needs, and neither the caller's mapping nor ``os.environ`` is changed.
    Returns ``(process, channel)``; the caller must wait for the process and
    close the channel.  Raises `ValueError` for ``close_fds=False`` (every
    inheritable fd would leak into the child) and whatever `subprocess.Popen`
    raises (`FileNotFoundError`, ...), after closing both ends.
    """
    from ._channel import Channel

    if not popen_kwargs.get("close_fds", True):
        raise ValueError("spawn() needs close_fds=True: the child must inherit only its channel end")
    env = popen_kwargs.pop("env", None)
    env = dict(os.environ if env is None else env)
    pass_fds = tuple(popen_kwargs.pop("pass_fds", ()))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        channel = Channel(ours)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    try:
        # Both ends are close-on-exec; Popen makes `theirs` inheritable in
        # the new child only, so concurrent spawns never pick it up.
        env[ENV_VAR] = str(theirs.fileno())
        proc = subprocess.Popen(args, env=env, pass_fds=(*pass_fds, theirs.fileno()), **popen_kwargs)
    except BaseException:
        channel.close()
        raise
    finally:
        theirs.close()
    return proc, channel


def channel_from_environ(cls: type[Channel], unset: bool, kwargs: dict[str, Any]) -> Channel:
    """The logic of `Channel.from_environ`."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        raise FdChannelError(
            f"{ENV_VAR} is not set: this process was not started by fdchannel.spawn() (or the "
            "variable was already consumed)"
        )
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
            f"{ENV_VAR}={value}: fd {fd} is not a connected AF_UNIX stream socket ({exc}); it was left open"
        ) from exc
    if unset:
        # The fd is the channel's now; a grandchild must not try to adopt it.
        os.environ.pop(ENV_VAR, None)
    return channel


def close_other(channel: Channel) -> None:
    """The logic of `Channel.close_other`."""
    ref = channel._other_end
    if ref is None:
        raise ValueError("close_other() works on the ends returned by Channel.pair() only")
    other = ref()
    if other is None or other.closed:
        return
    # Whatever the other end had queued belongs to the process that keeps
    # it: this copy drops it unsent, or the peer would receive it twice.
    with other._send_lock:
        other._outbox.discard()
    other.close()


# -- pickling ---------------------------------------------------------------------


def reduce_channel(channel: Channel) -> tuple[Any, ...]:
    """The logic of `Channel.__reduce__`: only while multiprocessing starts a process."""
    popen = None
    # multiprocessing sets the spawning popen only while it pickles a new
    # process's arguments; if it was never imported it is not pickling us.
    if "multiprocessing" in sys.modules:
        from multiprocessing import context

        popen = context.get_spawning_popen()
    if popen is None:
        raise TypeError(
            "a Channel cannot be pickled: it owns a socket.  Pass it as an argument of "
            "multiprocessing.Process (any start method), or send its fd over another Channel"
        )
    if channel.closed:
        raise ValueError("cannot hand a closed Channel to a new process")
    if channel.pending or not channel._decoder.at_boundary or channel._decoder.frames:
        # The copy would start mid-stream: buffered bytes and fds stay here.
        raise ValueError("cannot hand a Channel with buffered or pending data to a new process")
    from multiprocessing import reduction

    options = {"max_payload": channel.max_payload, "max_fds": channel.max_fds, "transport": channel.transport}
    paired = channel._other_end is not None
    return _rebuild_channel, (type(channel), reduction.DupFd(channel.fileno()), options, paired)


def _no_other_end() -> None:
    return None


def _rebuild_channel(
    cls: type[Channel], dupfd: Any, options: dict[str, Any], paired: bool = False
) -> Channel:
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
