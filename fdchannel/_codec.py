"""The sans-IO frame codec: bytes and fd numbers in, frames out.

No sockets and no system calls live here, so the blocking channel, the
asyncio channel and the tests all drive the same code.  The reading side
follows `asyncio.BufferedProtocol`: the caller asks `Decoder.get_buffer` where
to read, reads into it, and reports what arrived with `Decoder.buffer_updated`.
That shape lets a large payload be read straight into the buffer it is handed
over in, with no copy.

Wire format (all integers little-endian; docs/wire-format.md has the rest)::

    offset size  field
         0    4  magic  b"FDCH"
         4    1  version (1)
         5    1  transport id (0 = UnixRights, 1 = PidfdGetfd, 2 = WinDuplicate)
         6    2  flags (bit 0: transport control frame; bit 1: sealed shared-memory
                     payload; bit 2: group, see below; others must be 0)
         8    4  fd count
        12    4  aux length   (transport data: fd references, padding)
        16    8  payload length
        24       aux, then payload

In-band fds (SCM_RIGHTS) ride on bytes of the frame they belong to, except
in a group (`FLAG_GROUP`): one write of several frames whose fds all ride
on its first byte; each frame of it but the last carries the flag, saying
that fds which arrived with its bytes beyond its own belong to the frames
after it, in order.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from ._errors import LimitExceeded, ProtocolError

if TYPE_CHECKING:
    from ._budget import Budget

__all__ = [
    "FLAG_CONTROL",
    "FLAG_GROUP",
    "FLAG_SHARED",
    "HEADER_SIZE",
    "MAGIC",
    "SCM_MAX_FD",
    "SHARED_DESCRIPTOR",
    "VERSION",
    "Decoder",
    "Frame",
    "header_tag",
    "pack_header",
    "pack_tagged",
]

MAGIC: Final = b"FDCH"
VERSION: Final = 1
FLAG_CONTROL: Final = 1
#: A data frame whose payload is in its last fd, a sealed memfd: the frame's
#: own payload is only `SHARED_DESCRIPTOR` (the memfd's size).
FLAG_SHARED: Final = 2
SHARED_DESCRIPTOR: Final = struct.Struct("<Q")
#: Set on each frame of a group but the last: the fds that arrived with this
#: frame's bytes beyond its own are the next frames', in order (`send_many`).
#: An older receiver refuses it ("unknown frame flags"): it cannot misread it.
FLAG_GROUP: Final = 4
_HEADER = struct.Struct("<4sBBHIIQ")
HEADER_SIZE: Final = _HEADER.size
_pack = _HEADER.pack
# The same header with magic, version, transport id and flags read as one
# number, so the hot path checks them with a single comparison.
_FAST = struct.Struct("<QIIQ")
_fast_unpack_from = _FAST.unpack_from
#: ``pack_tagged(tag, nfds, aux_len, payload_len)``: a data frame's header from
#: its `header_tag`, in one call (the channels' hot paths use it).
pack_tagged: Final = _FAST.pack

#: The most fds one ``sendmsg`` may carry on Linux (``EINVAL`` above it);
#: a frame whose in-band fds need more goes out in batches of this size,
#: each riding on bytes of its own frame.
SCM_MAX_FD: Final = 253

#: Frames up to this size (header included) are parsed out of the shared read
#: buffer; larger ones get buffers of their own that reads go straight into.
INLINE_LIMIT: Final = 64 * 1024
#: The read buffer a decoder starts with and goes back to when idle
#: (`Decoder.shrink`); it doubles, up to twice `INLINE_LIMIT`, while frames
#: or reads need more (so 10,000 idle connections cost 160 MiB of buffers,
#: not 1.3 GB).
FIRST_BUFFER: Final = 16 * 1024
#: Control frames are the transports' own small messages (acknowledgements).
MAX_CONTROL_PAYLOAD: Final = 64 * 1024


def pack_header(
    wire_id: int, nfds: int, aux_len: int, payload_len: int, *, control: bool = False, flags: int = 0
) -> bytes:
    """Return the 24-byte header of one frame."""
    flags |= FLAG_CONTROL if control else 0
    return _pack(MAGIC, VERSION, wire_id, flags, nfds, aux_len, payload_len)


def header_tag(wire_id: int, flags: int = 0) -> int:
    """The header's first 8 bytes (magic, version, transport, *flags*) as one number."""
    tag: int = _FAST.unpack(_pack(MAGIC, VERSION, wire_id, flags, 0, 0, 0))[0]
    return tag


class Frame:
    """One decoded frame.

    ``fds`` are the in-band fd numbers that arrived with the frame, in order;
    whoever takes the frame from `Decoder.next_frame` owns them.
    """

    __slots__ = ("aux", "control", "fds", "nfds", "payload", "shared", "start")

    def __init__(
        self,
        control: bool,
        nfds: int,
        aux: bytes,
        payload: bytes | bytearray | memoryview,
        fds: list[int],
        start: int = 0,
        shared: bool = False,
    ) -> None:
        self.control = control
        #: `FLAG_SHARED`: the payload is the last fd's sealed memfd.
        self.shared = shared
        self.nfds = nfds
        self.aux = aux
        self.payload = payload
        self.fds = fds
        #: The stream offset of the frame's first byte.
        self.start = start

    def __repr__(self) -> str:
        return (
            f"Frame(control={self.control}, nfds={self.nfds}, aux={len(self.aux)}B, "
            f"payload={len(self.payload)}B, fds={self.fds})"
        )


#: What a large frame's payload buffer may hold beyond the bytes that
#: arrived: it starts at this size and grows as the bytes come (to twice
#: what arrived, at least by this much), so a peer that declares a large
#: payload and then drips costs this, not the size it declared.


class _Charged(Frame):
    """A `Frame` whose fds a `Budget` counts until the frame is taken (`Decoder.took`)."""

    __slots__ = ()


GROW_AHEAD: Final = 256 * 1024


class _Big:
    """A frame too large for the shared buffer, being read into its own buffers.

    The payload buffer grows as its bytes arrive (see `GROW_AHEAD`), unless
    it is a caller's (``recv_into``), which has room for all of it.
    """

    __slots__ = (
        "aux",
        "aux_fill",
        "control",
        "end",
        "flags",
        "nfds",
        "payload",
        "payload_fill",
        "payload_len",
        "start",
    )

    def __init__(
        self,
        flags: int,
        nfds: int,
        aux_len: int,
        payload_len: int,
        start: int,
        into: memoryview | None = None,
    ) -> None:
        self.flags = flags
        self.control = bool(flags & FLAG_CONTROL)
        self.nfds = nfds
        self.aux = bytearray(aux_len)
        self.payload_len = payload_len
        # The payload's buffer: a caller's (recv_into), or its own.
        self.payload: bytearray | memoryview = (
            bytearray(min(payload_len, GROW_AHEAD)) if into is None else into[:payload_len]
        )
        self.aux_fill = 0
        self.payload_fill = 0
        self.start = start
        self.end = start + HEADER_SIZE + aux_len + payload_len

    def _grow(self, fill: int) -> None:
        """Make room past *fill* bytes: twice *fill*, `GROW_AHEAD` more at least, at most as declared."""
        have = len(self.payload)
        want = min(self.payload_len, max(2 * fill, fill + GROW_AHEAD))
        if want <= have or isinstance(self.payload, memoryview):  # a caller's (recv_into) fits it all
            return
        try:
            self.payload.extend(bytes(want - have))
        except BufferError:  # a view of it is still alive somewhere: grow a copy
            grown = bytearray(want)
            grown[:have] = self.payload
            self.payload = grown

    def feed(self, data: memoryview) -> None:
        """Copy already-buffered bytes of this frame in (only on entering this state)."""
        take = min(len(data), len(self.aux) - self.aux_fill)
        self.aux[self.aux_fill : self.aux_fill + take] = data[:take]
        self.aux_fill += take
        rest = data[take:]
        fill = self.payload_fill
        if fill + len(rest) > len(self.payload):
            self._grow(fill + len(rest))
        self.payload[fill : fill + len(rest)] = rest
        self.payload_fill += len(rest)

    def space(self) -> memoryview:
        if self.aux_fill < len(self.aux):
            return memoryview(self.aux)[self.aux_fill :]
        if self.payload_fill == len(self.payload):
            self._grow(self.payload_fill)
        return memoryview(self.payload)[self.payload_fill :]

    def advance(self, n: int) -> None:
        if self.aux_fill < len(self.aux):
            self.aux_fill += n
        else:
            self.payload_fill += n

    @property
    def complete(self) -> bool:
        return self.payload_fill == self.payload_len and self.aux_fill == len(self.aux)


class Decoder:
    """Turns the bytes and fds read from a stream into `Frame` objects.

    Limits are checked on the header, before any buffer is sized from it.
    Each fd is matched to the frame it rode on by stream position: an fd must
    have arrived in a read that overlapped its frame's bytes, and a frame
    that is complete must have exactly the in-band fds it declared.  On any
    violation `ProtocolError` is raised (then, and by every later
    `next_frame`, after the frames decoded before it); `take_fds` hands back
    every fd still held so the caller can close them.
    """

    def __init__(
        self,
        *,
        wire_id: int,
        in_band: bool,
        max_payload: int,
        max_fds: int,
        max_aux: int,
        transport_name: str = "",
        lone_frames: bool = True,
        max_held_fds: int | None = None,
        frame_timeout: float | None = None,
        budget: Budget | None = None,
    ) -> None:
        self._wire_id = wire_id
        self._in_band = in_band
        self._max_payload = max_payload
        self._max_fds = max_fds
        self._max_aux = max_aux
        self._transport_name = transport_name or f"transport {wire_id}"
        self._data_tag = header_tag(wire_id)
        self._group_tag = self._data_tag | FLAG_GROUP << 48
        # What the one-frame fast path accepts, folded into two bounds: an
        # inline frame within max_payload, and in-band fds within max_fds.
        self._fast_max_payload = min(max_payload, INLINE_LIMIT - HEADER_SIZE)
        self._fast_max_fds = max_fds if in_band else 0
        # A session that must see every frame (one that sends fds out of band)
        # turns the lone-frame shortcut off: its frames always queue.
        self._lone = lone_frames
        # Small until a read needs more: an idle connection costs this much.
        self._buf = bytearray(FIRST_BUFFER)
        self._mv = memoryview(self._buf)
        #: True while the read buffer is larger than `FIRST_BUFFER`: a read
        #: then does not block (the channels' loops), so that `shrink` can
        #: give it back before waiting.
        self.grown = False
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # end of valid data in _buf
        self._received = 0  # stream offset just past everything received
        self._big: _Big | None = None
        #: fds of a frame that could not be queued nor given back (out of memory twice).
        self._stray: list[int] | None = None
        # The fds taken for the frame being made, from the moment they leave
        # the held batches until it is queued or they are given back: a
        # second signal handler's error while the first is handled (a storm)
        # can cut any call, so they are kept where a store, not a call, puts
        # them.  It may be the same list as a batch's (given back, then
        # cut): _flight() counts it only where it is not also listed.
        self._taking: list[int] | None = None
        # True after a data frame of a group (FLAG_GROUP): the next frame's
        # fds may have arrived ahead of its bytes.
        self._ahead = False
        # recv_into(): the caller's buffer for the next data frame's payload.
        self._into: memoryview | None = None
        self._lone_saved = lone_frames
        # One entry per read that brought fds: [fds, stream offset where the
        # read began, where it ended].
        self._fds: deque[list[Any]] = deque()
        #: Complete frames in stream order; take them with `next_frame` (or
        #: ``popleft()``: a channel's hot path reads the queue directly).
        self.frames: deque[Frame] = deque()
        # The stream offset of the earliest control frame queued since the
        # last `take_control_frames`, or None: that call then looks only at
        # the frames from there on, so a peer streaming data frames that
        # nobody receives yet does not make every call scan the whole queue.
        self._control_from: int | None = None
        #: The protocol error met, if any (a plain attribute: recv() checks
        #: it on every call).
        self.error: ProtocolError | None = None
        #: True once `receive_eof` was called.
        self.eof = False
        #: What the I/O layer's reads left between the system call and this
        #: decoder (raw results, then lists of fd numbers): fds listed here
        #: are owned here until the channel clears the list.  A signal
        #: handler's error raised right after a read returned finds them.
        self.landed: list[Any] = []
        #: The most fds held for frames not yet taken (`default_max_held_fds`).
        self.max_held_fds = default_max_held_fds(max_fds) if max_held_fds is None else max_held_fds
        #: Seconds an unfinished frame may take to complete, or None.
        self.frame_timeout = frame_timeout
        #: The `Budget` this decoder's holdings are charged to, or None.
        self.budget = budget
        # Whether every read must be looked at for what it leaves unfinished
        # (a budget to charge, a deadline to set), not only reads with fds.
        self._watch = budget is not None or frame_timeout is not None
        self._charged = (0, 0)  # what the budget was last charged: (fds, bytes)
        # Queued frames are of a subclass when a budget counts them: the
        # compiled path takes only plain `Frame` objects off the queue, so
        # every charged frame leaves through `took`.
        self._frame = Frame if budget is None else _Charged
        #: Set (by `evict`, from any thread) when a `Budget` wants all back.
        self.evicted: LimitExceeded | None = None
        #: A weak method the channel sets: called by `evict` to clean up or wake.
        self.on_evict: Any = None
        #: Who the peer is, for a `Budget`'s fairness (its uid), or None.
        self.peer_group: object = None
        self._unfinished_at = -1  # stream offset of the frame the deadline is for
        self._arrived: dict[int, float] = {}  # stream offset of a read with fds -> when it came
        #: The `time.monotonic` time by which the unfinished frame must be
        #: complete (``frame_timeout``), or None: nothing is unfinished, or no
        #: frame timeout applies.
        self.deadline: float | None = None

    # -- reading side ---------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Return the writable buffer the next read should fill (never empty)."""
        big = self._big
        if big is not None:
            return big.space()
        if not self._end:
            return self._mv  # the whole buffer, without making a slice
        if self._end == len(self._buf):
            n = self._end - self._start
            if n * 2 > len(self._buf) and len(self._buf) < 2 * INLINE_LIMIT:
                # A frame longer than the buffer, or reads that fill it:
                # twice the size, up to the full one, at which unparsed data
                # (less than a header or an inline frame) always leaves room
                # once moved.
                self._buf = bytearray(min(2 * len(self._buf), 2 * INLINE_LIMIT))
                self._buf[:n] = self._mv[self._start : self._end]
                self._mv = memoryview(self._buf)
                self.grown = True
            else:
                self._buf[:n] = self._mv[self._start : self._end]
            self._start, self._end = 0, n
        return self._mv[self._end :]

    def shrink(self) -> None:
        """Give the read buffer back down to `FIRST_BUFFER` if nothing is in it (call when about to wait)."""
        if not self._end and self.grown and self._big is None and not self.landed:
            self._buf = bytearray(FIRST_BUFFER)
            self._mv = memoryview(self._buf)
            self.grown = False

    def buffer_updated(self, nbytes: int, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Record that *nbytes* were read into the last `get_buffer` result.

        *fds* are the fd numbers that arrived with those bytes; the decoder
        owns them from now on.  Raises `ProtocolError` on malformed input.
        """
        one = self.buffer_updated_one(nbytes, fds)
        if one is not None:
            start = self._received - nbytes
            self.frames.append(self._frame(False, len(one[1]), b"", one[0], list(one[1]), start))
            if self._watch:
                self._settle()

    def buffer_updated_one(
        self, nbytes: int, fds: list[int] | tuple[int, ...] = ()
    ) -> tuple[bytes, list[int] | tuple[int, ...]] | None:
        """`buffer_updated`, returning a lone plain frame instead of queueing it.

        When nothing was buffered or queued and this read is exactly one
        data frame without transport data, returns its ``(payload, fds)``
        (the fds, as given, now the caller's) and queues nothing: the common case,
        without a `Frame` object.  Otherwise records the read exactly as
        `buffer_updated` does and returns None.
        """
        if nbytes <= 0:
            raise ValueError("buffer_updated needs nbytes > 0; report EOF with receive_eof()")
        if (
            self._lone
            and not self._end
            and not self.frames
            and self._big is None
            and not self._fds
            and self.error is None
        ):
            # Fewer than HEADER_SIZE new bytes leave stale ones behind them,
            # but then nbytes == HEADER_SIZE + payload_len cannot hold.
            tag, nfds, aux_len, payload_len = _fast_unpack_from(self._buf)
            if (
                nbytes == HEADER_SIZE + payload_len
                and tag == self._data_tag
                and nfds == len(fds)
                and nfds <= self._fast_max_fds
                and payload_len <= self._fast_max_payload
                and not aux_len
            ):
                self._received += nbytes
                return self._mv[HEADER_SIZE:nbytes].tobytes(), fds
        self._record(nbytes, fds)
        return None

    def _record(self, nbytes: int, fds: list[int] | tuple[int, ...]) -> None:
        begin = self._received
        self._received = end = begin + nbytes
        if fds:
            self._park(fds, begin, end)
        if self.evicted is not None and self.error is None:
            self._failed(self.evicted)  # a Budget asked for it all back (any thread)
        if self.error is not None:
            if self._watch:
                self._settle()
            return
        try:
            big = self._big
            if big is not None:
                big.advance(nbytes)
                if big.complete:
                    self._finish_big(big)
            else:
                self._end += nbytes
                self._parse()
            if fds and self._fds:
                self._check_held()
            if fds or self._watch:
                self._account(bool(fds))
        except ProtocolError as exc:
            self._failed(exc)

    def _park(self, fds: list[int] | tuple[int, ...], begin: int, end: int) -> None:
        self._fds.append([fds if fds.__class__ is list else list(fds), begin, end])
        if self.frame_timeout is not None:
            self._arrived[begin] = time.monotonic()  # when these fds came: their deadline's start

    def _failed(self, exc: ProtocolError) -> None:
        # Kept for later calls without the frames it passed through: their
        # locals (a payload buffer) would live as long as the error does.
        self.error = exc.with_traceback(None)
        self._big = None  # a frame that will never complete: its buffer goes now
        if isinstance(exc, LimitExceeded):
            # Over a holding limit: what is held goes at once, the frames
            # queued before it too (their fds are what is over).
            self._unqueue()
        if self._watch:
            self._settle()

    def _unqueue(self) -> None:
        """Drop the queued frames, their fds left held for `take_fds`."""
        for frame in self.frames:
            if frame.fds:
                self._fds.append([frame.fds, frame.start, frame.start + 1])
                frame.fds = []
        self.frames.clear()
        self._control_from = None

    def _account(self, new_fds: bool) -> None:
        """Check what this read leaves held against the limits; charge the budget; set the deadline."""
        if new_fds or self.budget is not None:
            held = self.held_fds()
            if new_fds and held > self.max_held_fds:
                raise LimitExceeded(
                    f"the peer sent {held} fds for messages not received yet; max_held_fds is "
                    f"{self.max_held_fds}"
                )
            if self.budget is not None:
                self._charge(held, True)
        if self.frame_timeout is not None:
            self._time_unfinished()

    def _settle(self) -> None:
        """Charge the budget what is held now; never refuses this decoder (if it grew, others may go)."""
        if self.budget is not None:
            self._charge(self.held_fds(), "others")
        if self.frame_timeout is not None:
            self._time_unfinished()

    def _charge(self, held: int, check: bool | Literal["others"]) -> None:
        big = self._big
        memory = len(big.payload) if big is not None and big.payload.__class__ is bytearray else 0
        if (held, memory) != self._charged:
            self._charged = (held, memory)
            self.budget.charge(self, held, memory, check=check)  # type: ignore[union-attr]

    def took(self, nfds: int) -> None:
        """A queued frame with *nfds* fds was taken (they are the caller's): the budget lets go of them."""
        if nfds and self.budget is not None:
            self._charge(self._charged[0] - nfds, False)

    def fail_now(self, exc: ProtocolError) -> None:
        """Stop with *exc*, queued frames and buffers dropped now; the fds stay for `take_fds`."""
        if self.error is None:
            self._failed(exc)

    def evict(self, exc: LimitExceeded) -> None:
        """A `Budget` wants everything back: fail with *exc* (any thread; the owner's next step does it)."""
        self.evicted = exc
        hook = self.on_evict() if self.on_evict is not None else None
        if hook is not None:
            hook(exc)

    def _time_unfinished(self) -> None:
        """Start the frame timeout when a new frame is left unfinished; clear it at a boundary."""
        big = self._big
        at = -1  # nothing unfinished, or (an error) nothing more will complete: no deadline
        if self.error is None:
            if big is not None:
                at = big.start
            elif self._start != self._end:
                at = self._received - (self._end - self._start)
        arrived = None
        if self.error is None and self._fds:
            # fds parked ahead (a group's, for frames not begun): their time
            # runs from the read that brought the oldest, however many
            # frames complete meanwhile.
            parked = self._fds[0][1]
            if at < 0 or parked < at:
                at = parked
                arrived = self._arrived.get(parked)
        if at < 0:
            self._unfinished_at = -1
            self.deadline = None
            self._arrived.clear()
        elif at != self._unfinished_at:
            self._unfinished_at = at
            start = time.monotonic() if arrived is None else arrived
            self.deadline = start + self.frame_timeout  # type: ignore[operator]
            for gone in [k for k in self._arrived if k < at]:
                del self._arrived[gone]

    def _check_held(self) -> None:
        """Refuse more buffered fds than the frame in progress may carry.

        Otherwise a peer could declare one fd and a long payload, then drip
        bytes carrying 253 fds each, and fill this process's fd table long
        before the frame completes and its count is compared.
        """
        held = sum(len(batch[0]) for batch in self._fds)
        # In a group, fds for the frames after this one ride ahead: at most
        # one write's worth (SCM_MAX_FD) more than the frame itself declares.
        ahead = SCM_MAX_FD if self._ahead else 0
        if not self._in_band:
            allowed = 0
        elif self._big is not None:
            allowed = self._big.nfds + (SCM_MAX_FD if self._big.flags & FLAG_GROUP else ahead)
        elif self._end - self._start >= HEADER_SIZE:
            tag, nfds = _fast_unpack_from(self._buf, self._start)[:2]  # validated by _parse
            allowed = nfds + (SCM_MAX_FD if (tag >> 48) & FLAG_GROUP else ahead)
        else:  # the header is not in yet: no frame may carry more than max_fds
            if held > self._max_fds + ahead:
                raise LimitExceeded(f"peer sent {held} fds for one frame; max_fds is {self._max_fds}")
            return
        if held > allowed:
            raise ProtocolError(
                f"more fds arrived than the frame declared ({allowed}): {held} held"
                if self._in_band
                else f"{self._transport_name} carries no in-band fds, but some arrived"
            )

    def receive_eof(self) -> None:
        """Record that the stream ended.

        Raises `ProtocolError` if it ended inside a frame or with fds that
        belong to no frame.
        """
        self.eof = True
        if self.evicted is not None and self.error is None:
            self._failed(self.evicted)
        if self.error is not None:
            return
        if self._big is not None or self._end > self._start:
            self.error = ProtocolError("peer closed the stream in the middle of a message")
            self._big = None  # it will never complete: its buffer goes now
        elif self._fds:
            self.error = ProtocolError("peer closed the stream after sending fds that belong to no frame")
        if self._watch:
            self._settle()

    def held_fds(self) -> int:
        """How many fds this decoder holds: for the frame in progress, read ahead, and in queued frames."""
        held = sum(len(batch[0]) for batch in self._fds) if self._fds else 0
        return held + (sum(len(frame.fds) for frame in self.frames) if self.frames else 0)

    @property
    def received(self) -> int:
        """The stream offset just past everything received."""
        return self._received

    @property
    def unread_bytes(self) -> int:
        """Bytes received and not taken yet: queued frames and a partial one."""
        if self.frames:
            return self._received - self.frames[0].start
        if self._big is not None:
            return self._received - self._big.start
        return self._end - self._start

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame and no stray fd is buffered."""
        return self._big is None and self._start == self._end and not self._fds

    def set_into(self, into: memoryview | None) -> None:
        """Put the payload of the next data frame parsed into *into* (a writable byte view).

        Only a payload that fits goes there (`Frame.payload` is then a view
        of it); call ``set_into(None)`` once the frame was taken or the
        receive ended: whatever still points into the caller's buffer (a
        frame half read, a frame queued but not returned) moves to buffers
        of its own, so the caller may reuse theirs at once.
        """
        if into is not None:
            self._into = into
            # The lone-frame shortcut hands out bytes: off while a buffer waits.
            self._lone = False
            return
        self._into = None
        self._lone = self._lone_saved
        big = self._big
        if big is not None and big.payload.__class__ is memoryview:
            big.payload = bytearray(big.payload)
            if self._watch:
                self._settle()  # a buffer of its own now: the budget pays for it
        for frame in self.frames:
            if frame.payload.__class__ is memoryview:
                frame.payload = bytes(frame.payload)

    def expire(self) -> LimitExceeded:
        """Fail the unfinished frame: its deadline (``frame_timeout``) passed; return the error.

        Like any protocol error it is raised once the frames before it are
        out (`next_frame`); the frame's buffer goes now, and `take_fds`
        hands back the fds it held.
        """
        exc = LimitExceeded(
            f"the peer left a message unfinished for longer than frame_timeout={self.frame_timeout} s"
        )
        if self.error is None:
            self.error = exc
        self._big = None
        if self._watch:
            self._settle()
        return exc

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more data is needed.

        Raises the stored `ProtocolError` once the frames before it are out.
        """
        if self.frames:
            frame = self.frames.popleft()
            if frame.__class__ is not Frame:
                self.took(len(frame.fds))
            return frame
        if self.error is not None:
            raise self.error
        return None

    def push_back(self, payload: bytes, fds: Sequence[int]) -> None:
        """Queue a lone frame that `buffer_updated_one` returned after all (its fds back to the decoder)."""
        start = self._received - HEADER_SIZE - len(payload)
        self.frames.append(self._frame(False, len(fds), b"", payload, list(fds), start))
        if self._watch:
            self._settle()

    def take_control_frames(self) -> list[Frame]:
        """Remove and return the queued control frames, leaving data frames queued.

        Costs the frames queued since the first control frame that arrived
        after the previous call, not the whole queue.
        """
        since = self._control_from
        if since is None:
            return []
        self._control_from = None
        frames = self.frames
        tail: list[Frame] = []
        while frames and frames[-1].start >= since:
            tail.append(frames.pop())
        tail.reverse()
        control = [f for f in tail if f.control]
        frames.extend(f for f in tail if not f.control)
        return control

    def release(self) -> None:
        """Drop every buffer (a closed channel reads no more); the fds must have been taken first."""
        self._big = None
        self.frames.clear()
        self.error = None  # its traceback's frames may hold the channel that owns this decoder
        self._buf = bytearray()
        self._mv = memoryview(self._buf)
        self._start = self._end = 0
        self.grown = False
        if self._watch:
            self._settle()

    def fd_lists(self) -> list[list[int]]:
        """The lists that hold this decoder's fds (buffered and in queued frames), left in place.

        For a caller that must move them out one by one (`fdchannel._ownedfd.adopt_all`).
        """
        stray = [self._stray] if self._stray else []
        held = [batch[0] for batch in self._fds]
        return held + [frame.fds for frame in self.frames] + stray + self._flight()

    def _flight(self) -> list[list[int]]:
        """``[_taking]`` when it holds fds listed nowhere else (the same list object), else ``[]``."""
        taking = self._taking
        if not taking or taking is self._stray:
            return []
        if any(batch[0] is taking for batch in self._fds):
            return []
        return [] if any(frame.fds is taking for frame in self.frames) else [taking]

    def take_fds(self) -> list[int]:
        """Give up and return every fd still held (buffered and in queued frames)."""
        out = [fd for batch in self._fds for fd in batch[0]]
        for taking in self._flight():
            out += taking
        self._taking = None
        self._fds.clear()
        if self._stray:
            out += self._stray
        self._stray = None
        for frame in self.frames:
            out.extend(frame.fds)
            frame.fds = []
        self.frames.clear()
        self._control_from = None
        if self._watch:
            self._settle()
        return out

    # -- parsing ----------------------------------------------------------

    def _parse(self) -> None:  # noqa: C901, PLR0912, PLR0915 - the hot path, inline
        buf = self._buf
        frame = self._frame
        start, end = self._start, self._end
        try:
            while end - start >= HEADER_SIZE:
                tag, nfds, aux_len, payload_len = _fast_unpack_from(buf, start)
                flags = 0
                if tag == self._group_tag:  # a group's frame: as plain as a plain one
                    tag, flags = self._data_tag, FLAG_GROUP
                if (
                    tag != self._data_tag
                    or payload_len > self._max_payload
                    or nfds > self._max_fds
                    or aux_len > self._max_aux
                ):
                    header = _HEADER.unpack_from(buf, start)
                    self._check_header(*header)  # raises, or accepts a control frame
                    flags = header[3]
                total = HEADER_SIZE + aux_len + payload_len
                frame_start = self._received - (end - start)
                into = self._into
                if into is not None and not flags & (FLAG_CONTROL | FLAG_SHARED) and payload_len <= len(into):
                    self._into = None  # one frame only: the next one recv_into returns
                else:
                    into = None
                if total > INLINE_LIMIT:
                    big = _Big(flags, nfds, aux_len, payload_len, frame_start, into)
                    stop = min(end, start + total)
                    big.feed(self._mv[start + HEADER_SIZE : stop])
                    start = stop
                    self._big = big
                    if big.complete:
                        self._finish_big(big)
                    continue
                if end - start < total:
                    break
                body = start + HEADER_SIZE
                aux = bytes(buf[body : body + aux_len]) if aux_len else b""
                payload: bytes | memoryview
                if into is None:
                    payload = self._mv[body + aux_len : start + total].tobytes()
                else:
                    payload = into[:payload_len]
                    payload[:] = self._mv[body + aux_len : start + total]
                fds = (
                    self._take_inband(nfds, frame_start, frame_start + total, flags & FLAG_GROUP)
                    if nfds or self._fds
                    else []
                )
                queued = None
                try:
                    queued = frame(
                        flags & FLAG_CONTROL != 0,
                        nfds,
                        aux,
                        payload,
                        fds,
                        frame_start,
                        flags & FLAG_SHARED != 0,
                    )
                    self.frames.append(queued)
                except BaseException:
                    # Struck as append() returned, the frame is queued and
                    # the fds are its own; before, they go back to those held.
                    # The test and the store call nothing (see _taking).
                    if queued is not None and self.frames and self.frames[-1] is queued:
                        self._taking = None
                    else:
                        self._give_back(fds, frame_start)
                    raise
                self._taking = None
                if flags & FLAG_CONTROL and self._control_from is None:
                    self._control_from = frame_start
                start += total
        finally:
            if start == end:
                start = end = 0
            self._start, self._end = start, end

    def _finish_big(self, big: _Big) -> None:
        self._big = None
        fds = self._take_inband(big.nfds, big.start, big.end, big.flags & FLAG_GROUP)
        queued = None
        try:
            queued = self._frame(
                big.control,
                big.nfds,
                bytes(big.aux),
                big.payload,
                fds,
                big.start,
                bool(big.flags & FLAG_SHARED),
            )
            self.frames.append(queued)
        except BaseException:
            # As in _parse.
            if queued is not None and self.frames and self.frames[-1] is queued:
                self._taking = None
            else:
                self._give_back(fds, big.start)
            raise
        self._taking = None
        if big.control and self._control_from is None:
            self._control_from = big.start

    def _check_header(
        self, magic: bytes, version: int, wire_id: int, flags: int, nfds: int, aux_len: int, payload_len: int
    ) -> None:
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r}): the peer is not an fdchannel")
        if version != VERSION:
            raise ProtocolError(f"peer speaks wire version {version}, this side speaks {VERSION}")
        if wire_id != self._wire_id:
            raise ProtocolError(
                f"peer uses transport id {wire_id}, this channel uses {self._transport_name} "
                f"(id {self._wire_id}): both ends must use the same transport"
            )
        if flags:
            _check_flags(flags, nfds, payload_len)
            if flags & FLAG_CONTROL:
                return
        if payload_len > self._max_payload:
            raise LimitExceeded(
                f"peer declared a {payload_len}-byte payload; max_payload is {self._max_payload}"
            )
        if nfds > self._max_fds:
            raise LimitExceeded(f"peer declared {nfds} fds; max_fds is {self._max_fds}")
        if aux_len > self._max_aux:
            raise LimitExceeded(
                f"peer declared {aux_len} bytes of transport data; the limit is {self._max_aux}"
            )

    def _take_inband(self, nfds: int, start: int, end: int, group: int | bool = False) -> list[int]:
        """Take the in-band fds of the frame at stream offsets [start, end) (*group*: its FLAG_GROUP)."""
        want = nfds if self._in_band else 0
        queue = self._fds
        ahead = self._ahead
        self._ahead = bool(group)
        if want and len(queue) == 1:
            # The common case: one read brought exactly this frame's fds.
            batch = queue[0]
            if len(batch[0]) == want and start < batch[2] <= end:
                fds: list[int] = batch[0]
                self._taking = fds
                del queue[0]  # not popleft(): no signal handler runs between the store and this
                return fds
        if want and queue and (group or ahead):
            # A group's frame: its fds at the front of one read's batch, the
            # rest of that batch the next frames'.
            batch = queue[0]
            held: list[int] = batch[0]
            if len(held) > want and (ahead or start < batch[2]) and (group or batch[2] > end):
                mine, rest = held[:want], held[want:]  # both made before either is kept
                self._taking = mine
                batch[0] = rest
                return mine
        return self._take_batches(want, nfds, start, end, ahead, bool(group))

    def _take_batches(
        self, want: int, nfds: int, start: int, end: int, ahead: bool = False, group: bool = False
    ) -> list[int]:
        """`_take_inband` in general: *want* fds from one or more reads' batches.

        *ahead*: the frame before was a group's, so this frame's fds may have
        arrived with its bytes; *group*: this frame is one, so fds beyond its
        own that arrived with its bytes are the next frames'.
        """
        queue = self._fds
        taken: list[int] = []
        try:
            while len(taken) < want:
                if not queue:
                    raise ProtocolError(f"frame declared {want} fds but {len(taken)} arrived with it")
                batch = queue[0]
                fds, _begin, read_end = batch
                if read_end <= start and not ahead:
                    raise ProtocolError("fds arrived with bytes before the frame they were counted for")
                need = want - len(taken)
                # Every fd in exactly one place at each point where an
                # allocation can fail or a signal handler run (the end of a
                # C call): taken first, then struck from the queue, by
                # statements that call nothing.
                if len(fds) <= need:
                    taken = taken + fds if taken else fds
                    self._taking = taken
                    del queue[0]
                else:
                    mine, rest = fds[:need], fds[need:]
                    taken = taken + mine
                    self._taking = taken
                    batch[0] = rest
            # fds read together with bytes of the next frame may be that
            # frame's; fds that arrived no later than this frame's last byte
            # are surplus, unless this frame leads more of its group.
            if queue and queue[0][2] <= end and not group:
                raise ProtocolError(
                    f"more fds arrived than the frame declared ({nfds})"
                    if self._in_band
                    else f"{self._transport_name} carries no in-band fds, but some arrived"
                )
        except BaseException:  # ProtocolError, or MemoryError partway
            self._give_back(taken, start)
            raise
        return taken

    def _give_back(self, fds: list[int], start: int) -> None:
        """Hold *fds*, taken for the frame at *start* but not queued: take_fds() releases them too."""
        if fds:
            try:
                self._fds.appendleft([fds, start, start + 1])
            except BaseException:
                # Out of memory again: kept where a store needs no memory
                # (_taking holds them until that store is done; the same
                # list in both, or the numbers in _stray alone, never both
                # as two lists).
                if self._stray is None:
                    self._stray = fds
                else:
                    self._stray = self._stray + fds
                    self._taking = None
                raise
        self._taking = None


def default_max_held_fds(max_fds: int) -> int:
    """The default ``max_held_fds`` for *max_fds*: one whole message, plus one write's worth read ahead.

    A group (`send_many`) brings up to `SCM_MAX_FD` fds in one write for
    the messages after the one being read.
    """
    return max_fds + SCM_MAX_FD


def _check_flags(flags: int, nfds: int, payload_len: int) -> None:
    """Refuse unknown flags and frames whose flags do not fit their contents.

    A control frame carries no fds and at most `MAX_CONTROL_PAYLOAD`, and
    is never part of a group (`FLAG_GROUP`); a `FLAG_SHARED` frame carries
    the memfd as its last fd and its size as the payload, and is not part
    of a group either.
    """
    if flags & ~(FLAG_CONTROL | FLAG_SHARED | FLAG_GROUP):
        raise ProtocolError(f"unknown frame flags {flags:#x}")
    if flags & FLAG_CONTROL:
        if nfds or payload_len > MAX_CONTROL_PAYLOAD or flags & (FLAG_SHARED | FLAG_GROUP):
            raise ProtocolError("malformed control frame")
        return
    if flags & FLAG_SHARED and flags & FLAG_GROUP:
        # send_many() sends a SealedMemory payload as a message of its own.
        raise ProtocolError("malformed frame: a shared-memory frame is never part of a group")
    if flags & FLAG_SHARED and (not nfds or payload_len != SHARED_DESCRIPTOR.size):
        raise ProtocolError(
            f"malformed shared-memory frame ({nfds} fds, {payload_len}-byte descriptor): it must "
            f"carry the memfd as an fd and a {SHARED_DESCRIPTOR.size}-byte size"
        )
