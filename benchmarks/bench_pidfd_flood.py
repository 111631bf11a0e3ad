"""PidfdGetfd send() while the peer streams empty messages this end never receives.

Run:  python benchmarks/bench_pidfd_flood.py [--messages N] [--rounds R]

A sender only sends (1 byte + 1 fd per message); its peer, in another
process, receives those (so it acknowledges them) and in a second thread
streams empty messages back that the sender never asks for.  Every
``send()`` first reads what arrived, to see the acknowledgements; the
unread empty messages pile up in the channel (up to its 1 MiB read-ahead
bound), and the acknowledgements behind them are out of sight, so the
sender's window is set to hold a whole round.  Printed: the best round's
time per ``send()``, without the flood and with it (issue 17, point 5: 28 us
against about 930 us).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fdchannel import Channel
from fdchannel.transports import PidfdGetfd


def peer(sock: socket.socket, count: int, flood: bool, done: int) -> None:
    with Channel(sock, transport=PidfdGetfd()) as ch:

        def stream() -> None:
            try:
                while True:
                    ch.send(b"")
            except (OSError, ValueError):
                return  # the sender closed

        streamer = threading.Thread(target=stream, daemon=True)
        if flood:
            streamer.start()
        for _ in range(count):
            ch.recv().close()  # pulls the fd and acknowledges it
        os.write(done, b"k")  # the sender may close now
        sock.shutdown(socket.SHUT_RDWR)  # wakes the streamer
        if flood:
            streamer.join()


def one_round(count: int, flood: bool) -> float:
    """Seconds per send() of *count* 1-fd messages."""
    a, b = socket.socketpair()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the peer
        code = 1
        try:
            a.close()
            os.close(done_r)
            peer(b, count, flood, done_w)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    b.close()
    os.close(done_w)
    r, w = os.pipe()
    try:
        # Behind 1 MiB of unread messages the acknowledgements are out of
        # sight, so the window must hold every message of the round.
        with Channel(a, transport=PidfdGetfd(window=count + 1)) as ch:
            if flood:  # let the flood fill the channel's read-ahead first
                deadline = time.monotonic() + 5
                while ch._decoder.unread_bytes < (1 << 20) - 64 and time.monotonic() < deadline:
                    ch._pump_nowait()
            start = time.perf_counter()
            for _ in range(count):
                ch.send(b"m", fds=[w])
            elapsed = time.perf_counter() - start
            assert os.read(done_r, 1) == b"k", "the peer failed"
    finally:
        os.close(done_r)
        os.close(r)
        os.close(w)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the peer failed"
    return elapsed / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for flood in (False, True):
        best = min(one_round(args.messages, flood) for _ in range(args.rounds))
        label = "peer streaming empty messages" if flood else "quiet peer"
        print(f"{label:32} {best * 1e6:8.1f} us per send()")


if __name__ == "__main__":
    main()
