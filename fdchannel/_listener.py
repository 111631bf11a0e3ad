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

from ._budget import Budget
from ._channel import Channel
from ._core import DEFAULT_MAX_FDS, check_holding_limits
from ._peer import (
    SUN_PATH_MAX,
    PeerCredentials,
    is_abstract,
    peer_credentials,
    peer_groups,
    unix_address,
    unix_socket,
)
from ._platform import FACTS
from ._wait import wait_ready

if TYPE_CHECKING:
    from .transports import Transport

__all__ = ["Listener", "PeerCredentials"]

log: Final = logging.getLogger("fdchannel.listener")
#: Refusals logged at most once per this many seconds (the rest are counted).
_LOG_INTERVAL: Final = 1.0
#: With a 0.0 timeout, accept() gives up after refusing this many peers.
_REFUSALS_PER_CALL: Final = 16
#: The ``frame_timeout`` a server's channels get unless told otherwise: long
#: enough for any message a live peer is writing, short enough that parked
#: fds and buffers come back.
SERVER_FRAME_TIMEOUT: Final = 30.0
_CHANNEL_OPTIONS: Final = frozenset(
    {"max_payload", "max_fds", "max_held_fds", "frame_timeout", "budget", "transport"}
)


def _with_server_limits(options: dict[str, Any]) -> Budget | None:
    """Give a server's channel *options* its holding limits' defaults; check them; return the budget."""
    options.setdefault("frame_timeout", SERVER_FRAME_TIMEOUT)
    if options.get("budget", "new") == "new":
        options["budget"] = Budget()
    # Checked now, not at the first accept: a bad limit is the caller's error.
    check_holding_limits(
        options.get("max_fds", DEFAULT_MAX_FDS),
        options.get("max_held_fds"),
        options["frame_timeout"],
        options["budget"],
    )
    budget: Budget | None = options["budget"]
    return budget


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
    and logged on the ``fdchannel.listener`` logger (at most one line per
    second; it says how many were not logged); `accept` then waits for the
    next one, within its timeout (a flood of refused peers never holds it
    longer; with a ``0.0`` timeout it raises `BlockingIOError` after 16
    refusals, so an event loop gets control back).  An exception inside
    *authorize* refuses the peer too (and is logged with its traceback).

    The listener owns its socket; each accepted `Channel` is owned by the
    caller.  *max_payload*, *max_fds*, *max_held_fds*, *frame_timeout*,
    *budget* and *transport* go to every accepted channel.  Unlike a lone
    channel's, a listener's channels get holding limits by default: a
    ``frame_timeout`` of 30 s and one `Budget` (the listener's `budget`)
    that they share, so that peers that begin messages and never finish
    them cannot fill the server's fd table or memory.
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
            **channel_options: ``max_payload``, ``max_fds``,
                ``max_held_fds``, ``frame_timeout`` (default here: 30 s;
                ``None``: no limit), ``budget`` (default here, or
                ``"new"``: a new `Budget()` that the accepted channels
                share; ``None``: none) and ``transport``, given to every
                accepted `Channel`.

        Raises:
            OSError: ``EADDRINUSE`` when a live listener holds *path*,
                ``ENAMETOOLONG`` for a path too long to connect to, or from
                the kernel (``EACCES``, ...).
            FileExistsError: *path* holds something that is not a socket
                (it is left alone).
            ValueError: *mode* is not permission bits (0o000-0o777).
            TypeError: An unknown keyword argument.
        """
        unknown = set(channel_options) - _CHANNEL_OPTIONS
        if unknown:
            raise TypeError(f"Listener() got unexpected keyword arguments {sorted(unknown)}")
        if mode & ~0o777:
            raise ValueError(f"mode must be permission bits (0o000-0o777), got {mode:#o}")
        #: The `Budget` the accepted channels share (None: none).
        self.budget: Budget | None = _with_server_limits(channel_options)
        self._channel_cls = Channel
        self._options = channel_options
        self._transport: Transport | None = channel_options.get("transport")
        self._allow_uids = None if allow_uids is None else frozenset(allow_uids)
        self._allow_gids = None if allow_gids is None else frozenset(allow_gids)
        self._authorize = authorize
        self._checks = allow_uids is not None or allow_gids is not None or authorize is not None
        self._lock = threading.Lock()
        self._closed = False
        self._released = True  # nothing to release until fully built
        self._timeout: float | None = None
        self._owner_pid = os.getpid()
        self._file_id: tuple[int, int] | None = None
        self._liveness = -1  # the flock()ed lock file of a filesystem socket
        #: Connections refused by the peer checks since the listener was created.
        self.refused = 0
        self._logged_at = -_LOG_INTERVAL
        self._unlogged = 0
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
        self._files_released = False

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
        lock, lock_existed = _take_liveness_lock(path)
        self._liveness = lock
        try:
            _clear_stale(path, lock_existed)
            return self._bind_into_place(path, mode, backlog)
        except BaseException:
            self._liveness = -1
            _drop_liveness_lock(path, lock, unlink=True)
            raise

    def _bind_into_place(self, path: str, mode: int, backlog: int) -> socket.socket:
        if sys.platform == "win32":  # pragma: no cover - Listener refuses Windows before this
            raise OSError(errno.EAFNOSUPPORT, "Listener needs AF_UNIX sockets")
        parent = os.path.dirname(os.path.abspath(path))
        tmpdir = tempfile.mkdtemp(prefix=".fdch-", dir=parent)
        sock = unix_socket()
        try:
            tmp = os.path.join(tmpdir, "s")
            bind_to = tmp
            dirfd = -1
            if len(os.fsencode(tmp)) > SUN_PATH_MAX:
                if not os.path.isdir("/proc/self/fd"):
                    raise OSError(
                        errno.ENAMETOOLONG,
                        f"AF_UNIX path too long to bind through a temporary name (at most {SUN_PATH_MAX} "
                        f"bytes with its directory here; {len(os.fsencode(tmp))} needed): use a shorter "
                        "path",
                        path,
                    )
                # The temporary name is longer than *path*; reach it through
                # a short /proc alias of the directory instead (Linux).
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
            if self._liveness >= 0:
                # The lock file names the socket file it guards.
                os.ftruncate(self._liveness, 0)
                os.pwrite(self._liveness, f"{st.st_dev} {st.st_ino}\n".encode(), 0)
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
            deadline = None if not timeout else time.monotonic() + timeout
            refused = 0
            while True:
                if refused:
                    # A flood of refused peers must not hold accept() past
                    # its timeout, nor keep a 0.0-timeout caller (an event
                    # loop) for more than a few of them.
                    if self._timeout == 0.0 and refused >= _REFUSALS_PER_CALL:
                        raise BlockingIOError(errno.EAGAIN, "only refused peers were waiting")
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError("timed out (only refused peers arrived)")
                sock = self._accept_one(deadline)
                if self._checks and not self._passes(sock):
                    refused += 1
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

    def _passes(self, sock: socket.socket) -> bool:
        """Check the peer of accepted *sock*; a refused one is closed, counted and logged."""
        try:
            creds = peer_credentials(sock)
        except OSError as exc:
            self._refuse(sock, None, f"its credentials could not be read ({exc})")
            return False
        except BaseException as exc:
            sock.close()
            if isinstance(exc, NotImplementedError):
                raise NotImplementedError(
                    f"{exc}: this Listener checks peers (allow_uids, allow_gids or "
                    "authorize) and cannot; the connection was closed"
                ) from exc
            raise
        try:
            reason = self._check(creds, sock)
        except BaseException:
            # authorize() lets through what is not an Exception (a signal
            # handler's KeyboardInterrupt, SystemExit): the peer goes too.
            sock.close()
            raise
        if reason is not None:
            self._refuse(sock, creds, reason)
            return False
        return True

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
        now = time.monotonic()
        with self._lock:
            self.refused += 1
            # At most one log line per second: a flood of refused peers
            # would otherwise cost more in logging than in refusing.
            quiet, self._unlogged = self._unlogged, self._unlogged + 1
            if now - self._logged_at < _LOG_INTERVAL:
                return
            self._logged_at, self._unlogged = now, 0
        who = "a peer" if creds is None else f"pid={creds.pid} uid={creds.uid} gid={creds.gid}"
        if quiet:
            log.warning(
                "refused a connection on %r from %s: %s (and %d more since the last such line)",
                self._address,
                who,
                reason,
                quiet,
            )
        else:
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
        # Each step may be cut short by a signal handler's error: another
        # close() (or the finalizer's) then finishes what is left.
        counted = False
        try:
            with self._lock:
                if self._released:
                    return
                self._closed = True
                # Counted as a waiter until done: an accept() leaving meanwhile
                # must not release the wake-up fd this writes to, nor the
                # liveness lock _release_file reads.
                self._waiters += 1
                counted = True
            # The files go first, while the liveness lock is still held: a
            # listener starting now sees this one live or finds nothing there.
            self._release_file()
            with self._lock:
                busy = self._waiters > 1
            if busy:
                os.write(self._wake_w, b"\0\0\0\0\0\0\0\1")
        finally:
            if counted:
                with self._lock:
                    self._waiters -= 1
                    last = not self._waiters
                if last:
                    self._release()

    def _release(self) -> None:
        # Under the lock: one thread releases.  Each number is struck before
        # its close (no point between where a handler runs), so a release cut
        # short goes on where it stopped when called again.
        with self._lock:
            if self._released:
                return
            if not self._files_released:
                self._release_file()  # (a close() cut short before it: files first still)
            self._sock.close()
            r = self._wake_r
            if self._wake_w == r:
                self._wake_w = -1  # one fd (an eventfd): struck once, with _wake_r
            self._wake_r = -1
            if r >= 0:
                os.close(r)
            w, self._wake_w = self._wake_w, -1
            if w >= 0:
                os.close(w)
            lock, self._liveness = self._liveness, -1
            if lock >= 0:
                os.close(lock)
            self._released = True

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
        if self._liveness >= 0:
            _drop_liveness_lock(path, self._liveness, unlink=True, close=False)
        self._files_released = True

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


def _lock_path(path: str) -> str:
    return path + ".lock"


def _take_liveness_lock(path: str) -> tuple[int, bool]:
    """Lock *path*'s lock file for a new listener: return (fd, whether the file was there).

    A live `Listener` holds an exclusive ``flock`` on ``<path>.lock`` for as
    long as any process holds its socket (the lock belongs to the open file,
    which forked children share), and the file names the socket file it
    guards; so liveness never depends on how the kernel answers a probe
    (macOS and the BSDs refuse a connection to a listener with a full
    backlog exactly as to a dead one).  A held lock whose socket file is no
    longer at *path* (a successor removed it) is stale for *path* and is
    replaced.  Raises `OSError` ``EADDRINUSE`` when a live listener is there.
    """
    if sys.platform == "win32":  # pragma: no cover - Listener refuses Windows before this
        raise OSError(errno.EAFNOSUPPORT, "Listener needs AF_UNIX sockets")
    import fcntl

    lock_path = _lock_path(path)
    for _ in range(16):
        created = True
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            created = False
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                continue  # a closing listener removed it meanwhile
        try:
            held = os.fstat(fd)
            if not stat.S_ISREG(held.st_mode):
                raise FileExistsError(errno.EEXIST, "exists and is not a lock file; refusing it", lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not _guards_another_file(fd, path):
                    raise OSError(
                        errno.EADDRINUSE,
                        f"a live socket is listening there (its Listener holds {lock_path})",
                        path,
                    ) from None
                # Its listener lives on without a file at *path*: the lock
                # is no longer about *path*.
                _unlink_if_same(lock_path, held)
                os.close(fd)
                continue
        except BaseException:
            os.close(fd)
            raise
        # Locked, but maybe a file a closing listener unlinked after we
        # opened it: only the file at the path counts.
        if _unlink_if_same(lock_path, held, unlink=False):
            return fd, not created
        os.close(fd)
    raise OSError(errno.EADDRINUSE, f"{lock_path} keeps being replaced", path)


def _guards_another_file(fd: int, path: str) -> bool:
    """True if the lock file *fd* names a socket file other than the one at *path*."""
    if sys.platform == "win32":  # pragma: no cover - Listener refuses Windows before this
        raise OSError(errno.EAFNOSUPPORT, "Listener needs AF_UNIX sockets")
    recorded = os.pread(fd, 64, 0).split()
    if len(recorded) != 2:
        return False  # its listener is still setting up: live
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    return (str(st.st_dev).encode(), str(st.st_ino).encode()) != tuple(recorded)


def _unlink_if_same(lock_path: str, held: os.stat_result, *, unlink: bool = True) -> bool:
    """True if *lock_path* is the file *held* is about (and unlink it when *unlink*)."""
    try:
        now = os.lstat(lock_path)
    except FileNotFoundError:
        return False
    if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        return False
    if unlink:
        os.unlink(lock_path)
    return True


def _drop_liveness_lock(path: str, fd: int, *, unlink: bool, close: bool = True) -> None:
    """Remove the lock file if it is still *fd*'s (done while holding it), and close *fd*."""
    try:
        if unlink:
            try:
                _unlink_if_same(_lock_path(path), os.fstat(fd))
            except FileNotFoundError:
                pass
    finally:
        if close:
            os.close(fd)


def _clear_stale(path: str, lock_existed: bool) -> None:
    """Remove *path* if it is a socket nobody listens on; refuse anything else there.

    Called with *path*'s lock file held, so no fdchannel `Listener` is live
    there; a socket another program made is probed.  A refused probe means
    "dead" only where the kernel tells a full backlog apart (Linux), or when
    an fdchannel listener's lock file was left behind (it made the socket
    and every process holding it is gone).
    """
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
        if not (FACTS.refused_means_dead or lock_existed):
            raise OSError(
                errno.EADDRINUSE,
                f"a socket is there that refused a connection, which on {FACTS.label} a live listener "
                "with a full backlog answers too, and it is not an fdchannel Listener's: remove it "
                "if nothing listens there",
                path,
            )
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
