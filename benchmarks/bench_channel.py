"""fdchannel's blocking Channel against the stdlib's socket.send_fds/recv_fds.

Run:  python benchmarks/bench_channel.py [--messages N] [--rounds R]

Every workload runs both implementations side by side in one process tree,
alternating rounds so that machine noise hits both alike, and prints the
best round of each and their ratio (fdchannel / stdlib; lower is better),
twice: wall time (a stream goes as fast as its slower side) and CPU time of
both processes together (what a message costs the machine).  Sender and
receiver are separate processes, as in real use.

Workloads:
  stream-1fd    N messages of 1 byte + 1 fd, sender streaming, receiver
                closing each fd; time per message.
  stream-200fd  messages of 1 byte + 200 fds; time per fd.
  pingpong-1fd  a message of 1 fd each way, both processes pinned to one CPU
                (cross-CPU round trips measure wake-up latency, not code).
  payload-8MiB  8 MiB payloads without fds against sendall/recv_into of a
                preallocated buffer; time per MiB.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _pair import Side, run_pair  # benchmarks/_pair.py, beside this script

from fdchannel import Channel

# -- stream of 1-fd messages ---------------------------------------------------


def std_send_1fd(sock: socket.socket, n: int) -> None:
    fd = sys.stderr.fileno()
    for _ in range(n):
        socket.send_fds(sock, [b"x"], [fd])


def std_recv_1fd(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        os.close(fds[0])


def fdc_send_1fd(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    fd = sys.stderr.fileno()
    send = ch.send
    for _ in range(n):
        send(b"x", [fd])
    ch.close()


def fdc_recv_1fd(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    recv = ch.recv
    for _ in range(n):
        msg = recv()
        msg.fds[0].close()
    ch.close()


# -- stream of 200-fd messages ---------------------------------------------------

MANY = 200


def std_send_many(sock: socket.socket, n: int) -> None:
    fds = [sys.stderr.fileno()] * MANY
    for _ in range(n):
        socket.send_fds(sock, [b"x"], fds)


def std_recv_many(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        _, fds, _, _ = socket.recv_fds(sock, 1, MANY)
        for fd in fds:
            os.close(fd)


def fdc_send_many(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    fds = [sys.stderr.fileno()] * MANY
    for _ in range(n):
        ch.send(b"x", fds)
    ch.close()


def fdc_recv_many(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    for _ in range(n):
        ch.recv().close()
    ch.close()


# -- ping-pong -------------------------------------------------------------------


def std_ping(sock: socket.socket, n: int) -> None:
    fd = sys.stderr.fileno()
    for _ in range(n):
        socket.send_fds(sock, [b"x"], [fd])
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        os.close(fds[0])


def std_pong(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        socket.send_fds(sock, [b"x"], fds)
        os.close(fds[0])


def fdc_ping(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    fd = sys.stderr.fileno()
    for _ in range(n):
        ch.send(b"x", [fd])
        ch.recv().close()
    ch.close()


def fdc_pong(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    for _ in range(n):
        with ch.recv() as msg:
            ch.send(b"x", msg.fds)
    ch.close()


# -- large payloads ----------------------------------------------------------------

BIG = 8 * 1024 * 1024


def std_send_big(sock: socket.socket, n: int) -> None:
    data = b"p" * BIG
    for _ in range(n):
        sock.sendall(data)


def std_recv_big(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        buf = bytearray(BIG)  # a fresh buffer per message, as a framed receiver needs
        view = memoryview(buf)
        got = 0
        while got < BIG:
            got += sock.recv_into(view[got:])


def fdc_send_big(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    data = b"p" * BIG
    for _ in range(n):
        ch.send(data)
    ch.close()


def fdc_recv_big(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    for _ in range(n):
        ch.recv()
    ch.close()


WORKLOADS: dict[str, tuple[Side, Side, Side, Side, int, str, float, bool]] = {
    # name: std send/recv, fdchannel send/recv, divisor per message, unit, scale, pin
    "stream-1fd": (std_send_1fd, std_recv_1fd, fdc_send_1fd, fdc_recv_1fd, 1, "us/msg", 1.0, False),
    "stream-200fd": (std_send_many, std_recv_many, fdc_send_many, fdc_recv_many, MANY, "us/fd", 1.0, False),
    "pingpong-1fd": (std_ping, std_pong, fdc_ping, fdc_pong, 1, "us/round trip", 1.0, True),
    "payload-8MiB": (std_send_big, std_recv_big, fdc_send_big, fdc_recv_big, 8, "us/MiB", 1.0, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20000, help="messages per round (1-fd workloads)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=sorted(WORKLOADS), action="append")
    args = parser.parse_args()
    counts = {
        "stream-1fd": args.messages,
        "stream-200fd": max(1, args.messages // 100),
        "pingpong-1fd": max(1, args.messages // 2),
        "payload-8MiB": max(1, args.messages // 500),
    }
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, best of {args.rounds} rounds")
    print("wall: elapsed time per unit; cpu: CPU time of sender and receiver together per unit")
    print(f"{'workload':<14} {'':>5} {'stdlib':>10} {'fdchannel':>10} {'ratio':>7}  unit")
    for name, (ss, sr, fs, fr, per, unit, _scale, pin) in WORKLOADS.items():
        if args.only and name not in args.only:
            continue
        n = counts[name]
        std: list[tuple[float, float]] = []
        fdc: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            std.append(run_pair(ss, sr, n, pin))
            fdc.append(run_pair(fs, fr, n, pin))
        for column, label in ((0, "wall"), (1, "cpu")):
            s = min(r[column] for r in std) / (n * per) * 1e6
            f = min(r[column] for r in fdc) / (n * per) * 1e6
            print(f"{name if column == 0 else '':<14} {label:>5} {s:>10.2f} {f:>10.2f} {f / s:>7.2f}  {unit}")


if __name__ == "__main__":
    main()
