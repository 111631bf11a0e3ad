"""`WinApi`: the Win32 calls `WinDuplicate` and `fdchannel.fdpass` need, as an interface.

Below both `fdchannel.transports._windows` (the protocol) and
`fdchannel.transports._win32` (the real adapter over kernel32 and Winsock),
so neither imports the other's module to name it; the tests implement it
with a simulated adapter (tests/_win_sim.py).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["WinApi", "valid_handle"]

#: -6 as a 32-bit value: the lowest of the pseudo-handles (-6..-1).
_FIRST_PSEUDO = 0xFFFFFFFA


def valid_handle(handle: int) -> bool:
    """True for a handle value that may be duplicated.

    ``0`` is no handle; ``-1`` is both ``INVALID_HANDLE_VALUE`` and the
    current-process pseudo-handle, and -2..-6 are the other pseudo-handles
    (current thread, the process, thread and effective tokens): duplicating
    those would hand the peer the sender's own process, thread or token.
    Only the low 32 bits of a real handle are significant, so negative and
    larger values are refused too, and -6..-1 as 32-bit values
    (0xFFFFFFFA..0xFFFFFFFF).
    """
    return 0 < handle < _FIRST_PSEUDO


class WinApi(Protocol):
    """The Win32 calls `WinDuplicate` and `fdchannel.fdpass` need.

    Every method raises `OSError` with a meaningful subclass: `PermissionError`
    for access denied, `ProcessLookupError` when a pid names no process,
    `OSError` with ``EBADF`` for an invalid handle or fd.
    """

    def current_pid(self) -> int:
        """``GetCurrentProcessId()``."""

    def current_process(self) -> int:
        """``GetCurrentProcess()``: the pseudo-handle (-1), never closed."""

    def get_osfhandle(self, fd: int) -> int:
        """``_get_osfhandle``: the handle of CRT fd *fd* (borrowed)."""

    def open_osfhandle(self, handle: int) -> int:
        """``_open_osfhandle``: a new CRT fd owning *handle*."""

    def close_fd(self, fd: int) -> None:
        """Close a CRT fd, or a socket that `socket_from_share` returned."""

    def is_socket(self, fd: int) -> bool:
        """True if *fd* is a Winsock socket rather than a CRT fd."""

    def share_socket(self, fd: int, pid: int) -> tuple[bytes, int]:
        """``WSADuplicateSocket`` *fd* for process *pid*: (blob, a kept duplicate socket)."""

    def close_socket(self, sock: int) -> None:
        """``closesocket``."""

    def socket_from_share(self, blob: bytes) -> int:
        """``WSASocket`` from a blob: a new socket owned by the caller."""

    def duplicate_handle(self, src_process: int, handle: int, dst_process: int, close_source: bool) -> int:
        """``DuplicateHandle(..., 0, FALSE, DUPLICATE_SAME_ACCESS[|DUPLICATE_CLOSE_SOURCE])``."""

    def open_process(self, pid: int, synchronize: bool = True) -> int:
        """``OpenProcess(PROCESS_DUP_HANDLE [| SYNCHRONIZE], FALSE, pid)``.

        *synchronize* adds the right `process_exited` needs; `fdchannel.fdpass`
        asks for ``PROCESS_DUP_HANDLE`` alone, as IO::FDPass does.
        """

    def close_handle(self, handle: int) -> None:
        """``CloseHandle``."""

    def compare_object_handles(self, first: int, second: int) -> bool:
        """``CompareObjectHandles``: same kernel object?  `OSError` (``ENOSYS``) before Windows 10."""

    def create_lease(self, token: bytes) -> int:
        """A new kernel object holding *token* (a read-only section); its handle."""

    def read_lease(self, handle: int) -> bytes | None:
        """The token a lease holds, or None if *handle* is no lease."""

    def process_exited(self, process: int) -> bool:
        """True once the process behind the handle has exited."""
