"""What the systemd interoperability tests need: the real programs and library, or a reason.

Where a tool is missing the test skips with the reason, except in CI
(``CI=true``), where the tools are installed (``.ci/run``) and a missing one
is a failure, never a silent skip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sys
from typing import Any, NoReturn

import pytest

#: The systemd tests need AF_UNIX, fd inheritance by number and fork.
posix_only = pytest.mark.skipif(
    sys.platform == "win32", reason="systemd's protocols are POSIX (fd numbers, AF_UNIX datagrams)"
)


def missing(what: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing, and CI must run this test (.ci/run installs it)")
    pytest.skip(f"{what} is missing (Debian: apt-get install systemd libsystemd0)")


def socket_activate_program() -> str:
    """The path of ``systemd-socket-activate`` (skip or fail where it is missing)."""
    path = shutil.which("systemd-socket-activate") or (
        "/usr/bin/systemd-socket-activate" if os.access("/usr/bin/systemd-socket-activate", os.X_OK) else None
    )
    if path is None:
        missing("systemd-socket-activate (Debian's systemd package)")
    return path


def libsystemd() -> Any:
    """libsystemd.so.0 through ctypes (skip or fail where it is missing)."""
    name = ctypes.util.find_library("systemd") or "libsystemd.so.0"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        missing("libsystemd.so.0 (Debian's libsystemd0 package)")
    lib.sd_pid_notify_with_fds.argtypes = (
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_uint,
    )
    lib.sd_pid_notify_with_fds.restype = ctypes.c_int
    lib.sd_listen_fds_with_names.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p)))
    lib.sd_listen_fds_with_names.restype = ctypes.c_int
    return lib


def c_getenv(name: str) -> bytes | None:
    """*name* in the C environment, which libsystemd changes behind `os.environ`'s back."""
    libc = ctypes.CDLL(None)
    libc.getenv.argtypes = (ctypes.c_char_p,)
    libc.getenv.restype = ctypes.c_char_p
    value: bytes | None = libc.getenv(name.encode())
    return value


def sd_listen_fds_with_names(lib: Any, passed: int) -> int | list[str]:
    """What ``sd_listen_fds_with_names(0)`` makes of this process's variables: the names, or its 0 or -errno.

    The variables stay set.  libsystemd makes the fds it returns
    close-on-exec: the *passed* fds from 3 on get their inheritance back, so
    that the code under test finds them as the manager passed them.
    """
    libc = ctypes.CDLL(None)
    libc.free.argtypes = (ctypes.c_void_p,)
    before = [os.get_inheritable(3 + i) for i in range(passed)]
    names = ctypes.POINTER(ctypes.c_void_p)()
    n = int(lib.sd_listen_fds_with_names(0, ctypes.byref(names)))
    try:
        return n if n <= 0 else [ctypes.string_at(names[i]).decode() for i in range(n)]
    finally:
        if n > 0:
            for i in range(n):
                libc.free(names[i])
            libc.free(names)
        for i, inheritable in enumerate(before):
            os.set_inheritable(3 + i, inheritable)
