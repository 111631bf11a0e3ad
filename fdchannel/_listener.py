"""`Listener`: a named AF_UNIX endpoint that accepts channels; `PeerCredentials`."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any, Final, Self

from ._channel import Channel
from ._fdutil import close_all
from ._peer import (
    SUN_PATH_MAX,
    PeerCredentials,
    is_abstract,
    peer_credentials,
    peer_groups,
    unix_address,
    unix_socket,
)
from ._wait import wait_ready

if TYPE_CHECKING:
    from .transports import Transport

__all__ = ["Listener", "PeerCredentials"]

log: Final = logging.getLogger("fdchannel.listener")


class Listener:
    """A listening AF_UNIX stream socket that accepts `Channel` connections.

    *path* is a filesystem path, or a Linux abstract name written with a
    leading NUL (``"\\0name"``, as the `socket` module spells it).  A
    filesystem socket is created with permission bits *mode* exactly
    (whatever the umask), without any moment where it is connectable with
    other bits; a stale socket file left by a dead listener is replaced, a
    live one is not (`OSError` ``EADDRINUSE``) and anything that is not a
    socket is never touched (`FileExistsError`).  `close` removes the file
    if it is still the one this listener created.  Abstract names have no
    file and no permissions: *mode* is ignored and anyone in the network
    namespace may connect, so filter peers with *allow_uids*/*authorize*.

    Peers are checked before anything is read from them: a peer passes when
    its uid is in *allow_uids* (if given), its primary gid or one of its
    supplementary groups in *allow_gids* (if given; supplementary groups
    are known on Linux 4.13+) and *authorize* (if given) returns true for its
    `PeerCredentials`.  A refused connection is closed, counted in `refused`
    and logged on the ``fdchannel.listener`` logger; `accept` then waits for
    the next one.  An exception inside *authorize* refuses the peer too (and
    is logged with its traceback).

    The listener owns its socket; each accepted `Channel` is owned by the
    caller.  *max_payload*, *max_fds* and *transport* go to every accepted
    channel.
    """

    def __init__(
        self,
        path: str | bytes | os.PathLike[Any],
        *,
        backlog: int = 128,
        mode: int = 0o600,
        allow_uids: Collection[int] | None = None,
        allow_gids: Collection[int] | None = None,
        authorize: Callable[[PeerCredentials], object] | None = None,
        **channel_options: Any,
    ) -> None:
        """Bind and listen.

        Args:
            path: A filesystem path, or ``"\\0name"`` for a Linux abstract
                name.
            backlog: The listen queue's length.
            mode: The socket file's permission bits, set exactly whatever
                the umask (``0o600``: the owner only); ignored for abstract
                names.
            allow_uids: Accept only peers with one of these uids.
            allow_gids: Accept only peers whose primary or a supplementary
                group is one of these.
            authorize: Called with each peer's `PeerCredentials`; a false
                result (or an exception) refuses the peer.
            **channel_options: ``max_payload``, ``max_fds`` and
                ``transport``, given to every accepted `Channel`.

        Raises:
            OSError: ``EADDRINUSE`` when a live listener holds *path*,
                ``ENAMETOOLONG`` for a path too long to connect to, or from
                the kernel (``EACCES``, ...).
            FileExistsError: *path* holds something that is not a socket
                (it is left alone).
            ValueError: *mode* is not permission bits (0o000-0o777).
            TypeError: An unknown keyword argument.
        """
        unknown = set(channel_options) - {"max_payload", "max_fds", "transport"}
        if unknown:
            raise TypeError(f"Listener() got unexpected keyword arguments {sorted(unknown)}")
        if mode & ~0o777:
            raise ValueError(f"mode must be permission bits (0o000-0o777), got {mode:#o}")
        self._channel_cls = Channel
        self._options = channel_options
        self._transport: Transport | None = channel_options.get("transport")
        self._allow_uids = None if allow_uids is None else frozenset(allow_uids)
        self._allow_gids = None if allow_gids is None else frozenset(allow_gids)
        self._authorize = authorize
        self._lock = threading.Lock()
        self._closed = False
        self._released = True  # nothing to release until fully built
        self._timeout: float | None = None
        self._owner_pid = os.getpid()
        self._file_id: tuple[int, int] | None = None
        #: Connections refused by the peer checks since the listener was created.
        self.refused = 0
        address = unix_address(path)
        self._address = address
        if is_abstract(address):
            sock = unix_socket()
            try:
                sock.bind(address)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
        else:
            if len(os.fsencode(address)) > SUN_PATH_MAX:
                raise OSError(errno.ENAMETOOLONG, "AF_UNIX path too long: clients could not connect", address)
            sock = self._create_file_socket(address, mode, backlog)
        # accept() waits in poll() on the socket and on a wake-up fd that
        # close() signals: closing an fd does not wake a thread blocked on it,
        # and shutdown() would also stop copies held by other processes.
        sock.setblocking(False)
        self._sock = sock
        try:
            self._wake_r, self._wake_w = _wakeup_fds()
        except BaseException:
            self._release_file()
            sock.close()
            raise
        self._waiters = 0
        self._released = False

    @property
    def path(self) -> str | bytes:
        """The address given to the constructor (abstract names keep their NUL)."""
        return self._address

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    def _create_file_socket(self, path: str | bytes, mode: int, backlog: int) -> socket.socket:
        # The socket is bound inside a fresh directory only we can enter
        # (mkdtemp makes it 0o700), given its final mode there and then
        # hard-linked into place; so no one can connect to it until it has
        # *mode*, and the process-wide umask is never touched (changing it
        # would race with other threads creating files).  link() unlike
        # rename() never replaces what another process put at *path*.
        path = os.fsdecode(path)
        _clear_stale(path)
        parent = os.path.dirname(os.path.abspath(path))
        tmpdir = tempfile.mkdtemp(prefix=".fdch-", dir=parent)
        sock = unix_socket()
        try:
            tmp = os.path.join(tmpdir, "s")
            bind_to = tmp
            dirfd = -1
            if sys.platform == "linux" and len(os.fsencode(tmp)) > SUN_PATH_MAX:
                # The temporary name is longer than *path*; reach it through
                # a short /proc alias of the directory instead.
                dirfd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                bind_to = f"/proc/self/fd/{dirfd}/s"
            try:
                sock.bind(bind_to)
            finally:
                if dirfd >= 0:
                    os.close(dirfd)
            os.chmod(tmp, mode)
            sock.listen(backlog)
            os.link(tmp, path)
            st = os.lstat(path)
            self._file_id = (st.st_dev, st.st_ino)
        except FileExistsError as exc:
            sock.close()
            raise OSError(errno.EADDRINUSE, f"{path}: another process created it meanwhile", path) from exc
        except BaseException:
            sock.close()
            raise
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return sock

    # -- accepting ----------------------------------------------------------------

    def fileno(self) -> int:
        """The listening socket's fd, for `select`/`poll`; ownership stays here."""
        return self._sock.fileno()

    def gettimeout(self) -> float | None:
        """The timeout of `accept`, as `socket.socket.gettimeout`."""
        return self._timeout

    def settimeout(self, timeout: float | None) -> None:
        """Bound each `accept` call, as `socket.socket.settimeout`.

        Args:
            timeout: ``None`` blocks, ``0.0`` never waits, else seconds.

        Raises:
            ValueError: *timeout* is negative.
        """
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be non-negative or None")
        self._timeout = timeout

    def accept(self) -> Channel:
        """Wait for a peer that passes the checks and return its channel (caller-owned).

        Refused peers are closed, counted and logged, and waiting goes on.

        Returns:
            The new channel to the peer, owned by the caller.

        Raises:
            TimeoutError: No accepted peer arrived within the timeout.
            BlockingIOError: With a ``0.0`` timeout, no accepted peer was
                waiting.
            ValueError: The listener is or gets closed (from any thread).
            OSError: From the kernel (such as ``EMFILE``).
        """
        with self._lock:
            if self._closed:
                raise ValueError("accept() on a closed Listener")
            self._waiters += 1
        try:
            timeout = self._timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                sock = self._accept_one(deadline)
                try:
                    creds = peer_credentials(sock)
                except OSError as exc:
                    self._refuse(sock, None, f"its credentials could not be read ({exc})")
                    continue
                reason = self._check(creds, sock)
                if reason is not None:
                    self._refuse(sock, creds, reason)
                    continue
                try:
                    sock.setblocking(True)
                    return self._channel_cls(sock, **self._options)
                except BaseException:
                    sock.close()
                    raise
        finally:
            with self._lock:
                self._waiters -= 1
                last = self._closed and not self._waiters
            if last:
                self._release()

    def _accept_one(self, deadline: float | None) -> socket.socket:
        listener = self._sock
        while True:
            if self._closed:
                raise ValueError("the Listener was closed")
            try:
                sock, _ = listener.accept()
                return sock
            except BlockingIOError:
                if self._timeout == 0.0:
                    raise
            if not wait_ready((listener.fileno(), self._wake_r), deadline=deadline):
                raise TimeoutError("timed out")

    def _check(self, creds: PeerCredentials, sock: socket.socket) -> str | None:
        if self._allow_uids is not None and creds.uid not in self._allow_uids:
            return "its uid is not allowed"
        if (
            self._allow_gids is not None
            and creds.gid not in self._allow_gids
            and self._allow_gids.isdisjoint(peer_groups(sock))
        ):
            return "its gid is not allowed"
        if self._authorize is not None:
            try:
                if not self._authorize(creds):
                    return "authorize() refused it"
            except Exception:
                log.exception("authorize() raised for %s on %r; refusing the peer", creds, self._address)
                return "authorize() raised"
        return None

    def _refuse(self, sock: socket.socket, creds: PeerCredentials | None, reason: str) -> None:
        sock.close()
        with self._lock:
            self.refused += 1
        who = "a peer" if creds is None else f"pid={creds.pid} uid={creds.uid} gid={creds.gid}"
        log.warning("refused a connection on %r from %s: %s", self._address, who, reason)

    def __iter__(self) -> Iterator[Channel]:
        """Yield accepted channels until the listener is closed."""
        while True:
            try:
                yield self.accept()
            except ValueError:
                if self._closed:
                    return
                raise

    # -- closing --------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, close the socket and remove its file.  Idempotent.

        The file is removed only by the process that created the listener
        (a forked child's copy leaves it alone) and only if it is still the
        same socket file (not one a successor put there).  Threads blocked
        in `accept` wake up with `ValueError`; the socket is closed when the
        last of them has left.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = self._waiters
        if busy:
            os.write(self._wake_w, b"\0\0\0\0\0\0\0\1")
        else:
            self._release()
        self._release_file()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._sock.close()
        close_all({self._wake_r, self._wake_w})

    def _release_file(self) -> None:
        if self._file_id is None or os.getpid() != self._owner_pid:
            return
        path = os.fsdecode(self._address)
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._file_id:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return f"<Listener {self._address!r} {state}>"


def _wakeup_fds() -> tuple[int, int]:
    """A non-blocking, close-on-exec (read, write) pair: one eventfd where there is one."""
    if sys.platform == "linux" and hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return fd, fd
    if sys.platform == "win32":  # pragma: no cover - Listener refuses Windows before this
        raise OSError(errno.EAFNOSUPPORT, "Listener needs AF_UNIX sockets")
    r, w = os.pipe()
    os.set_blocking(w, False)
    return r, w


def _clear_stale(path: str) -> None:
    """Remove *path* if it is a socket nobody listens on; refuse anything else there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; refusing to replace it", path)
    probe = unix_socket()
    try:
        # Non-blocking, so a live listener with a full backlog answers
        # EAGAIN instead of making us wait.
        probe.setblocking(False)
        err = probe.connect_ex(path)
    finally:
        probe.close()
    if err == errno.ECONNREFUSED:
        try:
            # Only the file probed: a listener that replaced it meanwhile
            # keeps its socket (the window left is that of two syscalls).
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
        except FileNotFoundError:
            pass
        return
    if err == errno.ENOENT:
        return
    if err in (0, errno.EAGAIN, errno.EINPROGRESS, errno.EPROTOTYPE):
        raise OSError(errno.EADDRINUSE, "a live socket is listening there", path)
    raise OSError(err, f"cannot tell whether the socket there is live: {os.strerror(err)}", path)
