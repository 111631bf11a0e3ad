"""Run a sender and a receiver in two processes over a fresh socketpair."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

Side = Callable[[socket.socket, int], None]


def run_pair(sender: Side, receiver: Side, count: int, pin: bool = False) -> tuple[float, float]:
    """Fork a receiver, run both sides on a fresh socketpair.

    Returns (wall seconds, CPU seconds of both processes together).  Wall
    time of a stream is set by the slower side; CPU time is what a message
    costs the machine, whichever side pays it.  The start and done signals
    go over pipes: a side may leave its socket non-blocking (asyncio does).
    *pin* puts both processes on one CPU (cross-CPU round trips measure
    wake-up latency, not code).
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # receiver
        code = 1
        try:
            a.close()
            os.close(go_w)
            os.close(done_r)
            if pin:
                os.sched_setaffinity(0, {0})
            os.read(go_r, 1)
            cpu = time.process_time()
            receiver(b, count)
            os.write(done_w, b"k" + struct.pack("d", time.process_time() - cpu))
            code = 0
        finally:
            os._exit(code)
    b.close()
    os.close(go_r)
    os.close(done_w)
    if pin:
        os.sched_setaffinity(0, {0})
    try:
        os.write(go_w, b"g")
        start = time.perf_counter()
        cpu = time.process_time()
        sender(a, count)
        cpu = time.process_time() - cpu
        done = os.read(done_r, 9)
        elapsed = time.perf_counter() - start
        assert done[:1] == b"k", "receiver failed"
        cpu += struct.unpack("d", done[1:])[0]
    finally:
        os.close(go_w)
        os.close(done_r)
        _, status = os.waitpid(pid, 0)
        if pin:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        a.close()
    assert os.waitstatus_to_exitcode(status) == 0
    return elapsed, cpu
