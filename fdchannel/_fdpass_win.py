"""`fdchannel.fdpass` on Windows: IO::FDPass's Win32 wire format.

The sender writes its process id (a DWORD, 4 bytes) then a handle value
(pointer-sized: 8 bytes on 64-bit Windows), both little-endian; the receiver
opens the sender with ``PROCESS_DUP_HANDLE`` and duplicates the handle into
itself with ``DUPLICATE_CLOSE_SOURCE``, so the handle moves from one process
to the other.  A Perl program using IO::FDPass on Windows interoperates when
both sides have the same pointer width (IO::FDPass writes the raw HANDLE, so
32- and 64-bit peers disagree; only the low 32 bits of a handle are
significant, and this side reads and writes the width of its own build).

Differences from IO::FDPass, all deliberate: the sender validates the fd and
sends a private *duplicate* of its handle, so its own fd stays open (and
``INVALID_HANDLE_VALUE``, which is also the current-process pseudo-handle,
is never sent); the receiver refuses pseudo-handle values; errors raise
`OSError` (``PermissionError`` when access is denied, `EOFError` at EOF),
never return ``-1``.  Inherent in the format: if the receiver never takes
the handle, the sender's duplicate stays open in the sender.

Winsock sockets cannot travel this way (``DuplicateHandle`` must not be used
on them): `send` refuses them.  Use a `fdchannel.Channel` with the
`WinDuplicate` transport for sockets.

*api* selects the Win32 adapter (the tests pass a simulated one).
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from typing import Any, Final

from ._ownedfd import fileno_of
from .transports._winapi import WinApi, valid_handle

__all__ = ["WIRE", "recv", "send"]

#: DWORD pid, then a pointer-sized HANDLE.
WIRE: Final = struct.Struct("<I" + ("Q" if struct.calcsize("P") == 8 else "I"))


def _exited(win: WinApi, pid: int) -> bool:
    """Whether process *pid* has exited: asked on a failure only, with a handle of its own.

    The handle the duplication used has ``PROCESS_DUP_HANDLE`` alone, which
    cannot wait on the process.
    """
    try:
        process = win.open_process(pid, synchronize=True)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        return win.process_exited(process)
    except OSError:
        return False
    finally:
        win.close_handle(process)


def _default_api(api: WinApi | None) -> WinApi:
    if api is not None:
        return api
    if sys.platform == "win32":
        from .transports._win32 import Win32Api

        return Win32Api()
    raise OSError(errno.ENOSYS, "IO::FDPass's Win32 format needs Windows")


def _as_socket(sock: socket.socket | int) -> tuple[socket.socket, bool]:
    if isinstance(sock, socket.socket):
        return sock, False
    return socket.socket(fileno=fileno_of(sock)), True


def send(sock: socket.socket | int, fd: int | Any, *, api: WinApi | None = None) -> None:
    """Send *fd* (borrowed: it stays open here) over *sock* in IO::FDPass's Win32 format.

    Raises `OSError` (``EBADF``) for an fd without a valid handle, ``ENOTSOCK``-like
    `OSError` for a Winsock socket, and what the socket raises.
    """
    win = _default_api(api)
    num = fileno_of(fd)
    if win.is_socket(num):
        raise OSError(errno.EOPNOTSUPP, "IO::FDPass's Win32 format cannot carry a Winsock socket")
    handle = win.get_osfhandle(num)
    if not valid_handle(handle):
        raise OSError(errno.EBADF, f"fd {num} has no valid handle ({handle:#x}); refusing to send it")
    own = win.current_process()
    # The receiver closes what it takes (DUPLICATE_CLOSE_SOURCE): give it a
    # duplicate so the caller's fd stays valid.
    dup = win.duplicate_handle(own, handle, own, False)
    s, borrowed = _as_socket(sock)
    try:
        s.sendall(WIRE.pack(win.current_pid(), dup))
    except BaseException:
        win.close_handle(dup)
        raise
    finally:
        if borrowed:
            s.detach()


def _read_record(s: socket.socket) -> bytes:
    size = WIRE.size
    # Non-blocking: consume nothing until the whole record is there.
    if s.gettimeout() == 0.0 and len(s.recv(size, socket.MSG_PEEK)) < size:
        raise BlockingIOError(errno.EAGAIN, "the whole IO::FDPass record has not arrived")
    data = b""
    while len(data) < size:
        chunk = s.recv(size - len(data))
        if not chunk:
            if data:
                raise OSError(errno.EBADMSG, "the peer closed the socket in the middle of a record")
            raise EOFError("the peer closed the socket")
        data += chunk
    return data


def recv(sock: socket.socket | int, *, api: WinApi | None = None) -> int:
    """Receive one fd sent in IO::FDPass's Win32 format; the caller owns it.

    Raises `EOFError` at EOF, `ProcessLookupError` if the sender has exited,
    `PermissionError` without ``PROCESS_DUP_HANDLE`` on it, `OSError`
    (``EBADMSG``) for a pseudo-handle or malformed record.  Nothing leaks in
    this process on any path.
    """
    win = _default_api(api)
    s, borrowed = _as_socket(sock)
    try:
        pid, handle = WIRE.unpack(_read_record(s))
    finally:
        if borrowed:
            s.detach()
    if not valid_handle(handle):
        raise OSError(errno.EBADMSG, f"the sender named an invalid or pseudo handle {handle:#x}")
    # PROCESS_DUP_HANDLE only: no more than IO::FDPass asks for.
    process = win.open_process(pid, synchronize=False)
    try:
        new = win.duplicate_handle(process, handle, win.current_process(), True)
    except OSError as exc:
        if _exited(win, pid):
            raise ProcessLookupError(errno.ESRCH, f"the sending process {pid} has exited") from exc
        raise
    finally:
        win.close_handle(process)
    try:
        return win.open_osfhandle(new)
    except BaseException:
        win.close_handle(new)
        raise
