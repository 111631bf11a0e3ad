"""``send_many()``: many messages, as few ``sendmsg`` calls as the kernel allows.

Consecutive messages go out as groups: one write carries the frames of a
group and all their fds (at most `SCM_MAX_FD`), on its first byte, and
each frame of a group but the last is flagged `FLAG_GROUP`, so the receiver
knows that fds beyond a frame's own belong to the frames after it
(docs/wire-format.md).  A message with more fds than one write carries, or
whose payload goes as sealed shared memory, goes on its own, as ``send()``
sends it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import Buffer

from ._codec import FLAG_GROUP, HEADER_SIZE, SCM_MAX_FD, pack_tagged
from ._shared import SealedMemory, share_large

if TYPE_CHECKING:
    from ._channel import Channel
    from ._core import ChannelCore
    from .aio import AsyncChannel

__all__ = [
    "Prepared",
    "closed_meanwhile",
    "prepare",
    "record_taken",
    "release",
    "send_each",
    "send_each_async",
    "send_groups",
    "send_groups_async",
]

#: (payload, fd numbers, payload size), checked by `ChannelCore._message`.
Prepared = tuple[Buffer | SealedMemory, list[int], int]

#: Buffers per write: Linux's IOV_MAX is 1024, two per frame.
_MAX_FRAMES = 500
#: Bytes per group: past this one write per frame costs nothing that matters,
#: and a group cut by a full socket is taken whole (its rest queued).
_MAX_BYTES = 256 * 1024
#: A group's own flag in the header's first 8 bytes (flags are bytes 6-7).
_GROUP_BIT = FLAG_GROUP << 48


class _Group:
    __slots__ = ("bufs", "count", "fds", "size")

    def __init__(self) -> None:
        self.bufs: list[Buffer] = []
        self.fds: list[int] = []
        self.count = 0
        self.size = 0


def _groups(tag: int, prepared: Sequence[Prepared]) -> Iterator[_Group | Prepared]:
    """The writes of *prepared*, in order: groups, and messages too big for one."""
    group = _Group()
    members: list[tuple[int, Prepared]] = []

    def close() -> _Group:
        # Every frame but the last with fds after it is flagged: fds beyond its own are the next frames'.
        fds_after = False
        bufs: list[Buffer] = []
        for nfds, (payload, _nums, size) in reversed(members):
            bufs.append(payload)  # type: ignore[arg-type]  # never SealedMemory: that goes alone
            bufs.append(pack_tagged(tag | _GROUP_BIT if fds_after else tag, nfds, 0, size))
            fds_after = fds_after or nfds > 0
        bufs.reverse()
        group.bufs = bufs
        return group

    for message in prepared:
        nums, payload = message[1], message[0]
        if (
            len(nums) > SCM_MAX_FD
            or payload.__class__ is SealedMemory
            or (payload.__class__ is not bytes and isinstance(payload, SealedMemory))  # a subclass's too
        ):
            if members:
                yield close()
                group, members = _Group(), []
            yield message
            continue
        if members and (
            len(group.fds) + len(nums) > SCM_MAX_FD
            or len(members) >= _MAX_FRAMES
            or group.size + HEADER_SIZE + message[2] > _MAX_BYTES
        ):
            yield close()
            group, members = _Group(), []
        members.append((len(nums), message))
        group.fds.extend(nums)
        group.count += 1
        group.size += HEADER_SIZE + message[2]
    if members:
        yield close()


def prepare(
    channel: ChannelCore,
    messages: Iterable[tuple[Buffer | SealedMemory, Iterable[int | Any]]],
    pins: list[memoryview],
) -> list[Prepared]:
    """Check every message as ``send()`` would, before anything is written.

    Each payload is held from the moment its size is read (the pins of
    `ChannelCore._message`, added to *pins*): a later message's ``fileno()``, or another task while
    the async twin waits, cannot resize it under its header.  On an error
    path the caller lets them go with `release`; raising, this does.
    """
    prepared: list[Prepared] = []
    share = channel._share_above is not None
    try:
        for given, fds in messages:
            payload = share_large(channel, given) if share else given
            nums, size, pin = channel._message(payload, fds)
            if pin is not None:
                pins.append(pin)
            prepared.append((payload, nums, size))
    except BaseException:
        release(pins)
        raise
    return prepared


def release(pins: list[memoryview]) -> None:
    """Let go of the views `prepare` made: the caller's buffers are free again."""
    for pin in pins:
        pin.release()
    pins.clear()


def record_taken(exc: BaseException, taken: int, count: int) -> None:
    """Record on *exc* the messages taken: *taken*, and the *count* being written if it was taken."""
    if getattr(exc, "characters_written", 0):
        taken += count  # taken: its rest is pending
    exc.messages_taken = taken  # type: ignore[attr-defined]


def send_groups(channel: Channel, prepared: Sequence[Prepared], deadline: float | None) -> None:
    """Write *prepared* through *channel* (its send lock held, nothing queued, a simple session).

    On an exception, ``messages_taken`` on it counts the messages taken
    (sent, or queued for `flush`): the caller sends the others again.
    """
    taken = 0
    for item in _groups(channel._data_tag, prepared):
        count = 1 if isinstance(item, tuple) else item.count
        try:
            if isinstance(item, tuple):
                channel._send_queued(*item)
            else:
                sent = _first_write(channel, item)
                if sent is not None:
                    channel._push(deadline, sent)
        except BaseException as exc:
            record_taken(exc, taken, count)
            raise
        taken += count


def send_each(channel: Channel, prepared: Sequence[Prepared]) -> None:
    """`send_groups` for a channel whose session must see each message (one write each)."""
    for i, item in enumerate(prepared):
        try:
            channel._send_queued(*item)
        except BaseException as exc:
            record_taken(exc, i, 1)
            raise


async def send_groups_async(channel: AsyncChannel, prepared: Sequence[Prepared]) -> None:
    """`send_groups` for `AsyncChannel` (its send gate held): waits on the loop."""
    taken = 0
    for item in _groups(channel._data_tag, prepared):
        count = 1 if isinstance(item, tuple) else item.count
        try:
            if isinstance(item, tuple):
                await channel._send_queued(*item)
            else:
                sent = _first_write(channel, item)
                if sent is not None:
                    await channel._push(sent)
        except BaseException as exc:
            record_taken(exc, taken, count)
            raise
        taken += count


async def send_each_async(channel: AsyncChannel, prepared: Sequence[Prepared]) -> None:
    """`send_each` for `AsyncChannel`."""
    for i, item in enumerate(prepared):
        try:
            await channel._send_queued(*item)
        except BaseException as exc:
            record_taken(exc, i, 1)
            raise


def _first_write(ch: ChannelCore, group: _Group) -> int | None:
    """One write of a group; None when all of it left, else the bytes that did (the rest queued)."""
    try:
        sent = ch._write(ch._sock, group.bufs, group.fds, ch._send_flags)
    except BaseException as exc:
        # As send()'s first write: the kernel's error left nothing sent (a
        # closed fd is named), anything else breaks the stream.
        ch._first_write_raised(exc, group.fds)
        raise
    if sent == group.size:
        return None
    ch._outbox.add_unsent(group.bufs, group.fds, sent)
    return sent


def closed_meanwhile(channel: Channel, exc: BaseException) -> None:
    """`Channel._closed_meanwhile` for ``send_many``: the `ValueError` keeps ``messages_taken``."""
    try:
        channel._closed_meanwhile(exc)
    except ValueError as closed:
        closed.messages_taken = getattr(exc, "messages_taken", 0)  # type: ignore[attr-defined]
        raise
