"""``send_many()``: many messages, as few ``sendmsg`` calls as the kernel allows.

Consecutive messages go out as groups: one write carries the frames of a
group and all their fds (at most `SCM_MAX_FD`), on its first byte, and
each frame of a group but the last is flagged `FLAG_GROUP`, so the receiver
knows that fds beyond a frame's own belong to the frames after it
(docs/wire-format.md).  A message with more fds than one write carries goes
on its own, as ``send()`` sends it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from typing_extensions import Buffer

from ._codec import FLAG_GROUP, HEADER_SIZE, SCM_MAX_FD, pack_tagged
from ._outbox import set_written

if TYPE_CHECKING:
    from ._channel import Channel

__all__ = ["Prepared", "send_groups"]

#: (payload, fd numbers, payload size), checked by `ChannelCore._message`.
Prepared = tuple[Buffer, list[int], int]

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
            bufs.append(payload)
            bufs.append(pack_tagged(tag | _GROUP_BIT if fds_after else tag, nfds, 0, size))
            fds_after = fds_after or nfds > 0
        bufs.reverse()
        group.bufs = bufs
        return group

    for message in prepared:
        nums = message[1]
        if len(nums) > SCM_MAX_FD:
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


def send_groups(channel: Channel, prepared: Sequence[Prepared], deadline: float | None) -> None:
    """Write *prepared* through *channel* (its send lock held, nothing queued, a simple session).

    On an exception, ``messages_taken`` on it counts the messages taken
    (sent, or queued for `flush`): the caller sends the others again.
    """
    taken = 0
    try:
        for item in _groups(channel._data_tag, prepared):
            count = 1 if isinstance(item, tuple) else item.count
            try:
                if isinstance(item, tuple):
                    channel._send_queued(*item)
                else:
                    _write_group(channel, item, deadline)
            except BaseException as exc:
                if getattr(exc, "characters_written", 0):
                    taken += count  # taken: its rest is pending
                raise
            taken += count
    except BaseException as exc:
        exc.messages_taken = taken  # type: ignore[attr-defined]
        raise


def _write_group(ch: Channel, group: _Group, deadline: float | None) -> None:
    """One write of a group, then its rest as `Channel.send` pushes a frame's rest."""
    try:
        sent = ch._write(ch._sock, group.bufs, group.fds, ch._send_flags)
    except OSError as exc:
        set_written(exc, 0)
        raise
    except BaseException as exc:
        ch._break(ch._outbox.interrupted(exc))
        raise
    if sent != group.size:
        ch._outbox.add_unsent(group.bufs, group.fds, sent)
        ch._push(deadline, sent)
