"""`SealedMemory`: a payload that travels as a sealed memfd instead of through the socket.

Platform-neutral; the system calls are in `fdchannel._memfd` (Linux only).
The core calls `shared_message` for a frame flagged `FLAG_SHARED` and
`share_large` before a send on a channel configured with a threshold; the
public surface is `fdchannel.shm`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Self, cast

from typing_extensions import Buffer

from ._codec import SHARED_DESCRIPTOR
from ._errors import SharedMemoryRefused
from ._fdutil import close_fd, close_listed
from ._message import Message
from ._ownedfd import OwnedFd, adopt

if sys.platform == "linux":
    # Imported once here: a function-level import costs a trip through
    # importlib's Python code on every call (about 0.5 us per send).
    from . import _memfd
else:  # every use is behind a platform check
    _memfd: Any = None

if TYPE_CHECKING:
    from ._core import ChannelCore

__all__ = ["SealedMemory", "SharedMessage", "available", "share_large", "shared_message"]

_NAME: Final = "fdchannel"
_UNAVAILABLE: Final = (
    "sealed shared memory needs Linux (memfd_create with MFD_ALLOW_SEALING and file seals); "
    f"{sys.platform} has none: send the bytes in band, or use fdchannel.shm.share_above(), "
    "which falls back to in-band bytes"
)


def available() -> bool:
    """True where `SealedMemory` can be created and checked (Linux 3.17+ with memfd seals)."""
    if sys.platform == "linux":
        return _memfd.available()
    return False


class SealedMemory:
    """An immutable payload in a sealed memfd, and the fd that holds it.

    Sending: ``channel.send(mem, fds)`` sends the memfd as the message's
    payload (it counts as one fd against ``max_fds``, not against
    ``max_payload``); the object stays the caller's and can be sent again,
    to any number of channels, since nobody can change it.

    Receiving: ``msg.shared`` of a message whose payload came this way; the
    channel checked the seals and the size before handing it out.  `view`
    maps it read-only; `fileno`/`detach` give the fd to forward unmapped
    (``other.send(msg.shared)``).

    The object owns its fd until `close`, `detach` or leaving ``with``; one
    garbage-collected while open closes it with a `ResourceWarning`.  A
    view outlives `close`: the mapping goes when the last view of it is
    released.
    """

    __slots__ = ("__weakref__", "_fd", "_quiet", "_size", "_view")

    _fd: int
    _size: int
    _view: memoryview | None
    _quiet: bool

    def __init__(self) -> None:
        raise TypeError("use SealedMemory.copy(data) or SealedMemory.build(size, fill)")

    @classmethod
    def _own(cls, fd: int, size: int, quiet: bool = False) -> SealedMemory:
        """An object owning *fd*, or an error before it owns it (the stores allocate nothing)."""
        self = object.__new__(cls)
        self._size = size
        self._view = None
        self._quiet = quiet
        self._fd = fd
        return self

    @classmethod
    def _made(cls, make: Callable[..., tuple[int, int]], *args: Any, quiet: bool = False) -> SealedMemory:
        """An object owning the memfd ``make(*args, name)`` creates.

        The object comes first, owning nothing: out of memory after the
        memfd exists, nothing is left without an owner.
        """
        self = cls._own(-1, 0, quiet)
        self._fd, self._size = make(*args, _NAME)
        return self

    @classmethod
    def copy(cls, data: Buffer) -> SealedMemory:
        """A new sealed memfd holding a copy of *data*; the object is the caller's.

        Raises `NotImplementedError` where memfds or seals do not exist
        (macOS, Windows, the BSDs, Linux before 3.17), `OSError` (``EMFILE``,
        ``ENOMEM``) from the kernel, `TypeError` for a non-buffer.
        """
        if sys.platform != "linux":
            raise NotImplementedError(_UNAVAILABLE)
        return cls._made(_memfd.copy, data)

    @classmethod
    def build(cls, size: int, fill: Callable[[memoryview], object]) -> SealedMemory:
        """A new sealed memfd of *size* bytes written in place by ``fill(view)``.

        *view* is a writable memoryview of the new memory, valid only during
        the call: build large payloads there without a second copy.  The
        memory is sealed after *fill* returns; a *fill* that keeps a view
        gets `BufferError`.  Raises as `copy` does; nothing is left open on
        any error (including one *fill* raises).
        """
        if size < 0:
            raise ValueError("size must not be negative")
        if sys.platform != "linux":
            raise NotImplementedError(_UNAVAILABLE)
        return cls._made(_memfd.build, size, fill)

    @property
    def size(self) -> int:
        """The payload's size in bytes (fixed: the memfd is sealed)."""
        return self._size

    @property
    def closed(self) -> bool:
        """True once the fd was closed or detached."""
        return self._fd < 0

    def fileno(self) -> int:
        """The memfd's fd number; ownership stays here.  `ValueError` if closed."""
        if self._fd < 0:
            raise ValueError("I/O operation on a closed or detached SealedMemory")
        return self._fd

    @property
    def wire(self) -> bytes:
        """The frame payload that stands for this memory on the wire: its size."""
        return SHARED_DESCRIPTOR.pack(self._size)

    def view(self) -> memoryview:
        """A read-only memoryview of the whole payload, mapped on the first call.

        The mapping needs address space for the file's size and no memory of
        its own (the pages are the sender's page cache).  It stays valid
        after `close`, until the view is released and collected.  Raises
        `ValueError` if closed before the first call, `OSError`
        (``ENOMEM`` under ``RLIMIT_AS``) from ``mmap``.
        """
        view = self._view
        if view is None:
            fd = self.fileno()
            if sys.platform != "linux":  # pragma: no cover - never received elsewhere
                raise NotImplementedError(_UNAVAILABLE)
            view = self._view = _memfd.map_readonly(fd, self._size)
        return view

    def detach(self) -> int:
        """Give up ownership and return the fd number; the caller must close it."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the fd.  Idempotent; a view already taken stays valid."""
        fd, self._fd = self._fd, -1
        self._view = None
        if fd >= 0:
            _close_quietly(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<SealedMemory {state} size={self._size}>"

    def __reduce__(self) -> Any:
        raise TypeError("a SealedMemory cannot be pickled: send it over a Channel (channel.send(mem))")

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            _close_quietly(fd)
            if not self._quiet:
                warnings.warn(f"unclosed <SealedMemory fd={fd}>", ResourceWarning, stacklevel=2, source=self)


def _close_quietly(fd: int) -> None:
    """Close *fd*, allocating nothing (finalizers call it, maybe out of memory); EBADF ignored."""
    try:
        close_fd(fd)
    except OSError:
        pass


class SharedMessage(Message):
    """A `Message` whose payload came as a `SealedMemory` (``msg.shared``).

    ``payload`` maps it read-only on first access (a read-only memoryview);
    a receiver that only forwards ``msg.shared`` never maps anything.
    """

    __slots__ = ("_memory",)

    def __init__(self, fds: tuple[OwnedFd, ...], memory: SealedMemory) -> None:
        self._fds = fds
        self._raw = ()
        self._memory = memory

    # Typed as the base's bytes-like payload: a read-only memoryview is a
    # buffer like them (``bytes(msg.payload)`` copies it when bytes are needed).
    @property
    def payload(self) -> bytes | bytearray:
        """The payload as a read-only memoryview of the sealed memory (mapped now if not yet)."""
        return cast("bytes", self._memory.view())

    @payload.setter
    def payload(self, value: object) -> None:
        raise AttributeError("the payload of a shared-memory message is read-only")

    @property
    def shared(self) -> SealedMemory:
        """The sealed memory holding the payload; owned by this message until taken."""
        return self._memory

    def close(self) -> None:
        """Close the fds and the sealed memory still owned here (a view taken stays valid)."""
        try:
            super().close()
        finally:
            self._memory.close()

    def __repr__(self) -> str:
        return f"SharedMessage(shared={self._memory!r}, fds={self.fds!r})"


def shared_message(descriptor: bytes | bytearray | memoryview, fds: list[int]) -> Message:
    """The message of a `FLAG_SHARED` frame whose fds (owned on entry) end with the memfd.

    *fds* may be the list of a frame still queued: whatever happens, it holds
    none of them afterwards (each is the message's, or closed).  Raises
    `SharedMemoryRefused` after closing every fd when the memfd fails the
    checks.
    """
    try:
        (size,) = SHARED_DESCRIPTOR.unpack(descriptor)
        if sys.platform != "linux":
            raise SharedMemoryRefused(
                f"the peer sent a shared-memory payload, which {sys.platform} cannot check "
                "(no memfd seals); the message was dropped"
            )
        _memfd.check(fds[-1], size)
        # Takes the memfd or fails before (its stores allocate nothing).
        memory = SealedMemory._own(fds[-1], size)
    except BaseException:
        close_listed(fds)
        raise
    # From here the memfd is memory's (freed, it closes it); each other fd
    # moves into an OwnedFd as its slot is struck, so a failure (out of
    # memory) leaves each either listed here or owned, never both.
    del fds[-1]
    owners: tuple[OwnedFd, ...] = ()
    try:
        owners = adopt(fds)
        return SharedMessage(owners, memory)
    except BaseException:
        # Closed now, not when the traceback (which the channel keeps as the
        # cause of its break) lets go of this frame.
        memory.close()
        for owner in owners:
            owner.close()
        close_listed(fds)  # those not adopted yet (adopted ones are -1 here)
        raise


def share_large(channel: ChannelCore, payload: Any) -> Any:
    """*payload*, or a quiet `SealedMemory` copy of it when above the channel's threshold.

    Anything that is not a contiguous buffer goes back as it came, for the
    send to refuse with its usual error; so does everything where sealed
    memory does not exist (the in-band fallback).
    """
    threshold = channel._share_above
    if threshold is None or payload.__class__ is SealedMemory:
        return payload
    if payload.__class__ is bytes:
        size = len(payload)
    else:
        try:
            view = memoryview(payload)
        except TypeError:
            return payload
        if not view.contiguous:
            return payload
        size = view.nbytes
    if size <= threshold or not available():
        return payload
    if sys.platform != "linux":  # pragma: no cover - available() is False there
        return payload
    # Quiet: the send's own reference is its only owner, and it closes the
    # memfd when the call ends (the channel duplicates what it keeps).
    return SealedMemory._made(_memfd.copy, payload, quiet=True)
