"""Socket I/O with ancillary data: ``sendmsg``/``recvmsg_into`` and SCM_RIGHTS.

The one module that names POSIX-only parts of the socket API (``sendmsg``,
``SCM_RIGHTS``, ``MSG_CTRUNC``, ``MSG_CMSG_CLOEXEC``); `fdchannel._sockio`
imports it only where they exist.  Each function does one system call and
never waits: the channels decide how to wait.  `fdchannel._streamio` has the
same functions for streams that carry no fds.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

from typing_extensions import Buffer

from ._codec import SCM_MAX_FD, Decoder
from ._errors import TruncatedControlData
from ._fdutil import close_all
from ._platform import FACTS, Facts

# Importers check `fdchannel._sockio.HAVE_ANCILLARY` first; this also tells
# mypy --platform win32 that nothing below exists there.
assert sys.platform != "win32"

__all__ = [
    "ANCBUF",
    "DONTWAIT",
    "RECV_FLAGS",
    "SEND_FLAGS",
    "ancbuf_size",
    "ancillary_fds",
    "fds_from_ancillary",
    "finish_read",
    "landed_fds",
    "read",
    "recv_failure",
    "rights",
    "truncated",
    "truncation_error",
    "write",
]

_SOL_SOCKET: Final = socket.SOL_SOCKET
_SCM_RIGHTS: Final = socket.SCM_RIGHTS
# Plain ints: combining the socket module's IntFlag members costs an enum
# operation each time, on the hot path.
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
#: Makes one call non-blocking whatever the socket's mode (0 where absent).
DONTWAIT: Final = int(getattr(socket, "MSG_DONTWAIT", 0))
#: Never raise SIGPIPE: a vanished peer is a BrokenPipeError, not a dead process.
SEND_FLAGS: Final = int(getattr(socket, "MSG_NOSIGNAL", 0))
#: Received fds are close-on-exec atomically where the kernel can (Linux,
#: FreeBSD, NetBSD, OpenBSD); macOS has no MSG_CMSG_CLOEXEC, so there each fd
#: is marked right after the read (`ancillary_fds`), not atomically.
RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))


def ancbuf_size(facts: Facts) -> int:
    """The ancillary buffer of one ``recvmsg`` on the platform of *facts*.

    The kernel hands over at most one sendmsg's batch of fds per recvmsg;
    CMSG_SPACE (not CMSG_LEN) so the last fd is never cut off on the BSDs.
    Where the kernel installs fds that do not fit the buffer and leaves them
    open unreported (XNU), the buffer holds the most any peer can send, so
    every fd is seen and the excess closed.
    """
    room = SCM_MAX_FD * array.array("i").itemsize
    if facts.recv_fd_bytes_max is not None:
        room = max(room, facts.recv_fd_bytes_max)
    return socket.CMSG_SPACE(room)


ANCBUF: Final = ancbuf_size(FACTS)
# Packers and unpackers of 0..SCM_MAX_FD C ints, indexed by count: on the hot
# paths they cost half of what array.array or memoryview.cast do.
_INTS = [struct.Struct(f"{n}i") for n in range(SCM_MAX_FD + 1)]
_FD_PACK: Final = [s.pack for s in _INTS]
_FD_UNPACK: Final = [s.unpack for s in _INTS]
#: The most fd bytes one SCM_RIGHTS entry carries.
_MAX_FD_BYTES: Final = 4 * SCM_MAX_FD


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes | array.array[int]]]:
    """The ancillary data of a ``sendmsg`` carrying *fds* (none when empty)."""
    if not fds:
        return []
    data = _FD_PACK[len(fds)](*fds) if len(fds) <= SCM_MAX_FD else array.array("i", fds)
    return [(_SOL_SOCKET, _SCM_RIGHTS, data)]


def write(sock: socket.socket, bufs: Sequence[Buffer], fds: Sequence[int], flags: int = SEND_FLAGS) -> int:
    """One ``sendmsg`` of *bufs* with *fds* on their first byte; the bytes that left.

    0 when the socket is full (nothing left, the fds neither), and on macOS
    when the peer's buffer cannot take the control data yet (EMSGSIZE: the
    socket may poll writable meanwhile, so a wait can spin until the peer
    reads, as in libuv).  Other `OSError` from the kernel propagates with
    nothing sent.
    """
    try:
        if fds:
            return sock.sendmsg(bufs, [(_SOL_SOCKET, _SCM_RIGHTS, _FD_PACK[len(fds)](*fds))], flags)
        return sock.sendmsg(bufs, (), flags)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if fds and exc.errno == errno.EMSGSIZE and FACTS.emsgsize_is_backpressure:
            return 0
        if fds and exc.errno == errno.EPERM:
            raise PermissionError(
                errno.EPERM,
                "the kernel refused to pass fds to the peer: its socket accepts only data (SO_PASSRIGHTS "
                "off, as a channel with max_fds=0 sets it) or a security policy forbids it; nothing was sent",
            ) from exc
        raise


def read(sock: socket.socket | Any, decoder: Decoder, flags: int = 0) -> tuple[bytes, Sequence[int]] | None:  # noqa: C901 - the hot path, inline
    """Do one ``recvmsg_into`` straight into *decoder*.

    Returns ``(payload, fds)`` when the read was exactly one plain data
    frame that may skip the queue (`Decoder.buffer_updated_one`); *fds* is
    then the list in ``decoder.landed`` (see below) and becomes the
    caller's.  Otherwise what arrived (bytes and fds) is the decoder's, and
    at end of stream the decoder is told (`Decoder.eof`) and any fds that
    came with it are closed; returns None.  Raises `BlockingIOError` when
    nothing is ready (nothing consumed), `TruncatedControlData` on
    ``MSG_CTRUNC`` (the fds that arrived are closed; the stream can no
    longer be trusted) and other `OSError` from the kernel.  A connection
    reset counts as end of stream.

    The call's result lands in ``decoder.landed`` before any bytecode runs
    after it (``list.extend`` over ``map`` stores it from C), so an error a
    signal handler raises right after the call returned cannot take the
    fds with it: they stay listed there (the raw result, then a list of fd
    numbers) until the caller clears the list, and `landed_fds` finds them.
    """
    landed = decoder.landed
    try:
        landed.extend(map(sock.recvmsg_into, ([decoder.get_buffer()],), (ANCBUF,), (RECV_FLAGS | flags,)))
    except ConnectionResetError:
        # A peer that closed without reading all we sent is reported as a
        # reset once its own data is drained: for us it is its EOF (clean
        # between messages, a ProtocolError inside one).
        if not landed:
            landed.append((0, [], 0, None))
    except OSError as exc:
        raise _as_recv_failure(exc)  # noqa: B904 - chained inside when mapped
    n, anc, msg_flags, _ = landed[-1]
    if n and not msg_flags & _MSG_CTRUNC and RECV_FLAGS:
        # The common case, first: one SCM_RIGHTS entry of whole fds, already
        # close-on-exec, or none.
        if not anc:
            return decoder.buffer_updated_one(n, ())
        if len(anc) == 1:
            level, kind, data = anc[0]
            if (
                level == _SOL_SOCKET
                and kind == _SCM_RIGHTS
                and not len(data) % 4
                and len(data) <= _MAX_FD_BYTES
            ):
                fds = list(_FD_UNPACK[len(data) >> 2](data))
                landed[-1] = fds  # one store: the fds are always listed once
                return decoder.buffer_updated_one(n, fds)
    fds = ancillary_fds(anc)
    landed[-1] = fds
    if truncated(msg_flags) or not n:
        landed[-1] = []  # from here on closed, or the decoder's: never listed twice
    if truncated(msg_flags):
        close_all(fds)
        raise truncation_error()
    if n:
        decoder.buffer_updated(n, fds)
        return None
    close_all(fds)
    decoder.receive_eof()
    return None


def landed_fds(landed: list[Any]) -> list[int]:
    """The fds listed in a decoder's ``landed`` (see `read`) that nothing else owns yet."""
    out: list[int] = []
    for entry in landed:
        if entry.__class__ is list:
            out.extend(fd for fd in entry if fd >= 0)
        else:
            out.extend(ancillary_fds(entry[1]))
    return out


def finish_read(decoder: Decoder, n: int, ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> None:
    """Hand one ``recvmsg_into``'s result to *decoder*, whatever its ancillary data."""
    fds = fds_from_ancillary(ancdata, msg_flags)
    if n:
        decoder.buffer_updated(n, fds)
        return
    close_all(fds)
    decoder.receive_eof()


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """Return the fds of one ``recvmsg``'s ancillary data, owned by the caller.

    Raises `TruncatedControlData` after closing every fd that did arrive
    when the kernel set ``MSG_CTRUNC``.
    """
    fds = ancillary_fds(ancdata)
    if truncated(flags):
        close_all(fds)
        raise truncation_error()
    return fds


def truncation_error() -> TruncatedControlData:
    """The error of a read whose fds the kernel cut (``MSG_CTRUNC``), once they are closed."""
    return TruncatedControlData(
        "the kernel truncated the fds of a message (MSG_CTRUNC); is this "
        "process at its RLIMIT_NOFILE?  The fds that arrived were closed"
    )


def ancillary_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds in one ``recvmsg``'s ancillary data, non-inheritable, owned by the caller.

    Only ``SOL_SOCKET``/``SCM_RIGHTS`` entries carry fds; each fd is made
    non-inheritable here where ``MSG_CMSG_CLOEXEC`` could not do it
    atomically.  The one reader of SCM_RIGHTS data in the package.
    """
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            # Whole ints only: a truncated trailing fragment is no fd.
            fds.extend(memoryview(data)[: len(data) - len(data) % 4].cast("i").tolist())
    if fds and not RECV_FLAGS:
        # No atomic way here: do it before anything else can fork.
        for fd in fds:
            os.set_inheritable(fd, False)
    return fds


def recv_failure(exc: OSError) -> TruncatedControlData | None:
    """The error to raise for a ``recvmsg`` that failed because the fds could not be installed.

    Linux reports a full fd table with ``MSG_CTRUNC``; macOS and the BSDs
    fail the call instead (and drop the fds, keeping or losing the bytes):
    the same outcome for the channel, since the stream can no longer be
    trusted.  None for any other error.
    """
    for number, words in FACTS.recv_fd_errors:
        if exc.errno == number:
            return TruncatedControlData(
                f"{words} of a message; is this process at its RLIMIT_NOFILE?  "
                "The stream can no longer be trusted"
            )
    return None


def _as_recv_failure(exc: OSError) -> Exception:
    """*exc*, or the `TruncatedControlData` it means on this platform (chained to it)."""
    lost = recv_failure(exc)
    if lost is None:
        return exc
    lost.__cause__ = exc
    return lost


def truncated(flags: int) -> bool:
    """True when a ``recvmsg``'s *flags* say the kernel cut its control data (``MSG_CTRUNC``)."""
    return bool(flags & _MSG_CTRUNC)
