"""Channels inside messages: send a channel end over another channel, rebuild it on arrival.

The sender's end goes as the message's first fd with a fixed descriptor at
the start of the payload (its kind, transport and limits); the receiver
rebuilds a channel of the same kind, transport and limits from them with
`recv_channel`.  Ownership moves exactly once: the moment the message is
*taken* (the `io` convention of ``send()``: it returned, or raised with
``characters_written > 0``) the sender's object is closed without touching
the socket; a message not taken leaves the end as it was.

Sits above `fdchannel.Channel` (and imports the module of another kind,
`fdchannel.aio`, `.trio` or `.anyio`, only to rebuild such an end), below
nothing.
"""

from __future__ import annotations

import importlib
import os
import socket
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

from typing_extensions import Buffer

from ._channel import Channel
from ._core import ChannelCore
from ._fdutil import close_listed
from ._guard import let_go, take
from ._message import Message
from ._ownedfd import OwnedFd
from .transports import PidfdGetfd, Transport, UnixRights

if TYPE_CHECKING:
    from ._structured import StructuredChannel
    from .aio import AsyncChannel

#: The async channels: asyncio's, trio's and anyio's.
_A = TypeVar("_A", "AsyncChannel", "StructuredChannel")

__all__ = [
    "CHANNEL_DESCRIPTOR",
    "ReceivedChannel",
    "asend_channel",
    "asend_new_channel",
    "recv_channel",
    "send_channel",
    "send_new_channel",
]

#: magic, version, kind (an index in `_KINDS`), transport id, transport
#: flags (bit 0: UnixRights acknowledge), UnixRights window, max_payload,
#: max_fds, share_above (-1: none).
CHANNEL_DESCRIPTOR: Final = struct.Struct("<8sBBBBIQIq")
_MAGIC: Final = b"FDCHCHAN"
_VERSION: Final = 1
#: The classes an end may be, by their ``_kind``: (module, class name).
_KINDS: Final = (
    ("fdchannel", "Channel"),
    ("fdchannel.aio", "AsyncChannel"),
    ("fdchannel.trio", "TrioChannel"),
    ("fdchannel.anyio", "AnyioChannel"),
)
_KIND_NAMES: Final = tuple(name for _module, name in _KINDS)

_C = TypeVar("_C", bound=ChannelCore)


class ReceivedChannel(NamedTuple):
    """What `recv_channel` returns: the channel (now the caller's) and the rest of the message.

    *fds* are the message's other fds (the same `OwnedFd` objects as in
    ``msg.fds[1:]``: closing either closes them once).
    """

    channel: Any
    payload: bytes
    fds: tuple[OwnedFd, ...]


# -- sending -----------------------------------------------------------------------


def _transport_fields(transport: Transport) -> tuple[int, int, int]:
    if isinstance(transport, UnixRights):
        return 0, int(bool(transport.acknowledge)), transport.window
    if isinstance(transport, PidfdGetfd):
        return 1, 0, 0
    raise ValueError(
        f"a channel using {transport.name} cannot be sent: only UnixRights and PidfdGetfd ends can "
        "move (a WinDuplicate end learns its peer's process once, when it starts)"
    )


def _descriptor(end: ChannelCore) -> bytes:
    wire, flags, window = _transport_fields(end.transport)
    share = end._share_above
    return CHANNEL_DESCRIPTOR.pack(
        _MAGIC,
        _VERSION,
        _KIND_NAMES.index(end._kind),
        wire,
        flags,
        window,
        end.max_payload,
        end.max_fds,
        -1 if share is None else share,
    )


def _same_socket(a: int, b: int) -> bool:
    return os.path.samestat(os.fstat(a), os.fstat(b))


def _check_state(via: ChannelCore, end: ChannelCore) -> None:
    """Raise unless *end*, by itself, may go over *via* (before any lock is taken)."""
    if not isinstance(end, ChannelCore):
        raise TypeError(f"send_channel() sends a Channel or AsyncChannel, not {type(end).__name__}")
    if end.closed:
        raise ValueError(f"cannot send a closed {end._kind}")
    if end is via or (not via.closed and _same_socket(end.fileno(), via.fileno())):
        raise ValueError("refusing to send a channel over itself")
    partner = via._other_end() if via._other_end is not None else None
    if partner is end:
        raise ValueError(
            "refusing to send a channel over its own pair partner: the peer would receive its own socket"
        )
    if end._broken is not None:
        raise ValueError(f"cannot send an unusable {end._kind} ({end._broken})")
    if end._kind not in _KIND_NAMES:
        raise ValueError(f"a {end._kind} cannot be sent: only {', '.join(_KIND_NAMES)} ends can move")
    _transport_fields(end.transport)  # ValueError for a transport that cannot move


def _claim(via: ChannelCore, end: ChannelCore, locks: list[bool]) -> None:
    """Check *end* may be sent over *via* and take its locks, recording them in *locks*.

    ``locks[0]`` and ``locks[1]`` say whether this call took *end*'s send
    and receive lock (or gate): each result is stored by the call that takes
    it (`fdchannel._guard.take`), so that a signal handler's error at the
    end of that call finds it recorded, taken or not, and `_let_go`
    releases exactly what this call holds.  Raises with the caller to let
    go of what *locks* says.
    """
    _check_state(via, end)
    if not take(end._send_guard(), locks):
        raise RuntimeError(f"the {end._kind} is in use by another send()")
    if not take(end._recv_guard(), locks):
        raise RuntimeError(f"the {end._kind} is in use by another recv()")
    # Acknowledgements owed to end's peer go now, while end is still ours.
    end._flush_control_held()
    if end._broken is not None:  # (by that flush)
        raise ValueError(f"cannot send an unusable {end._kind} ({end._broken})")
    decoder = end._decoder
    why = None
    if end.pending:
        why = "it has pending output (call flush() until it returns first)"
    elif decoder.frames or not decoder.at_boundary:
        why = "it holds received data not yet returned by recv() (receive it first)"
    if why is not None:
        raise ValueError(f"cannot send a {end._kind} while {why}")


#: How many times an interrupted send_channel runs `_settle` at most: each
#: run is one more signal handler's error (or a failure that would repeat).
_RUNS = 8


def _settle(
    exc: BaseException,
    via: ChannelCore,
    end: ChannelCore,
    step: list[int],
    locks: list[bool],
    sent: bool,
    broken_before: bool,
    held: list[int],
) -> None:
    """After *exc* cut `send_channel` short: *end* handed over if the message
    left (or may have), else let go for the caller; the duplicate closed.

    The caller runs it until ``step[3]`` is set (at most `_RUNS` times):
    each part carries on from where an earlier run stopped.  *step* is
    send_channel's progress, ints changed by stores only (a signal
    handler's error strikes at calls, so it never leaves them wrong): [0]
    the end's session closed (or tried), [1] the hand-over done, [2] the end
    taken (2) or not (1) once decided, [3] all settled, [4] runs so far.
    """
    step[4] += 1
    if not step[2]:
        left = sent
        if not left:
            # As the exception says, or, when the send broke *via* mid-write,
            # unknown: then gone (else *end* could have two owners).
            try:
                written = exc.characters_written  # type: ignore[attr-defined]  # (no call)
            except BaseException:  # (none: AttributeError, or out of memory making that)
                written = None
            if written is None:
                left = not broken_before and via._broken is not None
            else:
                left = written.__class__ is int and written > 0
        step[2] = 2 if left else 1
    if step[2] == 2:
        if not step[1]:
            _hand_over(end, step, locks)
    else:
        _let_go(end, locks)  # not taken: *end* stays the caller's
    close_listed(held)
    step[3] = 1


def _let_go(end: ChannelCore, locks: list[bool]) -> None:
    """Release the locks `_claim` took on *end* (as *locks* records), each once.

    Cut short by a signal handler's error, calling it again releases what
    is left and nothing twice (`fdchannel._guard.let_go`).
    """
    if len(locks) > 1 and locks[1]:
        let_go(end._recv_guard(), locks, 1)
    if locks and locks[0]:
        let_go(end._send_guard(), locks, 0)


def _hand_over(end: ChannelCore, step: list[int], locks: list[bool]) -> None:
    """The message carrying *end* was taken: this object lets go, the socket lives on elsewhere.

    Not `close()`: that would read from the socket (control frames), and
    with a call waiting shut it down for every holder.

    A signal handler's error can cut it short at any call; the caller then
    calls it again with the same *step* and *locks* (as `_settle` reads
    them), until ``step[1]`` says all is done: each step is idempotent,
    marked tried before it begins, or marked as `_let_go` marks its own.
    """
    end._closed = True
    try:
        if not step[0]:
            step[0] = 1  # tried: an error of its own is not retried
            if not isinstance(end, Channel):
                # The async kinds drop their event-loop registrations on the fd
                # number; a blocking Channel's wake-up would shut the socket down.
                end._wake_waiters()
            end._session.close()
    finally:
        try:
            end._sock.close()  # (idempotent)
        finally:
            _let_go(end, locks)  # calls waiting for its locks now find it closed (ValueError)
    step[1] = 1


def _wire(descriptor: bytes, payload: Buffer) -> bytes:
    try:
        data = memoryview(payload).tobytes()
    except TypeError:
        raise TypeError(f"the payload must be a bytes-like object, not {type(payload).__name__}") from None
    return descriptor + data


def _dup(sock: socket.socket, held: list[int]) -> None:
    """``held[0]`` = a duplicate of *sock*'s fd.  The end of ``os.dup`` (its
    result on the stack, not yet stored) is the one point where a signal
    handler's error loses an fd here, as for every Python program that
    makes one."""
    held[0] = os.dup(sock.fileno())


def _own_dup(end: ChannelCore, held: list[int]) -> None:
    """A duplicate of *end*'s socket into ``held[0]``, sent in place of its number.

    ``send()`` reads the numbers as it begins and writes them once it has
    its turn; a ``close()`` of *end* by another thread or task meanwhile
    frees the number for any file opened next, which would go to the peer
    instead.  The duplicate keeps the socket itself.  A bare number in a
    list, which the caller closes with `close_listed`: a socket object
    made from it would be a call (an allocation that can fail, Python code
    in ``socket.dup``) between the fd and its owner.
    """
    try:
        _dup(end._sock, held)
    except OSError:
        if end.closed:  # by another thread since the checks: as they say it
            raise ValueError(f"cannot send a closed {end._kind}") from None
        raise


def send_channel(via: Channel, end: ChannelCore, payload: Buffer = b"", fds: Iterable[Any] = ()) -> None:
    """Send the channel *end* over *via*, with *payload* and *fds*; *end* is then the receiver's.

    *end* is a `Channel`, `fdchannel.aio.AsyncChannel`, `fdchannel.trio.TrioChannel`
    or `fdchannel.anyio.AnyioChannel` using UnixRights
    or PidfdGetfd; the receiver rebuilds it with `recv_channel` (same kind,
    transport, limits and `fdchannel.shm.share_above` setting).  Once the
    message is taken (``send()`` returned, or raised with
    ``characters_written > 0``) *end* is closed here without touching its
    socket, whose unread data goes to the new owner; if it was not taken
    (``characters_written == 0``, or an error before any write) *end* is
    unchanged and usable.  *fds* stay the caller's as with ``send()``.

    Raises `ValueError` with nothing sent for *end* being *via* itself or
    its pair partner, closed, unusable, holding received data not yet
    returned by ``recv()``, or with pending output, and for a transport that
    cannot move; `RuntimeError` when another thread is inside *end*'s
    ``send()``/``recv()``; whatever ``via.send()`` raises.
    """
    broken_before = via._broken is not None
    held = [-1]  # the duplicate of end's socket (_own_dup)
    sent = False
    step = [0, 0, 0, 0, 0]  # how far it got (see _settle)
    locks: list[bool] = []  # the locks of *end* taken (_claim)
    try:
        _claim(via, end, locks)
        broken_before = via._broken is not None  # (again: as the message is about to go)
        data = _wire(_descriptor(end), payload)
        _own_dup(end, held)
        via.send(data, [held[0], *fds])
        sent = True  # (no call since the send returned: no point where a handler's error lands)
        close_listed(held)
        _hand_over(end, step, locks)
    except BaseException as exc:
        last = exc
        while (
            not step[3] and step[4] < _RUNS
        ):  # (calling nothing first: a handler's error may strike at any call)
            try:
                _settle(exc, via, end, step, locks, sent, broken_before, held)
            except BaseException as again:  # a storm of signals: each run carries on from the last
                last = again
        if last is not exc:
            raise last  # noqa: B904 - the last handler's error (the first is its context)
        raise


async def asend_channel(
    via: AsyncChannel | StructuredChannel, end: ChannelCore, payload: Buffer = b"", fds: Iterable[Any] = ()
) -> None:
    """`send_channel` over an async channel (asyncio, trio or anyio); cancelling follows ``send()``.

    A cancelled call whose ``CancelledError`` has ``characters_written == 0``
    sent nothing and *end* stays the caller's; otherwise *end* is gone (the
    rest of the message goes out first with the next call on *via*).
    """
    broken_before = via._broken is not None
    held = [-1]  # the duplicate of end's socket (_own_dup)
    sent = False
    step = [0, 0, 0, 0, 0]  # how far it got (see _settle)
    locks: list[bool] = []  # the locks of *end* taken (_claim)
    try:
        _claim(via, end, locks)
        broken_before = via._broken is not None  # (again: as the message is about to go)
        data = _wire(_descriptor(end), payload)
        _own_dup(end, held)
        await via.send(data, [held[0], *fds])
        sent = True  # (no call since the send returned: no point where a handler's error lands)
        close_listed(held)
        _hand_over(end, step, locks)
    except BaseException as exc:
        last = exc
        while (
            not step[3] and step[4] < _RUNS
        ):  # (calling nothing first: a handler's error may strike at any call)
            try:
                _settle(exc, via, end, step, locks, sent, broken_before, held)
            except BaseException as again:  # a storm of signals: each run carries on from the last
                last = again
        if last is not exc:
            raise last  # noqa: B904 - the last handler's error (the first is its context)
        raise


def _new_pair(via: _C) -> tuple[_C, _C]:
    make: Any = getattr(type(via), "pair")  # noqa: B009 - Channel.pair or AsyncChannel.pair
    kept, sent = make(transport=via.transport, max_payload=via.max_payload, max_fds=via.max_fds)
    return kept, sent


def send_new_channel(via: Channel, payload: Buffer = b"", fds: Iterable[Any] = ()) -> Channel:
    """Make a new pair like *via* (class, transport, limits), send one end over *via*, return the other.

    The returned end is the caller's.  If the message is not taken, both
    ends are closed and the error raised (nothing left open).
    """
    kept, sent = _new_pair(via)
    try:
        send_channel(via, sent, payload, fds)
    except BaseException:
        kept.close()
        sent.close()  # a no-op when it was taken
        raise
    return kept


async def asend_new_channel(via: _A, payload: Buffer = b"", fds: Iterable[Any] = ()) -> _A:
    """`send_new_channel` over an async channel; the new ends are of its class."""
    kept, sent = _new_pair(via)
    try:
        await asend_channel(via, sent, payload, fds)
    except BaseException:
        kept.close()
        sent.close()
        raise
    return kept


# -- receiving -----------------------------------------------------------------------


def _transport(wire: int, flags: int, window: int) -> Transport:
    if wire == 0:
        return UnixRights(acknowledge=bool(flags & 1), window=max(window, 1))
    if wire == 1:
        return PidfdGetfd()
    raise ValueError(f"the message carries a channel of unknown transport id {wire}")


def recv_channel(msg: Message, cls: type[Any] | None = None, **overrides: Any) -> ReceivedChannel:
    """Rebuild the channel a `send_channel` message carries; it is the caller's from now on.

    The channel has the sender's kind (`Channel`, `AsyncChannel`,
    `TrioChannel` or `AnyioChannel`; *cls* chooses another), transport, limits and ``share_above`` setting;
    *overrides* (``max_payload=``, ``max_fds=``, and the holding limits
    ``max_held_fds=``, ``frame_timeout=``, ``budget=``, which do not
    travel) replace limits, e.g. to cap what a peer may ask for.  Returns `ReceivedChannel` (the channel, the
    sender's payload after the descriptor, the message's other fds).  The
    channel's fd moves out of ``msg.fds[0]``; the other fds stay owned by
    *msg* (and are the ones returned).

    Raises `ValueError` with *msg* unchanged when it carries no channel (no
    descriptor, a shared-memory payload, no fd) or the fd is not a
    connected stream socket the transport can use.
    """
    payload = msg.payload
    size = CHANNEL_DESCRIPTOR.size
    if msg.shared is not None or len(payload) < size or payload[:8] != _MAGIC:
        raise ValueError("the message carries no channel (it was not sent with send_channel())")
    _magic, version, kind, wire, flags, window, max_payload, max_fds, share = CHANNEL_DESCRIPTOR.unpack(
        payload[:size]
    )
    if version != _VERSION or kind >= len(_KINDS):
        raise ValueError(f"unknown channel descriptor (version {version}, kind {kind})")
    if not msg.fds or msg.fds[0].closed:
        raise ValueError("the message's channel fd is missing or was already taken")
    if cls is None:
        module, name = _KINDS[kind]
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError as exc:
            raise ValueError(
                f"the channel was sent as a {name}, which needs {exc.name}: pass cls= to choose another kind"
            ) from exc
    options: dict[str, Any] = {
        "transport": _transport(wire, flags, window),
        "max_payload": max_payload,
        "max_fds": max_fds,
    }
    options.update(overrides)
    owned = msg.fds[0]
    try:
        channel = cls.from_fd(owned.fileno(), **options)
    except OSError as exc:
        raise ValueError(f"the message's channel fd is not a connected stream socket ({exc})") from exc
    owned.detach()
    channel._share_above = None if share < 0 else share
    return ReceivedChannel(channel, bytes(payload[size:]), msg.fds[1:])
