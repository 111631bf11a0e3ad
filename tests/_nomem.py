"""Run one call with its k-th memory allocation failing, for each k in turn (a child process).

``python tests/_nomem.py PATH SCENARIO COUNT [WIDTH]``: PATH is
``compiled`` or ``pure``; SCENARIO one of `SCENARIOS`.  For each k below
COUNT a fresh channel pair runs the scenario with allocation k failing (and
the WIDTH - 1 after it: a clean-up that allocates fails too)
(``_testcapi.set_nomemory``: CPython's own fault injection, every allocator
domain) and then, with memory back, checks what must hold after any error:

- every message arrives, or those before a reported break (`ChannelBroken`)
  do: never a silent gap, never a wrong fd;
- closing everything releases every fd exactly once: none is left open
  (the fd table is as before) and none is closed twice (fds opened after
  the failing call, which would take any number freed too early, stay
  open).

It prints one JSON line: how many runs ended in MemoryError, how many
succeeded, the last k that failed, and each broken rule.  A child, because a failing allocation in
the wrong place can crash the interpreter.
"""

from __future__ import annotations

import _testcapi  # type: ignore[import-not-found]
import gc
import json
import os
import sys

from fdchannel import Channel, ChannelBroken, Message, _fastpath

X, Y, Z = b"x" * 20, b"y" * 20, b"z" * 100_000

#: What the failing call is, and the messages the receiving end must end up with.
SCENARIOS: dict[str, list[bytes]] = {
    "recv": [X],  # one lone frame: the compiled path's own
    "recv_group": [X, Y],  # a send_many() group in one read
    "recv_big": [Z],  # a frame larger than the read buffer: the Python decoder
    "send": [X],
    "send_many": [X, Y],
    "fds": [],  # a received message's .fds made (lazily)
    "close": [],
    "open": [],  # an OwnedFd made into a file object
}


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
        with m:
            if any(os.fstat(f.fileno()).st_ino != ino for f in m.fds):
                return [*got, b"WRONG FD"]
            got.append(bytes(m.payload))


def _pair(path: str, scenario: str, r: int, w: int) -> tuple[Channel, Channel, Message | None]:
    """A channel pair in use for a while, and what the scenario needs sent or received already."""
    with _fastpath.forced(path == "compiled"):
        a, b = Channel.pair()
    a.settimeout(0)
    b.settimeout(0)
    sender, receiver = (b, a) if scenario.startswith("recv") else (a, b)
    for _ in range(12):  # stream offsets past the small-int cache, as in a long-lived channel
        sender.send(b"warm-up", [r])
        receiver.recv().close()
    if scenario == "recv":
        b.send(X, [r])
    elif scenario == "recv_group":
        b.send_many([(X, [r]), (Y, [r, r])])
    elif scenario == "recv_big":
        b.send(Z, [r])
    if scenario in ("fds", "close", "open"):
        b.send(X, [r, w, r])
        return a, b, a.recv()
    return a, b, None


def _step(scenario: str, a: Channel, held: Message | None, r: int) -> object:
    """The call that runs out of memory."""
    if scenario.startswith("recv"):
        return a.recv()
    if scenario == "send":
        return a.send(X, [r])
    if scenario == "send_many":
        return a.send_many([(X, [r]), (Y, [r, r])])
    assert held is not None
    if scenario == "fds":
        return held.fds
    if scenario == "close":
        return held.close()
    return held.fds[0].open("rb")


def _received(scenario: str, made: object, receiver: Channel, held: Message | None, ino: int) -> list[bytes]:
    """Close what the call made and what is held; the messages the receiver ends up with."""
    got: list[bytes] = []
    if isinstance(made, Message):
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
    if error and not scenario.startswith("recv") and got == []:
        return False  # refused before anything left
    return not (error and scenario == "send_many" and got == want[:1])  # the first message left


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


def main(path: str, scenario: str, count: int, width: int = 1) -> dict[str, object]:
    r, w = os.pipe()
    ino = os.fstat(r).st_ino
    failed = succeeded = 0
    last_failed = -1
    broken: list[str] = []
    for k in range(count):
        gc.collect()
        before = _fds()
        a, b, held = _pair(path, scenario, r, w)
        made: object = None
        error = False  # not the exception itself: its traceback would keep the call's locals alive
        _testcapi.set_nomemory(k, k + width)
        try:
            made = _step(scenario, a, held, r)
        except (MemoryError, RuntimeError):  # io's "can't allocate read lock" is a RuntimeError
            error = True
        finally:
            _testcapi.remove_mem_hooks()
        if error:
            failed += 1
            last_failed = k
        else:
            succeeded += 1
        got: list[bytes] = []
        try:
            got = _received(scenario, made, a if scenario.startswith("recv") else b, held, ino)
        except Exception as exc:  # any error here is what the test reports
            broken.append(f"k={k}: cleaning up raised {exc!r}")
        made = held = None
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
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:5]))))
