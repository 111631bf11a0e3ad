"""`OwnedFd`: one received file descriptor and the duty to close it."""

from __future__ import annotations

import errno
import os
import socket
import sys
import warnings
from collections.abc import Iterable
from typing import IO, Any, Self

from ._fdutil import SocketHandle, close_fd

__all__ = ["OwnedFd", "adopt", "adopt_all", "fileno_of"]


def fileno_of(obj: int | Any) -> int:
    """Return the fd number of an int or of an object with ``fileno()``.

    Raises `TypeError` for anything else and `ValueError` for a negative
    number (which is how closed Python file objects and sockets report).
    On Windows a socket object's number comes back as a `SocketHandle`
    (SOCKETs and CRT fds are numbered apart there).
    """
    if obj.__class__ is bool:
        # True is 1: stdout would leave silently.
        raise TypeError(f"expected an fd, got {obj!r} (a bool)")
    if isinstance(obj, int):
        fd = obj
    elif sys.platform == "win32" and isinstance(obj, socket.socket):
        fd = SocketHandle(obj.fileno())
    else:
        try:
            get = obj.fileno
        except AttributeError:
            raise TypeError(
                f"expected an int fd or an object with fileno(), got {type(obj).__name__}"
            ) from None
        fd = get()
        if not isinstance(fd, int):
            raise TypeError(f"{type(obj).__name__}.fileno() returned {type(fd).__name__}")
    if not 0 <= fd <= 2**31 - 1:
        raise ValueError(f"invalid file descriptor {fd}" + (" (closed?)" if fd < 0 else ""))
    return fd


class OwnedFd:
    """An open file descriptor owned by this object.

    Exactly one owner at a time: this object until it is closed, detached or
    converted (`open`, `socket`); after that it owns nothing and every method
    but `close` raises `ValueError`.  Received fds are non-inheritable
    (close-on-exec).

    An `OwnedFd` garbage-collected while still open closes its fd and emits
    `ResourceWarning`, like `socket.socket`.

    On Windows it holds either a CRT fd or a Winsock SOCKET (`is_socket`);
    each is closed, duplicated and converted its own way.
    """

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, fd: int) -> None:
        """Take ownership of *fd*.

        Args:
            fd: An open fd the caller will no longer close.  (On Windows the
                channel itself wraps each received SOCKET, which is not a
                CRT fd.)
        """
        self._fd = fd

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<OwnedFd {state}>"

    def _check(self) -> int:
        fd = self._fd
        if fd < 0:
            raise ValueError("I/O operation on a closed, detached or converted OwnedFd")
        return fd

    @property
    def is_socket(self) -> bool:
        """True when this holds a Windows SOCKET rather than an fd (never on POSIX, where
        a socket is an fd like any other)."""
        return self._fd.__class__ is SocketHandle

    @property
    def closed(self) -> bool:
        """True once the fd was closed, detached or converted."""
        return self._fd < 0

    def fileno(self) -> int:
        """Return the fd number (a SOCKET value on Windows if `is_socket`); ownership stays here.

        Raises:
            ValueError: Closed, detached or converted.
        """
        return self._check()

    def close(self) -> None:
        """Close the fd.  Idempotent; a no-op after `detach` or a conversion."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            if fd.__class__ is int:
                os.close(fd)
            else:
                close_fd(fd)

    def detach(self) -> int:
        """Give up ownership and return the fd number; the caller must close it.

        Raises:
            ValueError: Closed, detached or converted already.
        """
        fd = self._check()
        self._fd = -1
        return fd

    def dup(self) -> OwnedFd:
        """Return a new, independently owned, non-inheritable duplicate.

        The duplicate names the same open file (same offset, same flags).

        Raises:
            ValueError: Closed, detached or converted.
            OSError: From ``dup`` (``EMFILE``, ...).
        """
        fd = self._check()
        if fd.__class__ is SocketHandle:
            s = socket.socket(fileno=fd)
            try:
                return OwnedFd(SocketHandle(s.dup().detach()))
            finally:
                s.detach()
        return OwnedFd(os.dup(fd))

    def open(self, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        """Wrap the fd in a file object; ownership moves to the file object.

        The file shares its offset with every other fd of the same open
        file, the sender's included.

        Args:
            mode: As for the builtin `open` (``"rb"``, ``"w"``, ...).
            *args: The builtin `open`'s other arguments after *file*
                (``buffering``, ``encoding``, ...).
            **kwargs: Likewise, by name.

        Returns:
            The file object, which owns the fd from now on.

        Raises:
            ValueError: ``closefd=False`` (the fd must have exactly one
                owner), or this object is closed, detached or converted.
            Exception: Whatever `open` raises for invalid arguments; this
                object then still owns the fd.  (Out of memory once the
                arguments were found valid: still owned here if `open`
                failed before it took the fd, closed if after; never
                closed twice.)
        """
        fd = self._check()
        if fd.__class__ is SocketHandle:
            raise ValueError("a Windows socket cannot be opened as a file; use socket()")
        if not kwargs.pop("closefd", True) or (len(args) >= 5 and not args[4]):
            raise ValueError("closefd=False would leave the fd without an owner; use dup()")
        if len(args) > 6:
            raise TypeError(f"open() takes at most 8 arguments ({len(args) + 2} given)")
        # closefd is known true (or not given) by now: the trial below passes
        # it by name.  open() ignores an opener when given an fd: so do we.
        kwargs.pop("opener", None)
        args = args[:4]
        # open() closes a raw fd it has already wrapped when a later layer
        # fails (a bad encoding, say), which would leave us owning a closed
        # number.  A trial run that never owns the fd finds such errors first.
        open_: Any = open  # mode is a runtime str: no overload to pick
        _discard(open_(fd, mode, *args, closefd=False, **kwargs))
        # Should the real one fail all the same (out of memory), open() has
        # closed the fd if it had wrapped it already, and not if it failed
        # before: which one, the fd itself says (closed, or still the same
        # file).  Let go first, so that no path closes it twice.
        before = os.fstat(fd)
        self._fd = -1
        try:
            f: IO[Any] = open_(fd, mode, *args, **kwargs)
        except BaseException:
            if _same_file(fd, before):
                self._fd = fd  # open() failed before it took the fd: still ours
            raise
        return f

    def socket(self) -> socket.socket:
        """Wrap the fd in a `socket.socket`; ownership moves to the socket.

        Family, type and protocol are read from the kernel.  Whether the
        socket blocks lives in the open file, so it travels with the fd: a
        socket the sender had made non-blocking (or given a timeout) arrives
        non-blocking, and the returned object reports that flag
        (``gettimeout()`` is ``0.0``; ``settimeout``/``setblocking`` change it
        for the sender's copy too; see
        [a received socket's blocking mode][a-received-sockets-blocking-mode]).
        On Windows the mode cannot be read back and the object reports
        blocking.

        Returns:
            The socket object, which owns the fd from now on.

        Raises:
            OSError: ``ENOTSOCK`` if the fd is not a socket; this object then
                still owns it.
            ValueError: Closed, detached or converted.
        """
        fd = self._check()
        if sys.platform == "win32" and fd.__class__ is not SocketHandle:
            # A CRT fd: a SOCKET that happens to have the same number is another object.
            raise OSError(errno.ENOTSOCK, f"OwnedFd {fd} holds a CRT fd, not a socket")
        s = socket.socket(fileno=int(fd))
        self._fd = -1
        if sys.platform != "win32" and not os.get_blocking(s.fileno()):
            # socket.socket(fileno=) assumes blocking whatever the file says;
            # a wrong None makes accept()/recv() raise BlockingIOError at once.
            s.settimeout(0.0)
        return s

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        # A bare number means another file in another process.
        raise TypeError(
            "an OwnedFd cannot be pickled: its number means nothing in another process.  Send it "
            "over a Channel instead (multiprocessing.Process can take the Channel as an argument)"
        )

    def __del__(self) -> None:
        try:
            fd = self._fd
        except AttributeError:  # __init__ never ran
            return
        if fd >= 0:
            # Close first: with -W error::ResourceWarning the warning raises,
            # and a signal handler's error here must not leave the fd open.
            try:
                close_fd(fd)
            finally:
                self._fd = -1
                warnings.warn(f"unclosed <OwnedFd fd={fd}>", ResourceWarning, stacklevel=2, source=self)


def _same_file(fd: int, before: os.stat_result) -> bool:
    """True if *fd* is open and names the file *before* describes."""
    try:
        now = os.fstat(fd)
    except OSError:
        return False
    except MemoryError:
        # Out of memory still: whether it is open, at least (a bool costs
        # nothing), rather than leave an fd nobody owns.
        try:
            os.get_inheritable(fd)
        except BaseException:
            return False
        return True
    return (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino)


def _discard(probe: IO[Any]) -> None:
    """Drop a closefd=False wrapper without touching the fd or its offset."""
    raw: Any = probe
    # Detach layer by layer so no flush or close reaches the fd.
    while hasattr(raw, "detach"):
        try:
            raw = raw.detach()
        except ValueError:  # unbuffered layer already reached
            break
    raw.close()  # FileIO with closefd=False: closes nothing


_new = object.__new__


def adopt(fds: list[int]) -> tuple[OwnedFd, ...]:
    """Move every fd of *fds* into an `OwnedFd` of its own; each slot of *fds* becomes -1.

    Each fd moves in two stores with no point between them where CPython
    runs a signal handler, so an error a handler raises anywhere in here
    leaves every fd listed exactly once: still in *fds* (its holder closes
    it) or in an `OwnedFd` (which closes it when dropped), never both.
    """
    owners: list[OwnedFd] = []
    for i in range(len(fds)):
        owner = _new(OwnedFd)
        owner._fd = fds[i]
        fds[i] = -1
        owners.append(owner)
    return tuple(owners)


def adopt_all(lists: Iterable[list[int]]) -> list[OwnedFd]:
    """`adopt` for several lists at once, each distinct fd number once; negative slots are skipped.

    A number listed again (the same fd in two lists, or twice in one) is
    struck from the later slot, so no two owners ever close it.
    """
    owners: list[OwnedFd] = []
    seen: set[int] = set()
    for fds in lists:
        for i in range(len(fds)):
            fd = fds[i]
            if fd < 0:
                continue
            if fd in seen:
                fds[i] = -1
                continue
            owner = _new(OwnedFd)
            owner._fd = fd
            fds[i] = -1
            seen.add(fd)
            owners.append(owner)
    return owners
