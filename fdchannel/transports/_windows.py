"""`WinDuplicate`: the receiver duplicates handles out of the sender (Windows).

The protocol (shared with `PidfdGetfd`, see `._pull`) talks only to a
`WinApi` adapter: `fdchannel.transports._win32.Win32Api` is the real one,
over kernel32 and Winsock; the tests drive the protocol on Linux against a
simulated adapter (tests/_win_sim.py).

References on the wire, fixed-width little-endian: ``<II`` (kind, value)
per fd, then for every socket ``<I`` length + its ``WSAPROTOCOL_INFOW``
blob.  Kind 1 = a kernel handle duplicated with ``DuplicateHandle`` (value:
the handle's low 32 bits, the only significant ones); kind 2 = a Winsock
socket shared with ``WSADuplicateSocket`` (value: index of its blob).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

from .._errors import ProtocolError
from .._fdutil import SocketHandle
from ._base import Session, Transport
from ._pull import HEAD, PullSession
from ._winapi import WinApi, valid_handle

__all__ = ["MAX_SHARE_BLOB", "WinApi", "WinDuplicate", "valid_handle"]

KIND_HANDLE: Final = 1
KIND_SOCKET: Final = 2
_REF: Final = struct.Struct("<II")
_LEN: Final = struct.Struct("<I")
#: A WSAPROTOCOL_INFOW is 628 bytes; leave room, refuse anything larger.
MAX_SHARE_BLOB: Final = 1024


class _WinSession(PullSession):
    transport_name = "WinDuplicate"
    # Sockets are shared *for* a target pid, so each end announces its pid.
    greet = True

    def __init__(self, api: WinApi) -> None:
        self._api = api
        super().__init__()

    def _os_pid(self) -> int:
        return self._api.current_pid()

    # -- sending side
    def waits_for_peer(self, fds: Sequence[int]) -> bool:
        return self.peer_pid is None and any(
            fd.__class__ is SocketHandle or self._api.is_socket(fd) for fd in fds
        )

    def _os_export(self, fd: int) -> tuple[Any, Any]:
        api = self._api
        # A socket object (or an OwnedFd holding one) says so; a bare int is
        # a CRT fd if it is one, else a SOCKET if it answers as one.
        if fd.__class__ is SocketHandle or api.is_socket(fd):
            pid = self.peer_pid
            if pid is None:
                raise OSError(
                    errno.ENOTCONN,
                    "WinDuplicate can send a socket only once the peer's channel has announced its "
                    "process id (it does so when created); receive from the peer first",
                )
            blob, kept = api.share_socket(fd, pid)
            return (KIND_SOCKET, blob), (KIND_SOCKET, kept)
        handle = api.get_osfhandle(fd)
        if not valid_handle(handle):
            raise OSError(errno.EBADF, f"fd {fd} has no valid handle ({handle:#x}); refusing to send it")
        own = api.current_process()
        dup = api.duplicate_handle(own, handle, own, False)
        if not valid_handle(dup):
            api.close_handle(dup)
            raise OSError(errno.EBADF, f"DuplicateHandle gave an unusable handle {dup:#x}")
        return (KIND_HANDLE, dup), (KIND_HANDLE, dup)

    def _os_release(self, kept: Any) -> None:
        if isinstance(kept, tuple):
            kind, value = kept
            if kind == KIND_SOCKET:
                self._api.close_socket(value)
                return
            kept = value
        self._api.close_handle(kept)

    def _os_new_lease(self) -> tuple[int, bytes, Any]:
        token = os.urandom(16)
        handle = self._api.create_lease(token)
        return handle, token, handle

    def _os_pack_refs(self, refs: list[Any]) -> bytes:
        parts: list[bytes] = []
        blobs: list[bytes] = []
        for kind, value in refs:
            if kind == KIND_SOCKET:
                parts.append(_REF.pack(KIND_SOCKET, len(blobs)))
                blobs.append(value)
            else:
                parts.append(_REF.pack(KIND_HANDLE, value))
        parts.extend(_LEN.pack(len(b)) + b for b in blobs)
        return b"".join(parts)

    def _os_unpack_refs(self, nfds: int, data: bytes) -> tuple[None, list[Any]]:
        refs = _parse_refs(nfds, data)
        blobs = _parse_blobs(data, nfds * _REF.size, sum(kind == KIND_SOCKET for kind, _ in refs))
        return None, [(kind, blobs[value] if kind == KIND_SOCKET else value) for kind, value in refs]

    # -- receiving side
    def _os_open_peer(self, pid: int) -> int:
        return self._api.open_process(pid)

    def _os_close_peer(self, proc: int) -> None:
        self._api.close_handle(proc)

    def _os_pull(self, proc: int, ref: Any) -> int:
        api = self._api
        kind, value = ref
        if kind == KIND_SOCKET:
            return SocketHandle(api.socket_from_share(value))
        handle = api.duplicate_handle(proc, value, api.current_process(), False)
        try:
            return api.open_osfhandle(handle)
        except BaseException:
            api.close_handle(handle)
            raise

    def _os_pull_lease(self, proc: int, num: int) -> int:
        if not valid_handle(num):
            raise ProtocolError(f"WinDuplicate: the sender named an invalid lease handle {num:#x}")
        return self._api.duplicate_handle(proc, num, self._api.current_process(), False)

    def _os_lease_token(self, lease: int) -> bytes | None:
        return self._api.read_lease(lease)

    def _os_close_lease(self, lease: int) -> None:
        self._api.close_handle(lease)

    def _os_same_lease(self, peer: Any) -> bool:
        api = self._api
        try:
            again = api.duplicate_handle(peer.proc, peer.lease_num, api.current_process(), False)
        except OSError:
            return False
        try:
            try:
                return api.compare_object_handles(again, peer.lease)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
            # Before Windows 10: the same section object holds the same
            # random token; any other object does not.
            return bool(api.read_lease(again) == peer.token)
        finally:
            api.close_handle(again)

    def _os_close_fd(self, fd: int) -> None:
        if fd.__class__ is SocketHandle:
            self._api.close_socket(fd)
        else:
            self._api.close_fd(fd)

    def _os_exited(self, proc: int) -> bool:
        return self._api.process_exited(proc)


class WinDuplicate(Transport):
    """The receiver duplicates each handle out of the sender (Windows).

    Files and pipes go through ``DuplicateHandle`` (via
    ``msvcrt.get_osfhandle``/``open_osfhandle``), sockets through
    ``socket.share``/``socket.fromshare`` (Winsock sockets must not go through
    ``DuplicateHandle``).  Works over any connected stream socket (on
    Windows: TCP on loopback).  The receiver needs ``PROCESS_DUP_HANDLE`` on
    the sender; without it ``recv()`` raises `PermissionError` for that
    message and the channel stays usable.  Acknowledgements, the lease and
    `FdsWithdrawn` work as for `PidfdGetfd` (docs/transports.md).

    *api* is the Win32 adapter; the default is the real one on Windows.
    Elsewhere a channel construction raises `OSError` (``ENOSYS``) unless an
    adapter is given (the tests pass a simulated one).
    """

    wire_id = 2
    name = "WinDuplicate"

    def __init__(self, api: WinApi | None = None) -> None:
        """Use the real Win32 adapter on Windows, or *api*.

        Args:
            api: The Win32 adapter; ``None`` means the real one on Windows
                (and none elsewhere).  Only tests pass another.
        """
        if sys.platform == "win32":  # mypy narrows on a bare platform check
            if api is None:
                from ._win32 import Win32Api

                api = Win32Api()
        self._api = api

    def check_socket(self, sock: socket.socket) -> None:
        if self._api is None:
            raise OSError(errno.ENOSYS, f"WinDuplicate needs Windows; this is {sys.platform}")

    def max_aux(self, max_fds: int) -> int:
        return HEAD.size + max_fds * (_REF.size + _LEN.size + MAX_SHARE_BLOB)

    def session(self, sock: socket.socket) -> Session:
        if self._api is None:
            raise OSError(errno.ENOSYS, f"WinDuplicate needs Windows; this is {sys.platform}")
        return _WinSession(self._api)

    def __repr__(self) -> str:
        return "WinDuplicate()"


def _parse_refs(nfds: int, data: bytes) -> list[tuple[int, int]]:
    """The (kind, value) references of *nfds* fds at the start of *data*, checked."""
    if len(data) < nfds * _REF.size:
        raise ProtocolError(f"WinDuplicate: {len(data)} bytes of references for {nfds} fds")
    refs: list[tuple[int, int]] = []
    nblobs = 0
    for i in range(nfds):
        kind, value = _REF.unpack_from(data, i * _REF.size)
        if kind == KIND_HANDLE:
            if not valid_handle(value):
                raise ProtocolError(f"WinDuplicate: the sender named an invalid handle {value:#x}")
        elif kind == KIND_SOCKET:
            if value != nblobs:
                raise ProtocolError("WinDuplicate: socket blobs out of order")
            nblobs += 1
        else:
            raise ProtocolError(f"WinDuplicate: unknown reference kind {kind}")
        refs.append((kind, value))
    return refs


def _parse_blobs(data: bytes, pos: int, nblobs: int) -> list[bytes]:
    """The *nblobs* length-prefixed socket blobs from *pos* to the end of *data*, checked."""
    blobs: list[bytes] = []
    for _ in range(nblobs):
        if len(data) < pos + _LEN.size:
            raise ProtocolError("WinDuplicate: truncated socket blob")
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if n > MAX_SHARE_BLOB or len(data) < pos + n:
            raise ProtocolError("WinDuplicate: malformed socket blob")
        blobs.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise ProtocolError("WinDuplicate: trailing bytes after the references")
    return blobs
