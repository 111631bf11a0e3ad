"""Run one call with its k-th memory allocation failing, for each k in turn (a child process).

``python tests/_faults.py PATH SCENARIO COUNT [WIDTH [MODE]]``: PATH is
``compiled`` or ``pure``; SCENARIO one of `SCENARIOS`.  For each k below
COUNT a fresh channel pair runs the scenario with allocation k failing (and
the WIDTH - 1 after it: a clean-up that allocates fails too)
(``_testcapi.set_nomemory``: CPython's own fault injection, every allocator
domain), or in ``signals`` MODE with a KeyboardInterrupt at the k-th point
where a signal handler runs (WIDTH 2: and a second one at the next point),
or in ``alarms`` MODE a TimeoutError there (what a ``SIGALRM`` handler
raises: an `OSError` like the kernel's own, told apart by the traceback),
and then, with memory back, checks what must hold after any error:

- every message arrives, or those before a reported break (`ChannelBroken`)
  do: never a silent gap, never a wrong fd;
- closing everything releases every fd exactly once: none is left open
  (the fd table is as before) and none is closed twice (fds opened after
  the failing call, which would take any number freed too early, stay
  open);
- a failed send's exception does not hide what left: ``characters_written``
  (``messages_taken`` for send_many) says so, or, unknown, the channel
  refuses a retry.

It prints one JSON line: how many runs ended in MemoryError, how many
succeeded, the last k that failed, and each broken rule.  A child, because a failing allocation in
the wrong place can crash the interpreter.
"""

from __future__ import annotations

import _testcapi  # type: ignore[import-not-found]
import asyncio
import dis
import gc
import json
import os
import socket
import sys
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any

from fdchannel import (
    Channel,
    ChannelBroken,
    Message,
    ProtocolError,
    _fastpath,
    recv_channel,
    send_channel,
    shm,
)
from fdchannel.aio import AsyncChannel

X, Y, Z, S = b"x" * 20, b"y" * 20, b"z" * 100_000, b"s" * 5000

#: What the failing call is, and the messages the receiving end must end up with.
SCENARIOS: dict[str, list[bytes]] = {
    "recv": [X],  # one lone frame: the compiled path's own
    "recv_group": [X, Y],  # a send_many() group in one read
    "recv_big": [Z],  # a frame larger than the read buffer: the Python decoder
    "send": [X],
    "send_many": [X, Y],
    # The same with bytearray payloads: each is held by a view of the call's
    # (`fdchannel._core.hold`), let go on every error path.
    "send_buffer": [X],
    "send_many_buffer": [X, Y],
    "fds": [],  # a received message's .fds made (lazily)
    "close": [],
    "close_one": [],  # a message of one fd: Message.close's own inline close
    "close_many": [],  # more fds than the tuple free lists serve
    "open": [],  # an OwnedFd made into a file object
    "send_channel": [],  # a channel end sent: the peer's once it arrived, else still ours (checked apart)
    "send_channel_aio": [],  # the same with an AsyncChannel end (its gates instead of locks)
    "channel_close": [],  # a Channel closed with output pending and received fds buffered (checked apart)
    "send_shm": [S],  # a payload sent as sealed shared memory (a memfd of its own)
    "recv_shm": [S],
    "recv_refused": [X],  # a pipe posing as a memfd, refused (its fds closed), then a plain message
    "recv_into": [X],  # into the caller's buffer
    "aio_recv": [X],
    "aio_send": [X],
    "aio_send_buffer": [X],
    # The structured twins, taken over from the blocking end: their calls
    # are struck only in this package's frames (trio's own cannot be guarded).
    "trio_recv": [X],
    "trio_send": [X],
    "anyio_recv": [X],
    "anyio_send": [X],
}


#: What a failing step raises: out of memory (io's "can't allocate read lock"
#: is a RuntimeError; fcntl, out of memory as it raises its OSError, returns
#: "error return without exception set", a SystemError), or the interrupt of
#: ``signals`` mode.
FAILURES = (MemoryError, RuntimeError, SystemError, KeyboardInterrupt, TimeoutError)
#: ``memory``: allocation k fails.  ``signals``: a KeyboardInterrupt is
#: raised at the k-th point where CPython 3.11 runs signal handlers (so where
#: a handler's error can strike): a Python function's entry, a loop's jump
#: back, and the end of a call to a C function (its result, if any, dropped).
MODE = sys.argv[5] if len(sys.argv) > 5 else "memory"
#: Set for the structured scenarios: only frames of this package are struck.
OURS_ONLY = len(sys.argv) > 2 and sys.argv[2].startswith(("trio_", "anyio_"))
HARNESS = os.path.abspath(__file__)
_CALL, _JUMP_BACKWARD = dis.opmap["CALL"], dis.opmap["JUMP_BACKWARD"]


class _Interrupter:
    """A tracer raising KeyboardInterrupt at the k-th point a signal handler could run.

    With *twice*, a second handler raises at the next point after that (as
    in a storm of signals, while the code handling the first runs): the
    first raise ends tracing (CPython drops a tracer that raised), so a
    profile function strikes the second time, at the next function entry or
    end of a C call (the points a profiler sees; a loop's jump back it does
    not).
    """

    def __init__(self, k: int, twice: bool = False) -> None:
        self.left = k
        self.twice = twice
        self.entered = 0  # Python frames begun so far
        self.after_call: dict[FrameType, int] = {}  # frame -> self.entered as its CALL began

    def _strike(self) -> None:
        self.left -= 1
        if self.left < 0:
            sys.settrace(None)
            if self.twice:
                sys.setprofile(self.again)
            _raise()

    def again(self, frame: FrameType, event: str, arg: object) -> None:
        if event not in ("call", "c_return") or _spared(frame):
            return
        sys.setprofile(None)
        _raise()

    def enter(self, frame: FrameType, event: str, arg: object) -> object:
        self.entered += 1  # a Python frame: its caller's CALL does not check as it ends
        if _spared(frame):
            return None
        self._strike()  # RESUME: the function's first instruction checks
        frame.f_trace_opcodes = True
        return self.opcode

    def opcode(self, frame: FrameType, event: str, arg: object) -> object:
        if event != "opcode":
            return self.opcode
        began = self.after_call.pop(frame, None)
        if began is not None and began == self.entered:
            self._strike()  # it called a C function: the CALL checks as it ends
        op = frame.f_code.co_code[frame.f_lasti]
        if op == _CALL:
            self.after_call[frame] = self.entered
        elif op == _JUMP_BACKWARD:
            self._strike()
        return self.opcode


def _raise() -> None:
    """The handler's error.  Raised inside a trace function, which CPython
    calls with the interrupted frame: `raised_in_signal_handler` sees a
    handler's, as it would for ``handler(signum, frame)``."""
    if MODE == "alarms":
        raise TimeoutError("a SIGALRM handler's timeout")
    raise KeyboardInterrupt


def _spared(frame: FrameType) -> bool:
    if frame.f_code.co_filename == HARNESS or _unguardable(frame):
        return True
    return OURS_ONLY and not frame.f_globals.get("__name__", "").startswith("fdchannel")


def _unguardable(frame: FrameType | None) -> bool:
    """True where no Python code can keep a handler's error from losing an fd.

    Inside a ``__del__``: a finalizer can be cut short at its very first
    instruction (the compiled path's finalizers are C).  In
    ``_memfd._create`` and ``_nested._dup``: an fd that a C function
    returns is on the stack, not yet stored, when the end of that call runs
    handlers; so it is for every Python program (``os.open``, ``os.dup``).
    Those are the places these calls make an fd in Python.
    """
    while frame is not None:
        if frame.f_code.co_name == "__del__" or (
            (frame.f_code.co_name, os.path.basename(frame.f_code.co_filename))
            in (("_create", "_memfd.py"), ("_dup", "_nested.py"))
        ):
            return True
        frame = frame.f_back
    return False


def _fail_from(k: int, width: int) -> None:
    if MODE == "memory":
        if _fastpath.compiled_available():
            # The Message a recv() makes is then its own allocation, not one
            # kept from an earlier message let go: that allocation fails too.
            _fastpath._speedups.drop_spare_messages()
        _testcapi.set_nomemory(k, k + width)
    else:
        sys.settrace(_Interrupter(k, twice=width > 1).enter)


def _stop_failing() -> None:
    if MODE == "memory":
        _testcapi.remove_mem_hooks()
    else:
        sys.settrace(None)
        sys.setprofile(None)


def _told(exc: BaseException, scenario: str) -> int | None:
    """What a failed send's exception says was taken: bytes (send_many: messages); None: unknown."""
    told = getattr(exc, "messages_taken" if scenario.startswith("send_many") else "characters_written", None)
    return told if isinstance(told, int) else None


def _misreported(
    scenario: str, error: bool, told: int | None, got: list[bytes], sender: Channel
) -> list[str]:
    """A send's exception must not hide what left: a caller that sends again what it was told did
    not leave (or was not told about, on a channel that accepts the retry) would duplicate it."""
    if not error or _receiving(scenario) or not SCENARIOS[scenario]:
        return []
    arrived = 0
    for sent, wanted in zip(got, SCENARIOS[scenario], strict=False):
        if sent != wanted:
            break
        arrived += 1
    if told is not None:
        told_messages = told if scenario.startswith("send_many") else int(told > 0)
        if told_messages == arrived:
            return []
        if told_messages > arrived:
            return [f"told {told} taken, only {arrived} message(s) arrived"]
    elif arrived == 0:
        return []
    # Fewer told than arrived, or nothing told (unknown): safe only if the
    # channel refuses the retry.
    try:
        sender.send(b"retry")
    except (ProtocolError, OSError, ValueError):
        return []
    return [f"{arrived} message(s) arrived, the exception said {told}, and a retry was accepted"]


def _receiving(scenario: str) -> bool:
    return scenario.startswith("recv") or scenario.endswith("_recv")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _drain(ch: Channel, ino: int) -> list[bytes]:
    got: list[bytes] = []
    while True:
        try:
            m = ch.recv()
        except BlockingIOError:
            return got
        except ChannelBroken:
            return [*got, b"BROKEN"]
        except shm.SharedMemoryRefused:
            continue  # (recv_refused) the bad memfd, dropped: the next message is next
        with m:
            if any(os.fstat(f.fileno()).st_ino != ino for f in m.fds):
                return [*got, b"WRONG FD"]
            got.append(bytes(m.payload))


def _pair(path: str, scenario: str, r: int) -> tuple[Channel, Channel]:
    """A channel pair in use for a while, with what the scenario needs sent already."""
    with _fastpath.forced(path == "compiled"):
        a, b = Channel.pair()
    a.settimeout(0)
    b.settimeout(0)
    sender, receiver = (b, a) if _receiving(scenario) else (a, b)
    for _ in range(12):  # stream offsets past the small-int cache, as in a long-lived channel
        sender.send(b"warm-up", [r])
        receiver.recv().close()
    if scenario.endswith("_shm"):
        shm.share_above(sender, 4096)
    if scenario in ("recv", "recv_into") or scenario.endswith("_recv"):
        b.send(X, [r])
    elif scenario == "recv_shm":
        b.send(S, [r])
    elif scenario == "recv_group":
        b.send_many([(X, [r]), (Y, [r, r])])
    elif scenario == "recv_big":
        b.send(Z, [r])
    elif scenario == "recv_refused":
        pr, pw = os.pipe()
        fake = shm.SealedMemory._own(pr, 4096)
        b.send(fake, [r, r])
        fake.close()
        os.close(pw)
        b.send(X, [r])
    return a, b


def _held(scenario: str, a: Channel, b: Channel, r: int, w: int) -> Message | None:
    """The received message the Message scenarios work on."""
    if scenario in ("fds", "close", "open"):
        b.send(X, [r, w, r])
        return a.recv()
    if scenario == "close_one":
        b.send(X, [w])
        return a.recv()
    if scenario == "close_many":
        b.send(X, [r, w] * 20)
        return a.recv()
    return None


#: The bytearray payloads of the ``*_buffer`` scenarios' current run.
_BUFFERS: list[bytearray] = []


def _pinned(bufs: list[bytearray]) -> bool:
    """Whether a send still holds one of *bufs* (a resize raises `BufferError`)."""
    for buf in bufs:
        try:
            buf.append(0)
        except BufferError:
            return True
        buf.pop()
    return False


def _call(scenario: str, a: Channel, held: Message | None, r: int) -> Callable[[], object]:
    """The call that runs out of memory (made beforehand: the harness allocates nothing in the window)."""
    x, y = bytearray(X), bytearray(Y)
    _BUFFERS[:] = [x, y]
    calls: dict[str, Callable[[], object]] = {
        "recv_into": lambda: a.recv_into(bytearray(64)),  # (count, fds): the bytes are not looked at
        "recv_refused": lambda: _refused_then(a),
        "send": lambda: a.send(X, [r]),
        "send_shm": lambda: a.send(S, [r]),
        "send_many": lambda: a.send_many([(X, [r]), (Y, [r, r])]),
        "send_buffer": lambda: a.send(x, [r]),
        "send_many_buffer": lambda: a.send_many([(x, [r]), (y, [r, r])]),
        "fds": lambda: held.fds if held else None,
        "close": lambda: held.close() if held else None,
        "close_one": lambda: held.close() if held else None,
        "close_many": lambda: held.close() if held else None,
        "open": lambda: held.fds[0].open("rb") if held else None,
    }
    return calls.get(scenario, a.recv)


def _refused_then(a: Channel) -> object:
    """recv(): the refusal is expected, and the plain message after it is the one looked for."""
    try:
        return a.recv()
    except shm.SharedMemoryRefused:
        return None


def _aio_case(
    scenario: str, k: int, width: int, a: Channel, b: Channel, r: int, ino: int
) -> tuple[bool, list[bytes]]:
    """The asyncio twin: *a* taken over by an AsyncChannel, its call run out of memory inside the loop."""

    async def case() -> tuple[bool, list[bytes]]:
        ch = AsyncChannel.from_channel(a)
        try:
            made: object = None
            error = False
            told: int | None = None
            pinned = False
            payload = bytearray(X) if scenario == "aio_send_buffer" else X
            _fail_from(k, width)
            try:
                made = await (ch.recv() if scenario == "aio_recv" else ch.send(payload, [r]))
            except FAILURES as exc:
                error = True
                told = _told(exc, scenario)
                _stop_failing()
                pinned = (
                    width == 1 and isinstance(payload, bytearray) and _pinned([payload])
                )  # as in _sync_case
            finally:
                _stop_failing()
            if scenario.startswith("aio_send"):
                got = _drain(b, ino)
                if pinned:
                    got.append(b"PINNED WHILE THE ERROR WAS HANDLED")
                if error and told is not None and (told > 0) != (got == [X]):
                    return error, [b"MISREPORTED"]
                if error and told is None and got == [X]:
                    try:
                        await ch.send(b"retry")
                    except (ProtocolError, OSError, ValueError):
                        return error, got  # unknown, and the channel refuses a retry
                    return error, [b"UNTOLD, AND A RETRY WAS ACCEPTED"]
                return error, got
            if not isinstance(made, Message):
                try:  # still there, or the channel says it is broken (a silent gap times out)
                    made = await asyncio.wait_for(ch.recv(), 10)
                except ChannelBroken:
                    return error, [b"BROKEN"]
            assert isinstance(made, Message)
            with made:
                return error, _checked(made, ino)
        finally:
            ch.close()

    return asyncio.run(case())


def _structured_lib(scenario: str) -> tuple[Any, Callable[..., Any], Callable[[float], Any]]:
    """The channel class, ``run`` and ``move_on_after`` of a trio_ or anyio_ scenario."""
    if scenario.startswith("trio_"):
        import trio

        from fdchannel.trio import TrioChannel

        return TrioChannel, trio.run, trio.move_on_after
    import anyio

    from fdchannel.anyio import AnyioChannel

    return AnyioChannel, anyio.run, anyio.move_on_after  # (its asyncio backend)


async def _structured_sent(
    ch: Any, b: Channel, error: bool, told: int | None, ino: int, move_on_after: Callable[[float], Any]
) -> list[bytes]:
    """What a structured send's receiver got, checked as `_aio_case` checks it, and that sending goes on."""
    got = _drain(b, ino)
    if error and told is not None and (told > 0) != (got == [X]):
        return [b"MISREPORTED"]
    with move_on_after(10) as waited:  # a gate left taken would hang these
        if error and told is None and got == [X]:
            try:
                await ch.send(b"retry")
                return [b"UNTOLD, AND A RETRY WAS ACCEPTED"]
            except (ProtocolError, OSError, ValueError):
                pass  # unknown, and the channel refuses a retry
        try:
            await ch.send(b"after")
        except (ProtocolError, OSError, ValueError):
            pass  # refused: the channel said it is unusable
        _drain(b, ino)
    return [b"A LATER SEND HUNG"] if waited.cancelled_caught else got


def _structured_case(
    scenario: str, k: int, width: int, a: Channel, b: Channel, r: int, ino: int
) -> tuple[bool, list[bytes]]:
    """`_aio_case` for the trio and anyio channels."""
    cls, run, move_on_after = _structured_lib(scenario)
    outcome: list[tuple[bool, list[bytes]]] = []

    async def case() -> None:
        ch = cls.from_channel(a)
        try:
            made: object = None
            error = False
            told: int | None = None
            _fail_from(k, width)
            try:
                made = await (ch.recv() if scenario.endswith("_recv") else ch.send(X, [r]))
            except FAILURES as exc:
                error = True
                told = _told(exc, scenario)
            finally:
                _stop_failing()
            if scenario.endswith("_send"):
                outcome.append((error, await _structured_sent(ch, b, error, told, ino, move_on_after)))
                return
            if not isinstance(made, Message):
                # Still there, or the channel says it is broken (a silent
                # gap, or a gate left taken, times out).
                with move_on_after(10):
                    try:
                        made = await ch.recv()
                    except ChannelBroken:
                        outcome.append((error, [b"BROKEN"]))
                        return
            if not isinstance(made, Message):
                outcome.append((error, [b"NOTHING WITHIN 10 S"]))
                return
            with made:
                outcome.append((error, _checked(made, ino)))
        finally:
            ch.close()

    with warnings.catch_warnings():
        # A strike between making a checkpoint's coroutine and awaiting it
        # leaves it unawaited: nothing was in hand yet.
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        run(case)
    return outcome[0]


def _checked(m: Message, ino: int) -> list[bytes]:
    if any(os.fstat(f.fileno()).st_ino != ino for f in m.fds):
        return [b"WRONG FD"]
    return [bytes(m.payload)]


def _received(scenario: str, made: object, receiver: Channel, held: Message | None, ino: int) -> list[bytes]:
    """Close what the call made and what is held; the messages the receiver ends up with."""
    got: list[bytes] = []
    if scenario == "recv_into" and isinstance(made, tuple):
        for f in made[1]:
            f.close()
        got.append(X)  # its count and fds came back: the message arrived
    elif isinstance(made, Message):
        with made:
            got.append(bytes(made.payload))
    elif hasattr(made, "close"):
        made.close()
    if SCENARIOS[scenario]:
        got += _drain(receiver, ino)
    if held is not None:
        held.close()
    return got


def _gap(scenario: str, got: list[bytes], error: bool) -> bool:
    """True when *got* breaks the rule: all, or those before a reported break (after an error: none sent)."""
    want = SCENARIOS[scenario]
    if not want or got == want:
        return False
    if got and got[-1] == b"BROKEN" and want[: len(got) - 1] == got[:-1]:
        return False
    if error and not _receiving(scenario) and got == []:
        return False  # refused before anything left
    return not (error and scenario.startswith("send_many") and got == want[:1])  # the first message left


def _fds_reused_stay_open(k: int, a: Channel, b: Channel) -> list[str]:
    """Close both ends: fds opened just before, which took any number freed too early, must stay open."""
    canaries = [os.pipe() for _ in range(4)]
    a.close()
    b.close()
    gc.collect()
    broken = []
    for pair in canaries:
        for fd in pair:
            try:
                os.fstat(fd)
            except OSError:
                broken.append(f"k={k}: an fd opened afterwards was closed (a number closed twice)")
            os.close(fd)
    return broken


def _sync_case(
    scenario: str, k: int, width: int, a: Channel, b: Channel, r: int, w: int, ino: int
) -> tuple[bool, list[bytes], list[str]]:
    """One run of a blocking channel's call out of memory: (error, received, broken rules)."""
    held = _held(scenario, a, b, r, w)
    call = _call(scenario, a, held, r)
    made: object = None
    error = False  # not the exception itself: its traceback would keep the call's locals alive
    told: int | None = None
    pinned = False
    _fail_from(k, width)
    try:
        made = call()
    except FAILURES as exc:
        error = True
        told = _told(exc, scenario)
        _stop_failing()
        # Held no longer as the caller handles the error.  Checked for one
        # handler's error: a second one cutting the release short leaves the
        # payload held until the exception goes (documented, not swept).
        pinned = width == 1 and scenario.endswith("_buffer") and _pinned(_BUFFERS)
    finally:
        _stop_failing()
    try:
        got = _received(scenario, made, a if _receiving(scenario) else b, held, ino)
        broken = [f"k={k}: {why}" for why in _misreported(scenario, error, told, got, a)]
        if pinned:
            broken.append(f"k={k}: the payload stayed held while the error was handled")
        return error, got, broken
    except Exception as exc:  # any error here is what the test reports
        return error, [], [f"k={k}: cleaning up raised {exc!r}"]


def _guard_free(guard: Any) -> bool:
    """Whether a lock (or an async channel's gate) is free: a later call would not wait for good."""
    if hasattr(guard, "try_enter"):
        return not guard._busy and not guard._waiters
    if not guard.acquire(False):
        return False
    guard.release()
    return True


def _send_channel_case(  # noqa: C901, PLR0912, PLR0915 - one scenario, kept in one piece
    path: str, k: int, width: int, a: Channel, b: Channel, kind: str = "blocking"
) -> tuple[bool, list[bytes], list[str]]:
    """``send_channel(a, end)`` struck at point k: *end* is the peer's once the message
    arrived (closed here, working there), else still the caller's and usable; never both.
    *kind* ``aio``: *end* is an AsyncChannel (taken over before the strikes begin)."""
    with _fastpath.forced(path == "compiled"):
        end, partner = Channel.pair()
    end.settimeout(0)
    partner.settimeout(0)
    if kind == "aio":
        end = AsyncChannel.from_channel(end)  # type: ignore[assignment]

    def run(call: Any) -> Any:
        return asyncio.run(asyncio.wait_for(call, 10)) if kind == "aio" else call

    error = False
    told: int | None = None
    _fail_from(k, width)
    try:
        send_channel(a, end, X)
    except FAILURES as exc:
        error = True
        told = _told(exc, "send_channel")
    finally:
        _stop_failing()
    broken: list[str] = []
    moved: list[Any] = []
    try:
        cut = False
        while True:
            try:
                m = b.recv()
            except BlockingIOError:
                break
            except ChannelBroken:
                cut = True
                break
            with m:
                moved.append(recv_channel(m).channel)
        if moved and not end.closed:
            broken.append("the end arrived and is still open here: two owners")
        for guard in (end._send_guard(), end._recv_guard()):
            if not _guard_free(guard):  # a later call would hang instead of working (or saying closed)
                return error, [], [f"k={k}: a lock of the end was left taken"]
        if moved:
            partner.send(b"moved")
            if [bytes(run(moved[0].recv()).payload)] != [b"moved"]:
                broken.append("the end that arrived does not carry its stream")
        elif end.closed:
            if not cut and not a.closed and a._broken is None:
                broken.append("the end was let go here and never arrived")
        else:
            run(end.send(b"kept"))
            if bytes(partner.recv().payload) != b"kept":
                broken.append("the end kept here does not carry its stream")
        if error and told is not None and (told > 0) != bool(moved) and not cut:
            broken.append(f"characters_written={told}, and the end {'arrived' if moved else 'did not'}")
    except Exception as exc:  # any error here is what the test reports
        broken.append(f"checking raised {exc!r}")
    finally:
        for ch in (*moved, end, partner):
            ch.close()
    return error, [], [f"k={k}: {why}" for why in broken]


def _channel_close_case(
    k: int, width: int, a: Channel, b: Channel, r: int
) -> tuple[bool, list[bytes], list[str]]:
    """``a.close()`` struck at point k, with output pending and a received message's fds
    buffered: a second ``close()`` finishes it (every fd closed once, no lock left taken)."""
    b.send_many([(X, [r]), (Y, [r, r])])
    a.recv().close()  # the second message stays buffered, with its fds
    a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        a.send(Z * 4)  # more than the socket holds: the rest stays queued
    except BlockingIOError:
        pass
    broken: list[str] = [] if a.pending else ["setting up: no output pending"]
    error = False
    _fail_from(k, width)
    try:
        a.close()
    except FAILURES:
        error = True
    finally:
        _stop_failing()
    try:
        a.close()  # finishes what a close cut short left
        if a._sock.fileno() != -1:
            broken.append("the socket is still open after a second close()")
        for lock in (a._send_lock, a._recv_lock):
            if not lock.acquire(False):  # a later call would hang instead of saying closed
                broken.append("a lock was left taken")
            else:
                lock.release()
    except Exception as exc:  # any error here is what the test reports
        broken.append(f"checking raised {exc!r}")
    return error, [], [f"k={k}: {why}" for why in broken]


def main(path: str, scenario: str, count: int, width: int = 1) -> dict[str, object]:
    r, w = os.pipe()
    ino = os.fstat(r).st_ino
    failed = succeeded = 0
    last_failed = -1
    broken: list[str] = []
    gc.collect()
    for k in range(count):
        before = _fds()  # each run ends collected (below)
        a, b = _pair(path, scenario, r)
        if scenario.startswith("aio_"):
            error, got = _aio_case(scenario, k, width, a, b, r, ino)
        elif OURS_ONLY:
            error, got = _structured_case(scenario, k, width, a, b, r, ino)
        elif scenario.startswith("send_channel"):
            kind = "aio" if scenario.endswith("_aio") else "blocking"
            error, got, problems = _send_channel_case(path, k, width, a, b, kind)
            broken += problems
        elif scenario == "channel_close":
            error, got, problems = _channel_close_case(k, width, a, b, r)
            broken += problems
        else:
            error, got, problems = _sync_case(scenario, k, width, a, b, r, w, ino)
            broken += problems
        if error:
            failed += 1
            last_failed = k
        else:
            succeeded += 1
        if _gap(scenario, got, error):
            broken.append(f"k={k}: {'MemoryError' if error else 'no error'}, received {[g[:4] for g in got]}")
        broken += _fds_reused_stay_open(k, a, b)
        del a, b
        gc.collect()
        changed = sorted(before ^ _fds())
        if changed:
            broken.append(f"k={k}: fds {changed} left open or closed")
    os.close(r)
    os.close(w)
    return {"failed": failed, "succeeded": succeeded, "last_failed": last_failed, "broken": broken}


if __name__ == "__main__":
    print(
        json.dumps(
            main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
        )
    )
