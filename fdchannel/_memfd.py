"""The Linux half of sealed shared memory: create, seal, check and map memfds.

Imported only on Linux (`fdchannel._shared` holds the platform-neutral
`SealedMemory`).  The receiver's checks are the reason the feature is safe:
a file the sender can still shrink would raise SIGBUS in a receiver that
reads a page past the new end; one it can still write could change bytes
after the receiver validated them.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import sys
from collections.abc import Callable
from typing import Final

from typing_extensions import Buffer

from ._errors import SharedMemoryRefused
from ._interrupt import raised_in_signal_handler

assert sys.platform == "linux"  # the rest is Linux only; mypy skips it elsewhere too

__all__ = ["SEALS", "available", "build", "check", "copy", "map_readonly"]

#: Every seal a receiver requires: no shrinking (SIGBUS), no growing, no
#: writing (the bytes cannot change after they were checked) and no seal
#: changes.
SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_SEAL_NAMES: Final = (
    (fcntl.F_SEAL_SHRINK, "F_SEAL_SHRINK"),
    (fcntl.F_SEAL_GROW, "F_SEAL_GROW"),
    (fcntl.F_SEAL_WRITE, "F_SEAL_WRITE"),
    (fcntl.F_SEAL_SEAL, "F_SEAL_SEAL"),
)
_WRITE_CHUNK: Final = 1 << 30

_available: bool | None = None


def _create(name: str) -> int:
    try:
        return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL):
            # Kernels before 3.17 (no memfd_create) or sandboxes that filter it.
            raise NotImplementedError(
                f"this kernel cannot create sealable memfds ({exc.strerror}): send the bytes in band"
            ) from exc
        raise


def available() -> bool:
    """True if this kernel creates memfds and seals them as `fdchannel.shm` needs."""
    global _available
    if _available is None:
        # A signal handler's error is not the kernel's answer: raised, not
        # kept as "unavailable" for the life of the process.
        try:
            fd = _create("fdchannel-probe")
        except (NotImplementedError, OSError) as exc:
            if raised_in_signal_handler(exc):
                raise
            _available = False
        else:
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
                _available = True
            except OSError as exc:
                if raised_in_signal_handler(exc):
                    raise
                _available = False
            finally:
                os.close(fd)
    return _available


def _seal(fd: int) -> None:
    # All four in one call: F_SEAL_SEAL set together with the others still
    # lets them in, and no window exists with some but not all.
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)


def copy(data: Buffer, name: str) -> tuple[int, int]:
    """A new sealed memfd holding a copy of *data*: ``(fd, size)``, the fd the caller's."""
    view = memoryview(data).cast("B")
    size = view.nbytes
    fd = _create(name)
    try:
        if size:
            os.ftruncate(fd, size)
        done = 0
        while done < size:
            done += os.pwrite(fd, view[done : done + _WRITE_CHUNK], done)
        _seal(fd)
        made = fd, size  # inside: this tuple is an allocation too
    except BaseException:
        os.close(fd)
        raise
    return made


def build(size: int, fill: Callable[[memoryview], object], name: str) -> tuple[int, int]:
    """A new sealed memfd of *size* bytes that *fill* wrote through a writable view."""
    fd = _create(name)
    try:
        if size:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                with memoryview(mapping) as view:
                    fill(view)
            finally:
                try:
                    mapping.close()
                except BufferError:
                    # The writable mapping would stay and F_SEAL_WRITE fail
                    # with EBUSY: say whose view it is.
                    raise BufferError(
                        "SealedMemory.build(): fill() kept a view of the buffer; release it before "
                        "returning (the memory cannot be sealed while writable views exist)"
                    ) from None
        _seal(fd)
        made = fd, size  # inside: this tuple is an allocation too
    except BaseException:
        os.close(fd)
        raise
    return made


def check(fd: int, size: int) -> None:
    """Raise `SharedMemoryRefused` unless *fd* is a memfd of *size* bytes with every seal in `SEALS`."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        if raised_in_signal_handler(exc):
            raise  # a handler's TimeoutError, not the kernel's answer: the caller's to handle
        raise SharedMemoryRefused(
            f"the shared-memory payload is not a memfd (F_GET_SEALS failed: {exc.strerror})"
        ) from None
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        if raised_in_signal_handler(exc):
            raise
        target = None  # no /proc: F_GET_SEALS answered, so it is a shmem file
    if target is not None and not target.startswith("/memfd:"):
        raise SharedMemoryRefused(f"the shared-memory payload is not a memfd but {target!r}")
    missing = [name for bit, name in _SEAL_NAMES if not seals & bit]
    if missing:
        raise SharedMemoryRefused(
            f"the shared-memory payload is not sealed against change (missing {', '.join(missing)}): "
            "the sender could still shrink or rewrite it"
        )
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise SharedMemoryRefused(
            f"the shared-memory payload holds {st.st_size} bytes but the message declared {size}"
        )


def map_readonly(fd: int, size: int) -> memoryview:
    """A read-only view of the whole sealed memfd (its mapping lives as long as the view)."""
    if not size:
        return memoryview(b"")
    # ACCESS_READ: PROT_READ and a buffer that is read-only for Python too.
    mapping = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    return memoryview(mapping)
