"""systemd integration: socket activation and ``sd_notify``, without libsystemd.

`listen_fds` returns what a service manager passed with the socket-activation
protocol (``LISTEN_PID``, ``LISTEN_FDS``, ``LISTEN_FDNAMES``), by name, as
`OwnedFd` objects; it behaves as libsystemd's ``sd_listen_fds_with_names(1)``.
`notify` and its helpers (`ready`, `status`, `mainpid`, `stopping`,
`fdstore`, `fdstore_remove`) send the same datagrams as ``sd_pid_notify_with_fds``
to ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket), the fds of
the fd store going with ``SCM_RIGHTS``.

Both protocols are POSIX; the abstract namespace is Linux only.  On Windows
`listen_fds` and a `notify` with ``NOTIFY_SOCKET`` set raise `OSError`.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Final

from ._codec import SCM_MAX_FD
from ._errors import ActivationError
from ._ownedfd import OwnedFd, fileno_of

__all__ = [
    "FDNAME_MAX",
    "LISTEN_FDS_START",
    "ActivationError",
    "fdstore",
    "fdstore_remove",
    "listen_fds",
    "mainpid",
    "notify",
    "ready",
    "status",
    "stopping",
]

#: The first fd of socket activation (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START: Final = 3
#: The longest fd name systemd accepts (``FDNAME_MAX``).
FDNAME_MAX: Final = 255
#: The name of every fd when ``LISTEN_FDNAMES`` is not set, as in libsystemd.
UNKNOWN_NAME: Final = "unknown"

_ACTIVATION_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_DIGITS: Final = re.compile(r"[0-9]+")


def listen_fds(*, unset_environment: bool = True) -> dict[str, list[OwnedFd]]:
    """Return the fds passed by socket activation, by name, in the order passed.

    The fds are ``LISTEN_FDS_START`` (3) and up; each comes back as an
    `OwnedFd` the caller owns, made close-on-exec.  The names come from
    ``LISTEN_FDNAMES`` (``"unknown"`` for all when it is not set); a name
    may be shared by several fds (a socket unit with several ``Listen*=``
    lines names them all after the unit), hence a list per name.

    Returns ``{}`` when the process was not activated: ``LISTEN_PID`` is not
    set, or names another process (the variables were inherited from a
    parent), or ``LISTEN_FDS`` is not set.  With *unset_environment* (the
    default, as ``sd_listen_fds(1)``) the three variables are removed from
    `os.environ` in every case, so children do not see them.

    Raises `ActivationError` (a `ValueError`) quoting the value when
    ``LISTEN_PID`` or ``LISTEN_FDS`` is not a number, ``LISTEN_FDNAMES``
    does not hold one name per fd, or a named fd is not open; then no fd is
    taken.  `OSError` (``ENOTSUP``) on Windows, which has no fd inheritance
    of this kind.
    """
    if sys.platform == "win32":
        raise OSError(errno.ENOTSUP, "socket activation (LISTEN_FDS) needs POSIX fd inheritance")
    try:
        return _listen_fds()
    finally:
        if unset_environment:
            for name in _ACTIVATION_VARS:
                os.environ.pop(name, None)


def _listen_fds() -> dict[str, list[OwnedFd]]:
    pid_text = os.environ.get("LISTEN_PID")
    if pid_text is None:
        return {}
    pid = _number("LISTEN_PID", pid_text)
    if pid <= 0:
        raise ActivationError(f"LISTEN_PID={pid_text!r} is not a process id")
    if pid != os.getpid():
        return {}  # meant for another process (we inherited its environment)
    count_text = os.environ.get("LISTEN_FDS")
    if count_text is None:
        return {}
    count = _number("LISTEN_FDS", count_text)
    if count > 2**31 - 1 - LISTEN_FDS_START:
        raise ActivationError(f"LISTEN_FDS={count_text!r} is larger than any fd table")
    names = _names(count)
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + count)
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={count} names fd {fd}, which is not open ({exc})") from exc
    result: dict[str, list[OwnedFd]] = {}
    for fd, name in zip(fds, names, strict=True):
        os.set_inheritable(fd, False)
        result.setdefault(name, []).append(OwnedFd(fd))
    return result


def _names(count: int) -> list[str]:
    text = os.environ.get("LISTEN_FDNAMES")
    if text is None:
        return [UNKNOWN_NAME] * count
    names = text.split(":") if text else []
    if len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES={text!r} has {len(names)} names for LISTEN_FDS={count}")
    return names


def _number(var: str, text: str) -> int:
    # int() would take " 3", "+3" and "3_0"; systemd takes plain digits.
    if not _DIGITS.fullmatch(text):
        raise ActivationError(f"{var}={text!r} is not a decimal number")
    return int(text)


# -- sd_notify ------------------------------------------------------------------------


def notify(
    state: str | Mapping[str, object],
    *,
    fds: Iterable[int | Any] = (),
    unset_environment: bool = False,
) -> bool:
    """Send *state* to the service manager, as ``sd_pid_notify_with_fds(0, ...)``.

    *state* is the datagram's text (``"READY=1\\nSTATUS=up"``) or a mapping
    of assignments (``{"READY": 1, "STATUS": "up"}``, joined with newlines
    in order).  *fds* (ints or objects with ``fileno()``, at most 253: one
    ``SCM_RIGHTS`` message) go with it; they stay the caller's, the manager
    gets duplicates.

    Returns ``False`` without sending when ``NOTIFY_SOCKET`` is not set (not
    run by a manager that listens), ``True`` once the datagram was sent.
    With *unset_environment* the variable is removed from `os.environ`
    afterwards (whatever the outcome), so children do not inherit it.

    Raises `ActivationError` when ``NOTIFY_SOCKET`` is neither an absolute
    path nor ``@abstract`` or is too long, `ValueError` for a mapping value
    holding a newline or more than 253 fds, and `OSError` from the kernel
    (``ECONNREFUSED`` when nobody listens there, ``EAGAIN`` when its queue
    is full).  `OSError` (``EAFNOSUPPORT``) on Windows.
    """
    text = _format_state(state)
    nums = [fileno_of(fd) for fd in fds]
    if len(nums) > SCM_MAX_FD:
        raise ValueError(f"one notification carries at most {SCM_MAX_FD} fds, got {len(nums)}")
    address = os.environ.get("NOTIFY_SOCKET")
    try:
        if address is None:
            return False
        _send_datagram(_notify_address(address), text.encode(), nums)
        return True
    finally:
        if unset_environment:
            os.environ.pop("NOTIFY_SOCKET", None)


def _format_state(state: str | Mapping[str, object]) -> str:
    if isinstance(state, str):
        if not state:
            raise ValueError("an empty notification says nothing")
        return state
    lines = []
    for key, value in state.items():
        text = str(value)
        if "\n" in key or "=" in key or not key:
            raise ValueError(f"{key!r} is not a notification variable name")
        if "\n" in text:
            raise ValueError(f"{key}={text!r}: a newline would start another assignment")
        lines.append(f"{key}={text}")
    if not lines:
        raise ValueError("an empty notification says nothing")
    return "\n".join(lines)


def _notify_address(value: str) -> str | bytes:
    if len(value) < 2 or value[0] not in "/@":
        raise ActivationError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor @abstract")
    encoded = os.fsencode(value)
    if len(encoded) > 108:  # sizeof(sun_path) on Linux; less elsewhere, which the kernel reports
        raise ActivationError(f"NOTIFY_SOCKET={value!r} is longer than an AF_UNIX address")
    if value[0] == "@":
        if sys.platform != "linux":
            raise ActivationError(f"NOTIFY_SOCKET={value!r}: abstract sockets exist on Linux only")
        return b"\0" + encoded[1:]
    return value


def _send_datagram(address: str | bytes, data: bytes, fds: list[int]) -> None:
    if sys.platform == "win32":
        raise OSError(errno.EAFNOSUPPORT, "sd_notify needs AF_UNIX datagram sockets, which Windows lacks")
    from . import _posixio

    # Connected, then one send with the fds: the datagram libsystemd's
    # sendmsg(msg_name=...) makes, through the one module that does sendmsg.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        _posixio.write(sock, [data], fds)


# -- the usual notifications ----------------------------------------------------------


def ready(status: str | None = None) -> bool:
    """Tell the manager start-up is finished (``READY=1``), with an optional ``STATUS=``."""
    state: dict[str, object] = {"READY": 1}
    if status is not None:
        state["STATUS"] = status
    return notify(state)


def status(text: str) -> bool:
    """Set the free-form status line the manager shows (``STATUS=``)."""
    return notify({"STATUS": text})


def mainpid(pid: int) -> bool:
    """Tell the manager the service's main process is now *pid* (``MAINPID=``).

    Used when an upgrade hands the service to another process; the unit
    needs ``NotifyAccess=all`` (or ``exec``) for the manager to listen to it.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"MAINPID must be a positive process id, got {pid!r}")
    return notify({"MAINPID": pid})


def stopping(status: str | None = None) -> bool:
    """Tell the manager the service is shutting down (``STOPPING=1``)."""
    state: dict[str, object] = {"STOPPING": 1}
    if status is not None:
        state["STATUS"] = status
    return notify(state)


def check_fdname(name: str) -> str:
    """Return *name* if systemd accepts it as an fd name, else raise `ValueError`.

    systemd takes 1 to 255 printable ASCII characters without ``:``.
    """
    if not isinstance(name, str):
        raise TypeError(f"an fd name is a str, got {type(name).__name__}")
    if not 0 < len(name) <= FDNAME_MAX or ":" in name or not all(" " <= c <= "~" for c in name):
        raise ValueError(f"{name!r} is not a valid fd name (1-{FDNAME_MAX} printable ASCII, no ':')")
    return name


def fdstore(name: str, fds: Iterable[int | Any], *, poll: bool = True) -> bool:
    """Keep *fds* in the manager's fd store under *name* (``FDSTORE=1``, ``FDNAME=``).

    The manager holds duplicates (the caller still owns *fds*) and passes
    them to the service's next start by socket activation, where
    `listen_fds` returns them under *name*.  More than 253 fds go as several
    datagrams under the same name.  *poll* false adds ``FDPOLL=0``: the
    manager then does not watch the fds and drop one that reports
    POLLHUP/POLLERR (systemd 246+).  The unit needs ``FileDescriptorStoreMax=``
    large enough.  Returns ``False`` when ``NOTIFY_SOCKET`` is not set.
    Raises as `notify`, and `ValueError` for an invalid name or no fds.
    """
    check_fdname(name)
    nums = [fileno_of(fd) for fd in fds]
    if not nums:
        raise ValueError("fdstore() needs at least one fd")
    state: dict[str, object] = {"FDSTORE": 1, "FDNAME": name}
    if not poll:
        state["FDPOLL"] = 0
    sent = False
    for start in range(0, len(nums), SCM_MAX_FD):
        sent = notify(state, fds=nums[start : start + SCM_MAX_FD])
        if not sent:
            return False
    return sent


def fdstore_remove(name: str) -> bool:
    """Drop every fd stored under *name* from the manager's fd store (``FDSTOREREMOVE=1``)."""
    check_fdname(name)
    return notify({"FDSTOREREMOVE": 1, "FDNAME": name})
