"""The real Win32 adapter for `WinDuplicate` and `fdchannel.fdpass` (Windows only).

Small on purpose: each method is one or two Win32 calls, so the protocol
logic above it can be tested on any OS against a simulated adapter.  This
module has not run on Windows in this project's CI (docs/portability.md).
"""

from __future__ import annotations

import errno
import socket
import sys

from .._fdutil import SocketHandle, close_fd
from ._winapi import WinApi

__all__ = ["Win32Api"]

if sys.platform == "win32":
    import ctypes
    import msvcrt
    import os
    from ctypes import wintypes

    _k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _kb = ctypes.WinDLL("kernelbase", use_last_error=True)

    _PROCESS_DUP_HANDLE = 0x0040
    _SYNCHRONIZE = 0x00100000
    _DUPLICATE_CLOSE_SOURCE = 0x1
    _DUPLICATE_SAME_ACCESS = 0x2
    _PAGE_READWRITE = 0x04
    _FILE_MAP_READ = 0x0004
    _FILE_MAP_WRITE = 0x0002
    _WAIT_OBJECT_0 = 0
    _ERROR_INVALID_PARAMETER = 87
    _INVALID_HANDLE_VALUE = wintypes.HANDLE(-1).value
    _TOKEN_SIZE = 16

    _k32.GetCurrentProcess.restype = wintypes.HANDLE
    _k32.GetCurrentProcessId.restype = wintypes.DWORD
    _k32.OpenProcess.restype = wintypes.HANDLE
    _k32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    _k32.CloseHandle.argtypes = (wintypes.HANDLE,)
    _k32.DuplicateHandle.argtypes = (
        wintypes.HANDLE,
        wintypes.HANDLE,
        wintypes.HANDLE,
        ctypes.POINTER(wintypes.HANDLE),
        wintypes.DWORD,
        wintypes.BOOL,
        wintypes.DWORD,
    )
    _k32.CreateFileMappingW.restype = wintypes.HANDLE
    _k32.CreateFileMappingW.argtypes = (
        wintypes.HANDLE,
        wintypes.LPVOID,
        wintypes.DWORD,
        wintypes.DWORD,
        wintypes.DWORD,
        wintypes.LPCWSTR,
    )
    _k32.MapViewOfFile.restype = wintypes.LPVOID
    _k32.MapViewOfFile.argtypes = (
        wintypes.HANDLE,
        wintypes.DWORD,
        wintypes.DWORD,
        wintypes.DWORD,
        ctypes.c_size_t,
    )
    _k32.UnmapViewOfFile.argtypes = (wintypes.LPCVOID,)
    _k32.WaitForSingleObject.argtypes = (wintypes.HANDLE, wintypes.DWORD)
    _k32.WaitForSingleObject.restype = wintypes.DWORD

    def _fail(what: str) -> OSError:
        code = ctypes.get_last_error()
        if what == "OpenProcess" and code == _ERROR_INVALID_PARAMETER:
            return ProcessLookupError(errno.ESRCH, "no such process")
        return ctypes.WinError(code, what)

    class Win32Api(WinApi):
        """`WinApi` over kernel32, msvcrt and Winsock."""

        def current_pid(self) -> int:
            return int(_k32.GetCurrentProcessId())

        def current_process(self) -> int:
            return -1  # GetCurrentProcess()'s constant pseudo-handle

        def get_osfhandle(self, fd: int) -> int:
            return int(msvcrt.get_osfhandle(fd))  # OSError(EBADF) if invalid

        def open_osfhandle(self, handle: int) -> int:
            return int(msvcrt.open_osfhandle(handle, 0))

        def close_fd(self, fd: int) -> None:
            if fd.__class__ is SocketHandle or self.is_socket(fd):
                self.close_socket(fd)
            else:
                os.close(fd)

        def is_socket(self, fd: int) -> bool:
            # A CRT fd is small and known to the CRT; anything else that
            # answers getsockopt is a SOCKET.
            try:
                msvcrt.get_osfhandle(fd)
                return False
            except OSError:
                pass
            try:
                # WinError 10038 (not a socket) comes from the constructor.
                s = socket.socket(fileno=fd)
            except OSError:
                return False
            try:
                s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
                return True
            except OSError:
                return False
            finally:
                s.detach()

        def share_socket(self, fd: int, pid: int) -> tuple[bytes, int]:
            s = socket.socket(fileno=fd)
            try:
                blob = s.share(pid)
                kept = s.dup()  # keeps the socket alive until acknowledged
            finally:
                s.detach()
            return blob, kept.detach()

        def close_socket(self, sock: int) -> None:
            close_fd(SocketHandle(sock))  # closesocket: not every SOCKET wraps in a socket object

        def socket_from_share(self, blob: bytes) -> int:
            return socket.fromshare(blob).detach()

        def duplicate_handle(
            self, src_process: int, handle: int, dst_process: int, close_source: bool
        ) -> int:
            out = wintypes.HANDLE()
            options = _DUPLICATE_SAME_ACCESS | (_DUPLICATE_CLOSE_SOURCE if close_source else 0)
            ok = _k32.DuplicateHandle(src_process, handle, dst_process, ctypes.byref(out), 0, False, options)
            if not ok:
                raise _fail("DuplicateHandle")
            return int(out.value or 0)

        def open_process(self, pid: int, synchronize: bool = True) -> int:
            access = _PROCESS_DUP_HANDLE | (_SYNCHRONIZE if synchronize else 0)
            h = _k32.OpenProcess(access, False, pid)
            if not h:
                raise _fail("OpenProcess")
            return int(h)

        def close_handle(self, handle: int) -> None:
            if not _k32.CloseHandle(handle):
                raise _fail("CloseHandle")

        def compare_object_handles(self, first: int, second: int) -> bool:
            # Looked up here, not at import: Windows 8.1 has no such function.
            compare = getattr(_kb, "CompareObjectHandles", None)
            if compare is None:
                raise OSError(errno.ENOSYS, "CompareObjectHandles needs Windows 10")
            compare.argtypes = (wintypes.HANDLE, wintypes.HANDLE)
            return bool(compare(first, second))

        def create_lease(self, token: bytes) -> int:
            h = _k32.CreateFileMappingW(_INVALID_HANDLE_VALUE, None, _PAGE_READWRITE, 0, len(token), None)
            if not h:
                raise _fail("CreateFileMappingW")
            view = _k32.MapViewOfFile(h, _FILE_MAP_WRITE, 0, 0, len(token))
            if not view:
                err = _fail("MapViewOfFile")
                _k32.CloseHandle(h)
                raise err
            ctypes.memmove(view, token, len(token))
            _k32.UnmapViewOfFile(view)
            return int(h)

        def read_lease(self, handle: int) -> bytes | None:
            view = _k32.MapViewOfFile(handle, _FILE_MAP_READ, 0, 0, _TOKEN_SIZE)
            if not view:
                return None  # not a section: not a lease
            try:
                return ctypes.string_at(view, _TOKEN_SIZE)
            finally:
                _k32.UnmapViewOfFile(view)

        def process_exited(self, process: int) -> bool:
            return bool(_k32.WaitForSingleObject(process, 0) == _WAIT_OBJECT_0)
