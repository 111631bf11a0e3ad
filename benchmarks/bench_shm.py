"""Large payloads in band against sealed shared memory (fdchannel.shm); Linux only.

Run:  python benchmarks/bench_shm.py [--sizes 1,8,64,512] [--rounds R]

For each payload size (MiB) three ways, sender and receiver in two processes:

  in-band     ``send(payload)``: the bytes go through the socket; the
              receiver gets a bytearray.
  mapped      the sender copies the payload into a new memfd, seals it and
              sends it (``SealedMemory.copy`` + ``send``); the receiver maps
              it read-only (``msg.payload``).
  forwarded   as mapped, but the receiver never maps it: it forwards
              ``msg.shared`` over a second channel (to itself) and closes it.
  reused      as mapped, but the sender seals the payload once and sends the
              same memory every time (data produced once, sent to many): the
              transfer without the sender's copy into the memfd.

In every mode the receiver touches one byte per 4 KiB page of what it maps
or receives (forwarded: nothing), so "mapped" pays its page faults.
Printed per mode: MiB/s over the whole stream (best round) and the
receiver's peak RSS growth during the stream (VmHWM after, reset at the
start).  The mapped mode's growth is shared page-cache pages (RssShmem),
the same pages as the sender's memfd, not a private copy.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _pair import Side, run_pair  # benchmarks/_pair.py, beside this script

from fdchannel import Channel
from fdchannel.shm import SealedMemory, available

MiB = 1 << 20
#: Messages per round, by size: enough for a steady stream, bounded in memory.
COUNTS = {1: 200, 8: 50, 64: 10, 512: 3}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(key)


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _touch(view: memoryview) -> None:
    if view.nbytes:
        bytes(view[::4096])  # one byte per page: every page faults in


def sender(mode: str, payload: bytes) -> Side:
    def send(sock: socket.socket, n: int) -> None:
        ch = Channel(sock.dup(), max_payload=len(payload))
        if mode == "reused":
            with SealedMemory.copy(payload) as mem:
                for _ in range(n):
                    ch.send(mem)
        for _ in range(n if mode != "reused" else 0):
            if mode == "in-band":
                ch.send(payload)
            else:
                with SealedMemory.copy(payload) as mem:
                    ch.send(mem)
        ch.close()

    return send


def receiver(mode: str, size: int, report: int) -> Side:
    def recv(sock: socket.socket, n: int) -> None:
        ch = Channel(sock.dup(), max_payload=size)
        fwd_a, fwd_b = Channel.pair()
        start = _reset_peak()
        for _ in range(n):
            with ch.recv() as msg:
                if mode == "forwarded":
                    assert msg.shared is not None
                    fwd_a.send(msg.shared)
                    fwd_b.recv().close()
                else:
                    view = memoryview(msg.payload)
                    assert view.nbytes == size
                    _touch(view)
                    view.release()
            del msg
        os.write(report, struct.pack("q", _status("VmHWM") - start))
        fwd_a.close()
        fwd_b.close()
        ch.close()

    return recv


def measure(mode: str, size_mib: int, rounds: int) -> tuple[float, int]:
    """Best MiB/s of *rounds* and the largest receiver peak-RSS growth seen."""
    size = size_mib * MiB
    count = COUNTS.get(size_mib, max(1, 256 // size_mib))
    payload = os.urandom(MiB) * size_mib
    best = 0.0
    peak = 0
    for _ in range(rounds):
        r, w = os.pipe()
        try:
            wall, _cpu = run_pair(sender(mode, payload), receiver(mode, size, w), count)
            (grew,) = struct.unpack("q", os.read(r, 8))
        finally:
            os.close(r)
            os.close(w)
        best = max(best, size_mib * count / wall)
        peak = max(peak, grew)
    return best, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,8,64,512", help="payload sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not available():
        sys.exit("sealed shared memory needs Linux memfd seals; this system has none")
    print(f"{'size':>8} {'mode':<10} {'MiB/s':>9} {'receiver peak RSS growth':>26}")
    for size_mib in (int(s) for s in args.sizes.split(",")):
        for mode in ("in-band", "mapped", "forwarded", "reused"):
            rate, peak = measure(mode, size_mib, args.rounds)
            print(f"{size_mib:>5} MiB {mode:<10} {rate:>9,.0f} {peak / MiB:>22,.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
