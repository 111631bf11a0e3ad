"""`spawn`: start a child process with a `Channel` end of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ._channel import Channel
from ._handoff import ENV_VAR, SHARE_PREFIX

__all__ = ["spawn"]


def spawn(
    args: str | bytes | os.PathLike[str] | os.PathLike[bytes] | Sequence[Any], **popen_kwargs: Any
) -> tuple[subprocess.Popen[Any], Channel]:
    """Start *args* as a child process connected to the caller by a `Channel`.

    The child inherits one end of a new socketpair (and, of the caller's
    fds, only those it names in ``pass_fds``); ``FDCHANNEL_FD`` in its
    environment names the fd, and `Channel.from_environ` in the child wraps
    it.  The other end is returned: it is owned by the caller and is
    non-inheritable, so children spawned later do not get it.

    Args:
        args: The program and its arguments, as for `subprocess.Popen`.
        **popen_kwargs: Go to `subprocess.Popen`; ``env`` (default: this
            process's environment) and ``pass_fds`` are merged with what the
            channel needs, and neither the caller's mapping nor
            ``os.environ`` is changed.

    Returns:
        ``(process, channel)``: the caller must wait for the process and
            close the channel.

    Raises:
        ValueError: ``close_fds=False`` (every inheritable fd would leak
            into the child), or ``pass_fds`` on Windows.
        OSError: Whatever `subprocess.Popen` raises (`FileNotFoundError`,
            ...), after closing both ends.
    """
    if not popen_kwargs.get("close_fds", True):
        raise ValueError("spawn() needs close_fds=True: the child must inherit only its channel end")
    env = popen_kwargs.pop("env", None)
    env = dict(os.environ if env is None else env)
    ours, theirs = socket.socketpair(getattr(socket, "AF_UNIX", socket.AF_INET), socket.SOCK_STREAM)
    try:
        channel = Channel(ours)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    try:
        env[ENV_VAR] = str(theirs.fileno())
        if sys.platform == "win32":
            proc = _spawn_windows(args, env, theirs, popen_kwargs)
        else:
            # Both ends are close-on-exec; Popen makes `theirs` inheritable in
            # the new child only, so concurrent spawns never pick it up.
            pass_fds = (*popen_kwargs.pop("pass_fds", ()), theirs.fileno())
            proc = subprocess.Popen(args, env=env, pass_fds=pass_fds, **popen_kwargs)
    except BaseException:
        channel.close()
        raise
    finally:
        theirs.close()
    return proc, channel


if sys.platform == "win32":

    def _spawn_windows(
        args: Any, env: dict[str, str], ours: socket.socket, popen_kwargs: dict[str, Any]
    ) -> subprocess.Popen[Any]:
        """Start a Windows child and hand it *ours*'s peer socket.

        Windows has no ``pass_fds``, and a Winsock socket does not survive
        handle inheritance everywhere (Wine, layered providers): the child
        inherits only the read end of a pipe (through the ``STARTUPINFO``
        handle list, with ``close_fds``), and reads from it the
        ``socket.share(child_pid)`` blob of its socket.
        """
        if popen_kwargs.pop("pass_fds", None):
            raise ValueError("pass_fds is not supported on Windows; send the fds over the channel instead")
        import msvcrt

        r, w = os.pipe()
        try:
            handle = msvcrt.get_osfhandle(r)
            os.set_handle_inheritable(handle, True)
            env[ENV_VAR] = f"{SHARE_PREFIX}{handle}"
            popen_kwargs.pop("close_fds", None)  # True: checked by spawn()
            given = popen_kwargs.pop("startupinfo", None)
            info = given.copy() if given is not None else subprocess.STARTUPINFO()
            attributes = dict(info.lpAttributeList)
            attributes["handle_list"] = [*attributes.get("handle_list", ()), handle]
            info.lpAttributeList = attributes
            proc = subprocess.Popen(args, env=env, startupinfo=info, close_fds=True, **popen_kwargs)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        try:
            with open(w, "wb") as pipe:
                w = -1
                pipe.write(ours.share(proc.pid))
        except BaseException:
            if w >= 0:
                os.close(w)
            proc.kill()
            proc.wait()
            raise
        return proc
