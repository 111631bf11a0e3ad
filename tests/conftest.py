"""Shared fixtures: every test proves it leaked no fd.

What counts as "open" depends on the platform (`open_fds`): the fds of
/proc/self/fd on Linux, of /dev/fd on macOS and the BSDs, and on Windows the
CRT fds plus the Winsock SOCKETs, two separately numbered kinds (a SOCKET is
a handle value, not a CRT fd, so neither listing sees the other's).
"""

from __future__ import annotations

import gc
import os
import stat
import sys
from collections.abc import Iterator

import pytest

#: Windows: CRT fds are looked for below this, and on in blocks of
#: `_CRT_FD_BLOCK` while the last block held one, up to the UCRT's maximum.
CRT_FD_SCAN_MIN = 2048
_CRT_FD_BLOCK = 1024
_CRT_FD_MAX = 8192
#: Windows: SOCKET values are scanned up to at least this (handle values are
#: multiples of 4), and further while handles turn up near the top.
SOCKET_SCAN_MIN = 1 << 14
_SOCKET_SCAN_MARGIN = 1 << 12


def _describe_stat(fd: int) -> str | None:
    """What *fd* is, from fstat (where the fd table has no link targets): None if closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    kinds = {
        stat.S_IFREG: "file",
        stat.S_IFDIR: "dir",
        stat.S_IFCHR: "chr",
        stat.S_IFBLK: "blk",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "socket",
        stat.S_IFLNK: "link",
    }
    return f"{kinds.get(stat.S_IFMT(st.st_mode), 'other')}:{st.st_dev}:{st.st_ino}"


def posix_open_fds(directory: str) -> dict[int | str, str]:
    """Each fd listed in *directory* (/proc/self/fd or /dev/fd) and what it points at."""
    fds: dict[int | str, str] = {}
    for name in os.listdir(directory):
        fd = int(name)
        try:
            fds[fd] = os.readlink(f"{directory}/{name}")
            continue
        except OSError:  # the directory fd listdir itself used, or /dev/fd has no links
            pass
        described = _describe_stat(fd)
        if described is not None:
            fds[fd] = described
    return fds


if sys.platform == "win32":
    import ctypes
    import msvcrt
    import socket  # noqa: F401 - its import runs WSAStartup, which getsockopt needs

    _ws2 = ctypes.WinDLL("ws2_32")
    _ws2.getsockopt.argtypes = (
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_int),
    )
    _ws2.getsockopt.restype = ctypes.c_int
    _SOL_SOCKET = 0xFFFF
    _SO_TYPE = 0x1008

    def crt_fds() -> dict[int, int]:
        """Each open CRT fd and its OS handle (``_get_osfhandle`` succeeds only for those)."""
        fds: dict[int, int] = {}
        low, high = 0, CRT_FD_SCAN_MIN
        while True:
            for fd in range(low, high):
                try:
                    fds[fd] = msvcrt.get_osfhandle(fd)
                except OSError:
                    continue
            # The CRT hands out the lowest free number: past an empty block, nothing.
            if high >= _CRT_FD_MAX or not any(fd >= high - _CRT_FD_BLOCK for fd in fds):
                return fds
            low, high = high, high + _CRT_FD_BLOCK

    def _sockets_in(low: int, high: int) -> list[int]:
        value = ctypes.c_int()
        size = ctypes.c_int()
        found = []
        getsockopt = _ws2.getsockopt
        for handle in range(low, high, 4):
            size.value = ctypes.sizeof(value)
            if getsockopt(handle, _SOL_SOCKET, _SO_TYPE, ctypes.byref(value), ctypes.byref(size)) == 0:
                found.append(handle)
        return found

    def open_sockets(handles_seen: int | None = None) -> list[int]:
        """Every SOCKET value that answers ``getsockopt(SO_TYPE)``.

        The handle space is scanned up to `SOCKET_SCAN_MIN`, and on while
        sockets (or other handles: *handles_seen* is the highest known, by
        default the highest CRT fd's handle) turn up within
        `_SOCKET_SCAN_MARGIN` of the end: the table is filled lowest-first,
        so past the last handle there is nothing.  (The other handles are not
        scanned: ``GetHandleInformation`` costs a wineserver round trip each.)
        """
        if handles_seen is None:
            handles_seen = max(crt_fds().values(), default=0)
        low, high = 4, SOCKET_SCAN_MIN
        found: list[int] = []
        while True:
            found += _sockets_in(low, high)
            highest = max([handles_seen, *found])
            if highest + _SOCKET_SCAN_MARGIN <= high:
                return found
            low, high = high, highest + 2 * _SOCKET_SCAN_MARGIN

    def open_fds() -> dict[int | str, str]:
        """Map each CRT fd (``"fd N"``) and each SOCKET (``"SOCKET H"``) open in this process to its kind.

        Only the kind: a CRT fd's handle changes whenever pytest's capture
        dup2()s onto fds 1 and 2, which is no leak.
        """
        crt = crt_fds()
        fds: dict[int | str, str] = {f"fd {fd}": "crt" for fd in crt}
        fds.update({f"SOCKET {h}": "socket" for h in open_sockets(max(crt.values(), default=0))})
        return fds

elif os.path.isdir("/proc/self/fd"):

    def open_fds() -> dict[int | str, str]:
        """Map each fd open in this process to what it points at (its /proc/self/fd link)."""
        return posix_open_fds("/proc/self/fd")

else:  # macOS, the BSDs: /dev/fd (without fdescfs FreeBSD lists only 0-2 there)

    def open_fds() -> dict[int | str, str]:
        """Map each fd open in this process to what it points at (/dev/fd, fstat)."""
        return posix_open_fds("/dev/fd")


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    """Fail the test if it leaves any fd open that was not open before.

    An fd still held by garbage that a collection would close is no leak:
    only when something new is open does this collect (a full collection
    per test would cost more than most tests) and look again.
    """
    before = open_fds()
    yield
    leaked = new_fds(before)
    if leaked:
        gc.collect()
        leaked = new_fds(before)
    assert not leaked, f"test leaked fds: {leaked}"


def new_fds(before: dict[int | str, str]) -> dict[int | str, str]:
    """What is open now that was not (or was something else) in *before*."""
    return {fd: target for fd, target in open_fds().items() if before.get(fd) != target}


from ._transports import PAIR_FACTORIES, PairFactory  # noqa: E402


@pytest.fixture(params=PAIR_FACTORIES)
def make_pair(request: pytest.FixtureRequest) -> PairFactory:
    """A function returning a connected (a, b) channel pair for one transport."""
    factory: PairFactory = request.param
    return factory
