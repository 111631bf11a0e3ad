"""Which implementation of the hot paths a new `Channel` uses: compiled or pure Python.

The compiled module `fdchannel._speedups` is built by the package's own
setuptools build where a C compiler and the Python headers are present
(Linux only); everywhere else, and when the environment variable
``FDCHANNEL_PURE`` is set to anything but ``""`` or ``"0"`` at import, every
channel takes the pure-Python path.  Both paths behave the same; the
compiled one is faster.

The compiled path covers the common case of the default transport
(`UnixRights` without acknowledgements over AF_UNIX): `attach` gives such a
channel a ``FastPath`` object, which `Channel.send`, `Channel.recv` and
`Channel.send_many` try first.  What it hands over comes back through the helpers below, which do
exactly what the Python path does at that point.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

from typing_extensions import Buffer

from ._codec import FIRST_BUFFER, HEADER_SIZE, SCM_MAX_FD, Frame
from ._errors import ChannelClosed
from ._fdutil import close_all
from ._message import CLOSED_FD, Message

if TYPE_CHECKING:
    from ._core import ChannelCore

__all__ = ["PURE_ENV", "attach", "compiled_available", "enabled", "forced", "register", "why_pure"]

#: The environment variable that forces the pure-Python path.
PURE_ENV = "FDCHANNEL_PURE"


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return None, f"{PURE_ENV} is set"
    if sys.platform != "linux":
        return None, "the compiled path is built for Linux only"
    try:
        from . import _speedups  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:
        return None, f"fdchannel._speedups was not built ({exc})"
    module: ModuleType = _speedups
    if (module.HEADER_SIZE, module.SCM_MAX_FD, getattr(module, "FIRST_BUFFER", None)) != (
        HEADER_SIZE,
        SCM_MAX_FD,
        FIRST_BUFFER,
    ):
        return None, "fdchannel._speedups was built for another wire format"
    # Also puts C versions of Message.close, Message.__del__ and its dealloc
    # (which keeps a few messages for the next recv) on the class.
    module.setup(Message, CLOSED_FD, Frame, _send_rest, _send_interrupted, _recv_rest, _send_many_rest)
    # And of OwnedFd.__del__ and SealedMemory.__del__: no signal handler can
    # cut them short before they close (see _speedups.c).
    from ._ownedfd import OwnedFd
    from ._shared import SealedMemory

    module.finalizers(OwnedFd, SealedMemory)
    return module, ""


# -- what the compiled path hands over (it holds the lock) ----------------------------


def _send_rest(channel: Any, bufs: list[Buffer], nums: list[int], sent: int) -> None:
    """A write took *sent* bytes of the frame (maybe 0): queue the rest and push it, as `Channel.send`."""
    channel._outbox.add_unsent(bufs, nums, sent)
    channel._suspect = True
    try:
        channel._push(channel._deadline(), sent)
    except BaseException as exc:
        channel._send_interrupted(exc)
        if isinstance(exc, OSError | ChannelClosed):
            channel._closed_meanwhile(exc)
        raise
    channel._suspect = False


def _send_many_rest(channel: Any, bufs: list[Buffer], nums: list[int], sent: int, count: int) -> None:
    """A ``send_many`` group's write took *sent* bytes (maybe 0): queue and push the rest, as `send_many`.

    The group held all *count* messages of the call; on an exception
    ``messages_taken`` says how many were taken, as `_batch.send_groups` does.
    """
    from . import _batch

    channel._outbox.add_unsent(bufs, nums, sent)
    channel._suspect = True
    try:
        try:
            channel._push(channel._deadline(), sent)
        except BaseException as exc:
            _batch.record_taken(exc, 0, count)
            raise
    except BaseException as exc:
        channel._send_interrupted(exc)
        if isinstance(exc, OSError | ChannelClosed):
            _batch.closed_meanwhile(channel, exc)
        raise
    channel._suspect = False


def _send_interrupted(channel: ChannelCore, exc: BaseException) -> None:
    """A signal handler's error struck inside a write: the stream is unusable."""
    channel._break(channel._outbox.interrupted(exc))


def _recv_rest(channel: ChannelCore, n: int, fds: list[int], truncated: bool) -> None:
    """A read that is not one lone frame: the decoder takes it, as `ChannelCore._read` does.

    *fds* is listed in the decoder's ``landed`` (the C put it there before
    any bytecode ran): a signal handler's error in here leaves it there for
    `ChannelCore._close_held`.
    """
    decoder = channel._decoder
    if truncated and sys.platform != "win32":  # (the compiled path exists on Linux only)
        from ._posixio import truncation_error

        exc = truncation_error()
        channel._fail(exc)  # closes the landed fds
        raise exc
    if n:
        decoder.buffer_updated(n, fds)
        decoder.landed.clear()  # what arrived is the decoder's now
        return
    decoder.landed.clear()
    close_all(fds)
    decoder.receive_eof()
    if not channel._eof:
        channel._at_eof()


_speedups, _why = _load()
_enabled = _speedups is not None


def attach(channel: ChannelCore) -> Any:
    """The compiled send/recv for *channel*, or None when it must take the Python path."""
    module = _speedups
    if module is None or not _enabled or not channel._simple:
        return None
    if sys.platform == "win32":  # pragma: no cover - _load() found no module there
        return None
    from . import _posixio

    # A socket subclass may do its own I/O (sendmsg, recvmsg_into): the C
    # calls the kernel directly, so it serves plain sockets only.
    if channel._io is not _posixio or type(channel._sock) is not socket.socket or not channel._decoder._lone:
        return None
    decoder = channel._decoder
    return module.FastPath(
        channel._fileno,
        channel._data_tag,
        channel._send_flags,
        decoder._fast_max_fds,
        decoder._fast_max_payload,
        channel._sock.getblocking(),
    )


def register(cls: type[ChannelCore]) -> None:
    """Tell the compiled module which class is `Channel`: its exact instances' state is cached."""
    if _speedups is not None:
        _speedups.channel_class(cls)


def compiled_available() -> bool:
    """True when the compiled module was built and may be used in this process."""
    return _speedups is not None


def enabled() -> bool:
    """True while new channels take the compiled path."""
    return _enabled


def why_pure() -> str:
    """Why the compiled path is not available (empty when it is)."""
    return _why


@contextmanager
def forced(compiled: bool) -> Iterator[None]:
    """In the block, new channels take the compiled path if *compiled* (and it is built), else the pure one.

    For the benchmark and the tests: they compare both paths in one process.
    """
    global _enabled
    saved = _enabled
    _enabled = compiled and _speedups is not None
    try:
        yield
    finally:
        _enabled = saved
