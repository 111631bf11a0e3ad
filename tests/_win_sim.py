"""A simulated Win32 machine: the one stand-in for a kernel in the test suite.

It models what the WinDuplicate protocol depends on, as Windows does it:
per-process handle tables whose values are reused lowest-free-first (so a
released value soon names another object, like fds), CRT fd tables over
them, ``OpenProcess`` with access checks (a process of another user is
refused), ``DuplicateHandle`` with ``DUPLICATE_CLOSE_SOURCE`` (which closes
the source even when the duplication fails) and with the ``-1`` pseudo-handle
meaning "the source process itself", ``CompareObjectHandles``, process exit
(the handle table is destroyed; handles to the process stay valid), and
``WSADuplicateSocket`` blobs usable once, only by the process they name.
"""

from __future__ import annotations

import errno
import itertools

from fdchannel.transports._windows import WinApi

PSEUDO_CURRENT_PROCESS = -1
PROCESS_DUP_HANDLE = 0x40
SYNCHRONIZE = 0x00100000
_FIRST_HANDLE = 0x100  # keeps handle values apart from small CRT fd numbers


class KObj:
    """A kernel object: identity is the Python object."""

    def __init__(self, kind: str, name: str = "", data: object = None) -> None:
        self.kind = kind
        self.name = name
        self.data = data

    def __repr__(self) -> str:
        return f"<KObj {self.kind} {self.name}>"


class SimProcess:
    def __init__(self, machine: SimMachine, pid: int, user: str) -> None:
        self.machine = machine
        self.pid = pid
        self.user = user
        self.handles: dict[int, tuple[KObj, int]] = {}
        self.crt: dict[int, int] = {}
        self.exited = False
        self.obj = KObj("process", f"pid {pid}", self)
        self.api = SimApi(self)

    def add_handle(self, obj: KObj, access: int = 0) -> int:
        if self.exited:
            raise OSError(errno.EBADF, "the process has exited")
        value = next(v for v in itertools.count(_FIRST_HANDLE, 4) if v not in self.handles)
        self.handles[value] = (obj, access)
        return value

    def obj_of(self, handle: int) -> KObj:
        try:
            return self.handles[handle][0]
        except KeyError:
            raise OSError(errno.EBADF, f"invalid handle {handle:#x} in pid {self.pid}") from None

    def open_file(self, name: str) -> int:
        """Create a file object and return a CRT fd for it (like ``open()``)."""
        return self.api.open_osfhandle(self.add_handle(KObj("file", name)))

    def new_socket(self, name: str) -> int:
        """Create a socket; like Python on Windows, its "fd" is the SOCKET handle."""
        return self.add_handle(KObj("socket", name))

    def bad_crt_fd(self) -> int:
        """A CRT fd whose handle is INVALID_HANDLE_VALUE (a GUI process's stdin)."""
        fd = next(n for n in itertools.count(0) if n not in self.crt)
        self.crt[fd] = -1
        return fd

    def object_of_fd(self, fd: int) -> KObj:
        handle = self.crt.get(fd, fd)
        return self.obj_of(handle)

    def exit(self) -> None:
        self.exited = True
        self.handles.clear()
        self.crt.clear()


class SimMachine:
    def __init__(self) -> None:
        self.processes: dict[int, SimProcess] = {}
        self._pids = itertools.count(1000, 4)
        self.shares: dict[bytes, tuple[KObj, int]] = {}

    def spawn(self, user: str = "alice") -> SimProcess:
        proc = SimProcess(self, next(self._pids), user)
        self.processes[proc.pid] = proc
        return proc

    def reap(self, proc: SimProcess) -> None:
        """The last handle to an exited process is gone: its pid means nothing now."""
        self.processes.pop(proc.pid, None)


class SimApi(WinApi):
    """The `WinApi` of one simulated process."""

    def __init__(self, proc: SimProcess) -> None:
        self.proc = proc
        self.opened_with = 0

    def _process(self, handle: int, need: int = PROCESS_DUP_HANDLE) -> SimProcess:
        if handle == PSEUDO_CURRENT_PROCESS:
            return self.proc
        obj, access = self.proc.handles.get(handle, (None, 0))
        if obj is None or obj.kind != "process":
            raise OSError(errno.EBADF, f"{handle:#x} is no process handle")
        if access & need != need:
            raise PermissionError(errno.EACCES, "access denied")
        target = obj.data
        assert isinstance(target, SimProcess)
        return target

    def current_pid(self) -> int:
        return self.proc.pid

    def current_process(self) -> int:
        return PSEUDO_CURRENT_PROCESS

    def get_osfhandle(self, fd: int) -> int:
        try:
            return self.proc.crt[fd]
        except KeyError:
            raise OSError(errno.EBADF, f"bad file descriptor {fd}") from None

    def open_osfhandle(self, handle: int) -> int:
        self.proc.obj_of(handle)
        fd = next(n for n in itertools.count(3) if n not in self.proc.crt)
        self.proc.crt[fd] = handle
        return fd

    def close_fd(self, fd: int) -> None:
        handle = self.proc.crt.pop(fd, None)
        self.close_handle(fd if handle is None else handle)

    def is_socket(self, fd: int) -> bool:
        if fd in self.proc.crt:
            return False
        entry = self.proc.handles.get(fd)
        return entry is not None and entry[0].kind == "socket"

    def share_socket(self, fd: int, pid: int) -> tuple[bytes, int]:
        obj = self.proc.obj_of(fd)
        if obj.kind != "socket":
            raise OSError(errno.ENOTSOCK, "not a socket")
        blob = (b"WSAPROTOCOL_INFOW:%d:%d:" % (id(obj), len(self.proc.machine.shares))).ljust(628, b"\0")
        self.proc.machine.shares[blob] = (obj, pid)
        return blob, self.proc.add_handle(obj)

    def close_socket(self, sock: int) -> None:
        self.close_handle(sock)

    def socket_from_share(self, blob: bytes) -> int:
        obj, pid = self.proc.machine.shares.get(blob, (None, 0))
        if obj is None or pid != self.proc.pid:
            raise OSError(errno.EINVAL, "WSASocket: the protocol info is not for this process")
        del self.proc.machine.shares[blob]
        return self.proc.add_handle(obj)

    def duplicate_handle(self, src_process: int, handle: int, dst_process: int, close_source: bool) -> int:
        src = self._process(src_process)
        dst = self._process(dst_process)
        try:
            if handle in (PSEUDO_CURRENT_PROCESS, 0xFFFFFFFF):
                # What makes INVALID_HANDLE_VALUE dangerous: it is the
                # pseudo-handle of the *source* process.
                obj, access = src.obj, PROCESS_DUP_HANDLE
            else:
                if src.exited or handle not in src.handles:
                    raise OSError(errno.EBADF, f"invalid handle {handle:#x} in pid {src.pid}")
                obj, access = src.handles[handle]
            return dst.add_handle(obj, access)
        finally:
            if close_source and handle in src.handles:
                del src.handles[handle]

    def open_process(self, pid: int, synchronize: bool = True) -> int:
        target = self.proc.machine.processes.get(pid)
        if target is None:
            raise ProcessLookupError(errno.ESRCH, f"no process {pid}")
        if target.user != self.proc.user:
            raise PermissionError(errno.EACCES, f"access denied to process {pid}")
        access = PROCESS_DUP_HANDLE | (SYNCHRONIZE if synchronize else 0)
        #: The rights the last OpenProcess asked for, for the tests to check.
        self.opened_with = access
        return self.proc.add_handle(target.obj, access)

    def close_handle(self, handle: int) -> None:
        if handle == PSEUDO_CURRENT_PROCESS:
            return
        if self.proc.handles.pop(handle, None) is None:
            raise OSError(errno.EBADF, f"CloseHandle: invalid handle {handle:#x}")

    def compare_object_handles(self, first: int, second: int) -> bool:
        return self.proc.obj_of(first) is self.proc.obj_of(second)

    def create_lease(self, token: bytes) -> int:
        return self.proc.add_handle(KObj("lease", "lease", token))

    def read_lease(self, handle: int) -> bytes | None:
        obj = self.proc.obj_of(handle)
        return obj.data if obj.kind == "lease" and isinstance(obj.data, bytes) else None

    def process_exited(self, process: int) -> bool:
        return self._process(process, need=SYNCHRONIZE).exited
