"""The sans-IO send side: messages in, chunks to write out, and the partial-write rules.

The mirror of `fdchannel._codec.Decoder`.  An `Outbox` turns a message into
the chunks of its frame (header, transport data, payload; batches of at most
`SCM_MAX_FD` in-band fds, each riding on bytes of its own frame), keeps the
queue of what is still to go, and decides every question a partly written
frame raises: how many bytes count as written (``characters_written``),
whether the message was *taken*, when the rest must stop borrowing the
caller's buffers and fd numbers, and when a failure leaves the stream
corrupt.  It never touches a socket: the I/O layer asks for the chunk at the
head (`Outbox.head`), writes it, and reports how many bytes left
(`Outbox.wrote`).

The rules, in the `io` module's convention:

* A message whose bytes did not start to leave is *not taken*: nothing of it
  stays queued, ``characters_written`` is ``0``, and the caller may send it
  again.
* Once one byte left, the message is *taken*: its rest is finished before
  anything else is written.  When the writer stops waiting (non-blocking,
  timed out, cancelled) the rest is detached: payload copied, fds
  duplicated, so the caller may free both at once.
* A write that fails otherwise in the middle of a frame corrupts the stream
  (the peer would misparse what follows), unless the peer is gone
  (``EPIPE``/``ECONNRESET``), in which case it reads nothing more anyway.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final

from typing_extensions import Buffer

from ._codec import SCM_MAX_FD, pack_header
from ._errors import ChannelBroken
from ._fdutil import close_all

__all__ = ["Chunk", "Outbox", "set_written", "split_batches"]

#: Frames up to this size are joined into one buffer before they are split
#: into fd batches; larger payloads are sliced, never copied.
_JOIN_LIMIT: Final = 4096


def set_written(exc: BaseException, n: int) -> None:
    """Record on *exc* how many bytes of the message were written (the `io` convention)."""
    # BlockingIOError has the attribute; TimeoutError and CancelledError get
    # it the same way.
    exc.characters_written = n  # type: ignore[attr-defined]


class Chunk:
    """Bytes still to send, and the fds that must ride on the first of them.

    While ``owns_fds`` is false the fds (and the buffers) are borrowed from
    the caller of ``send()``; `detach` makes the chunk independent of both
    before ``send()`` returns with the chunk still queued.
    """

    __slots__ = ("bufs", "fds", "owns_fds")

    def __init__(self, bufs: list[Buffer], fds: list[int], owns_fds: bool = False) -> None:
        self.bufs = bufs
        self.fds = fds
        self.owns_fds = owns_fds

    def release_fds(self) -> None:
        """Forget the fds (they were sent, or never will be), closing owned ones."""
        fds, self.fds = self.fds, []
        if self.owns_fds:
            close_all(fds)

    def detach(self) -> None:
        """Stop borrowing the caller's memory and fds: copy and duplicate them.

        Raises `OSError` (``EMFILE``) if a duplicate cannot be made; the chunk
        then still borrows the caller's fds.
        """
        bufs = self.bufs
        if len(bufs) != 1 or bufs[0].__class__ is not bytes:
            # In place: the caller's frames still hold this list (an
            # exception's traceback keeps them), and views of the caller's
            # buffers in it would keep those from resizing until it goes.
            bufs[:] = [b"".join(bufs)]
        if self.fds and not self.owns_fds:
            dups: list[int] = []
            try:
                for fd in self.fds:
                    dups.append(os.dup(fd))
            except BaseException:
                close_all(dups)
                raise
            self.fds, self.owns_fds = dups, True

    def consume(self, n: int) -> bool:
        """Drop *n* sent bytes; return True when nothing is left."""
        bufs = self.bufs
        while n:
            first = memoryview(bufs[0]).cast("B")
            if n < len(first):
                bufs[0] = first[n:]
                return False
            n -= len(first)
            del bufs[0]
        while bufs and not memoryview(bufs[0]).nbytes:
            del bufs[0]
        return not bufs

    @property
    def nbytes(self) -> int:
        """Bytes still to send."""
        return sum(memoryview(b).nbytes for b in self.bufs)


def split_batches(bufs: list[Buffer], payload: Buffer, size: int, in_band: Sequence[int]) -> list[Chunk]:
    """Split a frame whose fds need several ``sendmsg`` calls into chunks.

    *bufs* is the whole frame (header, aux, payload of *size* bytes last).
    Every batch of up to `SCM_MAX_FD` fds but the last rides on one byte of
    its own, the last on the rest of the frame, so each batch reaches the
    peer with bytes of its own frame.  The chunks borrow *payload* and the fds.
    """
    total = sum(memoryview(b).nbytes for b in bufs)
    frame = b"".join(bufs) if size <= _JOIN_LIMIT else None
    # Sliced by bytes, whatever the payload's item size (an array('i'), say).
    data = memoryview(payload).cast("B")
    lead = frame if frame is not None else b"".join(bufs[:-1]) + bytes(data[:SCM_MAX_FD])
    batches = [list(in_band[i : i + SCM_MAX_FD]) for i in range(0, len(in_band), SCM_MAX_FD)]
    if len(lead) < len(batches):
        raise ValueError("frame too short to carry its fds; the transport must pad it")
    chunks = [Chunk([lead[i : i + 1]], batch) for i, batch in enumerate(batches[:-1])]
    rest = len(batches) - 1
    if frame is not None:
        tail: list[Buffer] = [frame[rest:]]
    else:
        tail = [lead[rest:], data[len(lead) - (total - size) :]]
    chunks.append(Chunk(tail, batches[-1]))
    return chunks


def frame_bufs(header: bytes, aux: bytes, payload: Buffer, size: int) -> list[Buffer]:
    """The buffers of one frame, in order, without empty ones."""
    bufs: list[Buffer] = [header]
    if aux:
        bufs.append(aux)
    if size:
        bufs.append(payload)
    return bufs


class Outbox:
    """One channel's queue of bytes and fds to send, and the rules for writing it.

    ``pending`` is the queue, head first.  The methods that end a write
    (`paused`, `failed`, `interrupted`) take *before*: the bytes of the
    current message written before the write loop started (``None`` when
    the loop flushes data taken earlier, or control frames), and *written*:
    what the loop itself wrote.  Everything pending belongs to the current
    message when *before* is not None: older data is always flushed first.
    """

    __slots__ = ("pending", "wire_id")

    def __init__(self, wire_id: int) -> None:
        self.wire_id = wire_id
        self.pending: deque[Chunk] = deque()

    # -- what goes in ----------------------------------------------------------

    def frame(self, aux: bytes, nfds: int, payload: Buffer, size: int, flags: int = 0) -> list[Buffer]:
        """The buffers of a data frame declaring *nfds* fds, ready for one write."""
        header = pack_header(self.wire_id, nfds, len(aux), size, flags=flags)
        return frame_bufs(header, aux, payload, size)

    def add_frame(self, bufs: list[Buffer], in_band: Sequence[int], payload: Buffer, size: int) -> None:
        """Queue a whole frame (from `frame`), none of it written yet.

        In-band fds beyond `SCM_MAX_FD` are split into batches, each on
        bytes of its own.  The chunks borrow *payload* and the fd numbers.
        """
        if len(in_band) <= SCM_MAX_FD:
            self.pending.append(Chunk(bufs, list(in_band)))
        else:
            self.pending.extend(split_batches(bufs, payload, size, in_band))

    def add_unsent(self, bufs: list[Buffer], fds: list[int], sent: int) -> None:
        """Queue what one write of a whole frame (*bufs*, *fds*) did not send (*sent* bytes left)."""
        chunk = Chunk(bufs, fds)
        if sent:
            chunk.fds = []  # they rode on the bytes that left
            chunk.consume(sent)
        self.pending.append(chunk)

    def add_control(self, payloads: Iterable[bytes]) -> None:
        """Queue transport control frames (they own their bytes and carry no fds)."""
        for payload in payloads:
            header = pack_header(self.wire_id, 0, 0, len(payload), control=True)
            self.pending.append(Chunk([header + payload], [], owns_fds=True))

    # -- the writer's side -----------------------------------------------------

    def head(self) -> Chunk | None:
        """The chunk to write next (its fds go with its first byte), or None."""
        return self.pending[0] if self.pending else None

    def wrote(self, n: int) -> bool:
        """*n* bytes of the head chunk left; True when the chunk is done.

        Its fds rode on the first of them: they are never attached again.
        """
        chunk = self.pending[0]
        if n and chunk.fds:
            chunk.release_fds()
        if chunk.consume(n):
            self.pending.popleft()
            return True
        return False

    # -- how a write ends ------------------------------------------------------

    def paused(self, exc: BaseException, before: int | None, written: int) -> ChannelBroken | None:
        """The writer stopped waiting (*exc*: would block, timed out, cancelled).

        Sets ``characters_written`` on *exc*: the bytes of the message (or,
        when flushing, of this call).  A message not taken leaves nothing
        queued; the rest of a taken one is detached.  If it cannot be (no fd
        left to duplicate into) the rest is dropped and the returned error
        says the stream is cut short; the caller must raise the `OSError` it
        chains to (``__cause__``), with ``characters_written`` set too.
        """
        taken = written if before is None else before + written
        set_written(exc, taken)
        if before is not None and not taken:
            self.pending.clear()  # not taken: nothing of it stays behind
            return None
        try:
            for chunk in self.pending:
                chunk.detach()
        except BaseException as dup_error:
            # EMFILE, or an interrupt between two duplicates: either way the
            # rest would keep borrowing fd numbers the caller may now close.
            self.discard()
            set_written(dup_error, taken)
            broken = ChannelBroken(
                f"the rest of a message could not be kept ({dup_error}): the stream is cut short"
            )
            broken.__cause__ = dup_error
            return broken
        return None

    def failed(self, exc: BaseException, before: int | None, written: int) -> ChannelBroken | None:
        """A write failed with *exc* (an `OSError` from the kernel, say).

        Sets ``characters_written``.  Whatever is still queued is dropped;
        returns the error that makes the channel unusable when that cut a
        frame the peer is still reading, else None.
        """
        taken = written if before is None else before + written
        set_written(exc, taken)
        if not self.pending:
            return None
        if before is not None and not taken:
            self.pending.clear()  # the kernel took nothing of it: not taken, nothing cut
            return None
        self.discard()
        # A vanished peer reads nothing more, so a cut frame corrupts
        # nothing; recv() must still deliver what it sent before.
        if isinstance(exc, BrokenPipeError | ConnectionResetError):
            return None
        broken = ChannelBroken(f"a frame was cut short by {exc!r}: the stream is corrupt")
        broken.__cause__ = exc
        return broken

    def interrupted(self, exc: BaseException) -> ChannelBroken:
        """*exc* (``KeyboardInterrupt``, a signal handler's error) struck inside a write.

        It may have struck after the kernel took bytes but before the count
        reached us: how much left is unknown, so the stream is unusable.
        """
        self.discard()
        broken = ChannelBroken(
            f"send() was interrupted by {exc!r} while writing a frame; how much of it "
            "left is unknown, so the stream is unusable"
        )
        broken.__cause__ = exc
        return broken

    def discard(self) -> None:
        """Drop everything queued, closing the fds the queue owns."""
        for chunk in self.pending:
            chunk.release_fds()
        self.pending.clear()

    @property
    def nbytes(self) -> int:
        """Bytes queued."""
        return sum(chunk.nbytes for chunk in self.pending)
