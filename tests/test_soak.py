"""Multi-process soak: many channels, random SIGKILLs and closes, both kinds of transport.

Rounds of forked sender processes, each with a channel of its own to this
process (UnixRights, and PidfdGetfd where the kernel has it).  Each sender
sends numbered messages of varying size, each carrying fds of known files;
this process receives on one thread per channel.  At random points a sender
is killed (SIGKILL) or its channel closed from another thread.  Checked:
every channel delivers an exact prefix of what was sent (whole, in order,
never twice), every fd is the file sent (st_dev/st_ino), a sender that was
neither killed nor cut off delivers everything, and no process leaks an fd
(this one by the autouse check, each sender by its own count at exit).
Bounded in time; the figures are printed (``pytest -s``) and quoted in
docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fdchannel import Channel, FdChannelError
from fdchannel.transports import PidfdGetfd, Transport, UnixRights

from ._proc import fork_child, needs_fork, wait_child

pytestmark = [needs_fork, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd")]

SECONDS = 20.0
SENDERS = 8
MESSAGES = 400
FILES = 5


def _transports() -> list[Transport]:
    out: list[Transport] = [UnixRights()]
    if PidfdGetfd.unavailable_reason() is None:
        out.append(PidfdGetfd())
    return out


def _payload(sender: int, seq: int) -> bytes:
    size = (seq * 7919 + sender * 104729) % 70000  # inline and large frames both
    return b"%04d%08d" % (sender, seq) + bytes([seq % 251]) * size


def _sender(ch: Channel, sender: int, paths: list[str]) -> None:
    """In the child: send MESSAGES messages, each with the fds of 1-3 of the files."""
    before = len(os.listdir("/proc/self/fd"))
    files = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        try:
            for seq in range(MESSAGES):
                nfds = 1 + seq % 3
                ch.send(_payload(sender, seq), [files[(seq + k) % FILES] for k in range(nfds)])
            # A duplication transport's receiver pulls the fds out of this
            # process: stay until it says it has them all.
            ch.settimeout(30)
            with ch.recv() as done:
                assert done.payload == b"done"
        except (OSError, FdChannelError):
            pass  # the receiver closed its end
    finally:
        for f in files:
            os.close(f)
        ch.close()
    after = len(os.listdir("/proc/self/fd"))
    if after > before:
        raise AssertionError(f"sender {sender} leaked {after - before} fds")


def _receive(
    ch: Channel, sender: int, idents: list[tuple[int, int]], out: dict[str, Any], close_at: int | None
) -> None:
    got = 0
    try:
        ch.settimeout(30)
        for msg in ch:
            with msg:
                seq = got
                if msg.payload != _payload(sender, seq):
                    out["bad"] = f"sender {sender}: message {seq} not whole, out of order or repeated"
                    return
                want = [idents[(seq + k) % FILES] for k in range(1 + seq % 3)]
                have = []
                for fd in msg.fds:
                    st = os.fstat(fd.fileno())
                    have.append((st.st_dev, st.st_ino))
                if have != want:
                    out["bad"] = f"sender {sender}: message {seq} carried other files"
                    return
            got += 1
            if got == close_at:
                ch.close()  # mid-stream, the sender still writing
                out["end"] = "closed here"
                return
            if got == MESSAGES:
                ch.send(b"done")
        out["end"] = "closed"
    except (FdChannelError, OSError, ValueError) as exc:
        out["end"] = type(exc).__name__  # a kill cut a frame, or our own close
    finally:
        out["got"] = got


def test_soak(tmp_path: Path) -> None:  # noqa: C901, PLR0912 - one scenario, kept in one piece
    paths = [str(tmp_path / f"f{i}") for i in range(FILES)]
    for p in paths:
        Path(p).write_bytes(b"x")
    idents = [(os.stat(p).st_dev, os.stat(p).st_ino) for p in paths]
    rng = random.Random(11)
    stop_at = time.monotonic() + SECONDS
    stats = {"processes": 0, "channels": 0, "messages": 0, "kills": 0, "closes": 0, "complete": 0}
    transports = _transports()
    while time.monotonic() < stop_at:
        pairs = [Channel.pair(transport=transports[i % len(transports)]) for i in range(SENDERS)]
        pids = []
        for i, (_ours, theirs) in enumerate(pairs):

            def child(
                i: int = i, theirs: Channel = theirs, pairs: list[tuple[Channel, Channel]] = pairs
            ) -> None:
                for j, (o, t) in enumerate(pairs):
                    o.close()
                    if j != i:
                        t.close()
                _sender(theirs, i, paths)

            pids.append(fork_child(child))
            theirs.close()
        stats["processes"] += SENDERS
        stats["channels"] += SENDERS
        outs: list[dict[str, Any]] = [{} for _ in range(SENDERS)]
        fates = ["run"] * SENDERS
        for i in rng.sample(range(SENDERS), 3):
            fates[i] = rng.choice(["kill", "close"])
        readers = [
            threading.Thread(
                target=_receive,
                args=(ours, i, idents, outs[i], rng.randrange(1, MESSAGES) if fates[i] == "close" else None),
            )
            for i, (ours, _) in enumerate(pairs)
        ]
        for r in readers:
            r.start()
        # Strike while the streams flow: after a random share of the time
        # a sender needs, so some strike mid-frame.
        time.sleep(rng.uniform(0.0, 0.05))
        for i, fate in enumerate(fates):
            if fate == "kill":
                os.kill(pids[i], signal.SIGKILL)
                stats["kills"] += 1
            elif fate == "close":
                stats["closes"] += 1  # its reader closes the channel after a random message
        try:
            codes = [wait_child(pid, timeout=60) for pid in pids]
            for r in readers:
                r.join(60)
                assert not r.is_alive()
        finally:
            for ours, _ in pairs:
                ours.close()
        for code, fate, out in zip(codes, fates, outs, strict=True):
            if fate == "kill" and code == 0:
                # The kill came after the sender had finished (a loaded
                # machine): then everything must have arrived.
                assert out.get("got") == MESSAGES, (fate, code, out)
                continue
            assert code == (-signal.SIGKILL if fate == "kill" else 0), (fate, code)
        for out, fate in zip(outs, fates, strict=True):
            assert "bad" not in out, out["bad"]
            stats["messages"] += out["got"]
            if fate == "run":
                assert out == {"end": "closed", "got": MESSAGES}, out
                stats["complete"] += 1
    print(f"\nsoak: {stats} (transports: {[t.name for t in transports]}, 0 lost, 0 duplicated, 0 leaked)")
