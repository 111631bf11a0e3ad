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

import contextlib
import errno
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

from ._codec import SCM_MAX_FD
from ._errors import ActivationError
from ._fdutil import close_listed
from ._ownedfd import OwnedFd, fileno_of

__all__ = [
    "DEFAULT_NOTIFY_TIMEOUT",
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
#: How long `notify` waits for room in the manager's queue, in seconds.
DEFAULT_NOTIFY_TIMEOUT: Final = 5.0
#: The name of every fd when ``LISTEN_FDNAMES`` is not set, as in libsystemd.
UNKNOWN_NAME: Final = "unknown"

_ACTIVATION_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]*")
_LEADING_ZERO: Final = re.compile(r"0[0-9]+")
#: Set by the `listen_fds` call that hands the fds out: a later call (the
#: variables kept, or set again by hand) would give each a second owner.
#: A forked child inherits it along with the copies of those owners.
_handed_out: dict[str, object] = {}
_new = object.__new__


def listen_fds(*, unset_environment: bool = True) -> dict[str, list[OwnedFd]]:
    """Return the fds passed by socket activation, by name, in the order passed.

    The fds are ``LISTEN_FDS_START`` (3) and up; each comes back as an
    `OwnedFd` the caller owns, made close-on-exec.  The names come from
    ``LISTEN_FDNAMES`` (``"unknown"`` for all when it is not set); a name
    may be shared by several fds (a socket unit with several ``Listen*=``
    lines names them all after the unit), or be empty, hence a list per
    name.

    Returns ``{}`` when the process was not activated: ``LISTEN_PID`` is not
    set, or names another process (the variables were inherited from a
    parent), or ``LISTEN_FDS`` is not set.  With *unset_environment* (the
    default, as ``sd_listen_fds(1)``) the three variables are removed from
    `os.environ` in every case, so children do not see them, and a later
    call returns ``{}``.

    The fds are handed out once per process: where libsystemd returns the
    same numbers again, a later call that finds the variables still set
    (``unset_environment=False``, or set again by hand) raises
    `ActivationError`, in a forked child too, rather than give an fd a
    second owner.  Code that needs the fds after the first call must be
    given the `OwnedFd` objects it returned.

    Raises `ActivationError` (a `ValueError`) quoting the value when
    ``LISTEN_PID`` or ``LISTEN_FDS`` is not a plain decimal number (a
    leading zero, octal to libsystemd, included), ``LISTEN_FDS`` is 0,
    ``LISTEN_FDNAMES`` does not hold one name per fd, a named fd is not
    open, or the fds were handed out already; then no fd is taken.  An
    exception while they are taken (`OSError` making an fd close-on-exec, a
    signal handler's `KeyboardInterrupt`) closes every one of the fds
    before it propagates, the ones already wrapped included.  A signal
    handler's error earlier, while the variables are read and the fds
    checked, leaves the fds open and unowned (and, with
    *unset_environment*, the variables gone).  `OSError` (``ENOTSUP``) on Windows, which has
    no fd inheritance of this kind.
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
    count = _count_for_this_process()
    if count is None:
        return {}
    if _handed_out:
        # Before the fstat()s: the first owner may have closed the fds, or
        # their numbers name other files by now.
        raise _taken_already(count)
    names = _names(count)
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={count} names fd {fd}, which is not open ({exc})") from exc
    claim = object()
    if _handed_out.setdefault("fds", claim) is not claim:  # another thread got here first
        raise _taken_already(count)
    return _take(fds, names)


def _count_for_this_process() -> int | None:
    """``LISTEN_FDS``, or None when the variables are not set or are another process's."""
    pid_text = os.environ.get("LISTEN_PID")
    if pid_text is None:
        return None
    pid = _number("LISTEN_PID", pid_text)
    if pid <= 0:
        raise ActivationError(f"LISTEN_PID={pid_text!r} is not a process id")
    if pid != os.getpid():
        return None  # meant for another process (we inherited its environment)
    count_text = os.environ.get("LISTEN_FDS")
    if count_text is None:
        return None
    count = _number("LISTEN_FDS", count_text)
    if count == 0:
        # A manager with no fd to pass sets none of the variables; libsystemd: EINVAL.
        raise ActivationError(f"LISTEN_FDS={count_text!r} passes no fd")
    if count > 2**31 - 1 - LISTEN_FDS_START:
        raise ActivationError(f"LISTEN_FDS={count_text!r} is larger than any fd table")
    return count


def _take(fds: list[int], names: list[str]) -> dict[str, list[OwnedFd]]:
    """Own *fds*, close-on-exec, by name; on any exception close every one of them."""
    # With the claim made (and, by default, the variables removed) nobody
    # takes these fds later: ours to close whatever happens.  Each moves into
    # its owner as `adopt` does (no point where a signal handler runs between
    # the two stores), but into a list of this frame, so that an exception
    # part-way closes the owned ones now, not when its traceback is freed.
    owners: list[OwnedFd] = []
    try:
        for fd in fds:
            os.set_inheritable(fd, False)
        for i in range(len(fds)):
            owner = _new(OwnedFd)
            owner._fd = fds[i]
            fds[i] = -1
            owners.append(owner)
        result: dict[str, list[OwnedFd]] = {}
        for owner, name in zip(owners, names, strict=True):
            result.setdefault(name, []).append(owner)
    except BaseException:
        for owner in owners:
            with contextlib.suppress(OSError):
                owner.close()
        close_listed(fds)  # those not moved yet (moved ones are -1 here)
        raise
    return result


def _taken_already(count: int) -> ActivationError:
    return ActivationError(
        f"LISTEN_FDS={count}: listen_fds() handed these fds out already in this process (or in the "
        "one it was forked from): the OwnedFd objects it returned own them (or, if that call failed "
        "part-way, it closed them)"
    )


def _names(count: int) -> list[str]:
    text = os.environ.get("LISTEN_FDNAMES")
    if text is None:
        return [UNKNOWN_NAME] * count
    # As libsystemd splits it: "" is one empty name, "a:" two names.
    names = text.split(":")
    if len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES={text!r} has {len(names)} names for LISTEN_FDS={count}")
    return names


def _number(var: str, text: str) -> int:
    # systemd writes plain decimal.  libsystemd's parser also skips leading
    # blanks and takes a sign and 0x, 0o and 0b prefixes, none of which a
    # manager writes; and it reads a leading 0 as octal, where other readers
    # (and int()) read decimal: which fds, or whose, such a value means
    # depends on who reads it, so it is refused rather than guessed.
    if _DECIMAL.fullmatch(text):
        return int(text)
    if _LEADING_ZERO.fullmatch(text):
        raise ActivationError(f"{var}={text!r} has a leading zero, which libsystemd reads as octal")
    raise ActivationError(f"{var}={text!r} is not a decimal number")


# -- sd_notify ------------------------------------------------------------------------


def notify(
    state: str | Mapping[str, object],
    *,
    fds: Iterable[int | Any] = (),
    unset_environment: bool = False,
    timeout: float | None = DEFAULT_NOTIFY_TIMEOUT,
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
    afterwards whatever the outcome (an argument refused included, as
    libsystemd does), so children do not inherit it.

    The manager's socket may have a full queue (a manager that is busy or
    stuck): libsystemd then blocks until there is room, for ever.  This
    waits at most *timeout* seconds (default `DEFAULT_NOTIFY_TIMEOUT`, 5;
    ``None`` blocks as libsystemd does; ``0.0`` does not wait) and then
    raises `TimeoutError` (``0.0``: `BlockingIOError`), nothing sent.

    Raises `ActivationError` when ``NOTIFY_SOCKET`` is neither an absolute
    path nor ``@abstract`` or is too long, `ValueError` for an empty
    *state*, an invalid mapping key, a value holding a newline, more than
    253 fds or a negative *timeout*, `TypeError` for an fd that is neither
    an int nor has ``fileno()``, `TimeoutError`/`BlockingIOError` as
    above, and `OSError` from the kernel (``ECONNREFUSED`` when nobody
    listens there).  `OSError` (``EAFNOSUPPORT``) on Windows.
    """
    try:
        # Checked inside: libsystemd unsets the variable on its EINVAL paths too.
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be non-negative or None")
        text = _format_state(state)
        nums = [fileno_of(fd) for fd in fds]
        if len(nums) > SCM_MAX_FD:
            raise ValueError(f"one notification carries at most {SCM_MAX_FD} fds, got {len(nums)}")
        address = os.environ.get("NOTIFY_SOCKET")
        if address is None:
            return False
        _send_datagram(_notify_address(address), text.encode(), nums, timeout)
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


def _send_datagram(address: str | bytes, data: bytes, fds: list[int], timeout: float | None) -> None:
    if sys.platform == "win32":
        raise OSError(errno.EAFNOSUPPORT, "sd_notify needs AF_UNIX datagram sockets, which Windows lacks")
    from . import _posixio
    from ._wait import wait_ready

    deadline = None if timeout is None else time.monotonic() + timeout
    # Connected, then one send with the fds: the datagram libsystemd's
    # sendmsg(msg_name=...) makes, through the one module that does sendmsg.
    # Non-blocking: a connected datagram socket polls writable once the
    # peer's queue has room, so the wait has a deadline.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(address)
        while not _posixio.write(sock, [data], fds):  # a datagram goes whole or not at all
            if timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "the service manager's notify queue is full")
            if not wait_ready([sock.fileno()], write=True, deadline=deadline):
                raise TimeoutError(f"the service manager's notify queue stayed full for {timeout}s")


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
