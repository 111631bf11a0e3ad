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
    return lib
