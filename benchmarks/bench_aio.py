"""fdchannel's async channels against the blocking Channel, side by side.

Run:  python benchmarks/bench_aio.py [--messages N] [--rounds R] [--no-uvloop] [--no-trio] [--no-anyio]

Sender and receiver are two processes.  Every workload runs the blocking
pair and the async pairs in alternating rounds, so machine noise hits all
alike, and prints the best round of each and the ratio async / blocking
(lower is better; the target is 1.5x or less for 1-fd messages).  The async
pairs: `AsyncChannel` on the default loop and on uvloop, `TrioChannel` on
trio, `AnyioChannel` on anyio's asyncio and trio backends (each when its
library can be imported).

Workloads:
  stream-1fd    N messages of 1 byte + 1 fd, the sender streaming, the
                receiver closing each fd; time per message.
  pingpong-1fd  a 1-fd message each way, both processes pinned to one CPU
                (cross-CPU round trips measure wake-up latency, not code);
                time per round trip.
  loop-floor    no fdchannel at all: one byte each way with plain socket
                recv/sendall against the loop's own sock_recv/sock_sendall
                (trio: trio.socket; anyio: UNIXSocketStream), pinned
                likewise.  The event loop's wake-up cost per round trip,
                which no async channel can go below: read the
                pingpong-1fd ratios against it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import _pair  # benchmarks/_pair.py, beside this script
from _pair import Side

from fdchannel import Channel
from fdchannel.aio import AsyncChannel

try:
    import uvloop
except ImportError:  # pragma: no cover - optional
    uvloop = None
try:
    import trio
    import trio.socket

    from fdchannel.trio import TrioChannel
except ImportError:  # pragma: no cover - optional
    trio = None
try:
    import anyio
    import anyio.abc

    from fdchannel.anyio import AnyioChannel
except ImportError:  # pragma: no cover - optional
    anyio = None


def run_pair(sender: Side, receiver: Side, count: int, pin: bool = False) -> float:
    """Wall seconds of one run (see `_pair.run_pair`)."""
    return _pair.run_pair(sender, receiver, count, pin)[0]


def on_loop(kind: str, coro: Any) -> Any:
    if kind == "trio":
        return trio.run(lambda: coro)
    if kind.startswith("anyio/"):
        return anyio.run(lambda: coro, backend=kind.partition("/")[2])
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def channel_class(kind: str) -> Any:
    """The async channel a kind runs: AsyncChannel, TrioChannel or AnyioChannel."""
    if kind == "trio":
        return TrioChannel
    if kind.startswith("anyio/"):
        return AnyioChannel
    return AsyncChannel


# -- blocking ----------------------------------------------------------------------------


def blocking_stream_send(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    fd = sys.stderr.fileno()
    for _ in range(n):
        ch.send(b"x", fds=[fd])
    ch.close()


def blocking_stream_recv(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    for _ in range(n):
        ch.recv().fds[0].close()
    ch.close()


def blocking_ping(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    fd = sys.stderr.fileno()
    for _ in range(n):
        ch.send(b"p", fds=[fd])
        ch.recv().fds[0].close()
    ch.close()


def blocking_pong(sock: socket.socket, n: int) -> None:
    ch = Channel(sock.dup())
    fd = sys.stderr.fileno()
    for _ in range(n):
        ch.recv().fds[0].close()
        ch.send(b"q", fds=[fd])
    ch.close()


def raw_ping(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        sock.sendall(b"p")
        sock.recv(1)


def raw_pong(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        sock.sendall(sock.recv(1))


# -- async -------------------------------------------------------------------------------


async def _async_stream_send(cls: Any, sock: socket.socket, n: int) -> None:
    ch = cls(sock.dup())
    fd = sys.stderr.fileno()
    send = ch.send
    for _ in range(n):
        await send(b"x", fds=[fd])
    await ch.aclose()


async def _async_stream_recv(cls: Any, sock: socket.socket, n: int) -> None:
    ch = cls(sock.dup())
    recv = ch.recv
    for _ in range(n):
        (await recv()).fds[0].close()
    await ch.aclose()


async def _async_ping(cls: Any, sock: socket.socket, n: int) -> None:
    ch = cls(sock.dup())
    fd = sys.stderr.fileno()
    for _ in range(n):
        await ch.send(b"p", fds=[fd])
        (await ch.recv()).fds[0].close()
    await ch.aclose()


async def _async_pong(cls: Any, sock: socket.socket, n: int) -> None:
    ch = cls(sock.dup())
    fd = sys.stderr.fileno()
    for _ in range(n):
        (await ch.recv()).fds[0].close()
        await ch.send(b"q", fds=[fd])
    await ch.aclose()


async def _async_loop_ping(sock: socket.socket, n: int) -> None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    for _ in range(n):
        await loop.sock_sendall(sock, b"p")
        await loop.sock_recv(sock, 1)


async def _async_loop_pong(sock: socket.socket, n: int) -> None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    for _ in range(n):
        await loop.sock_sendall(sock, await loop.sock_recv(sock, 1))


async def _trio_loop_ping(sock: socket.socket, n: int) -> None:
    s = trio.socket.from_stdlib_socket(sock)
    for _ in range(n):
        await s.send(b"p")
        await s.recv(1)


async def _trio_loop_pong(sock: socket.socket, n: int) -> None:
    s = trio.socket.from_stdlib_socket(sock)
    for _ in range(n):
        await s.send(await s.recv(1))


async def _anyio_loop_ping(sock: socket.socket, n: int) -> None:
    s = await anyio.abc.UNIXSocketStream.from_socket(sock)
    for _ in range(n):
        await s.send(b"p")
        await s.receive(1)


async def _anyio_loop_pong(sock: socket.socket, n: int) -> None:
    s = await anyio.abc.UNIXSocketStream.from_socket(sock)
    for _ in range(n):
        await s.send(await s.receive(1))


_FLOORS = {
    "trio": (_trio_loop_ping, _trio_loop_pong),
    "anyio": (_anyio_loop_ping, _anyio_loop_pong),
}


def async_sides(kind: str) -> dict[str, Side]:
    cls = channel_class(kind)

    def sync(fn: Callable[..., Any]) -> Side:
        return lambda sock, n: on_loop(kind, fn(cls, sock, n))

    def floor(fn: Callable[[socket.socket, int], Any]) -> Side:
        return lambda sock, n: on_loop(kind, fn(sock, n))

    ping, pong = _FLOORS.get(kind.partition("/")[0], (_async_loop_ping, _async_loop_pong))
    return {
        "stream_send": sync(_async_stream_send),
        "stream_recv": sync(_async_stream_recv),
        "ping": sync(_async_ping),
        "pong": sync(_async_pong),
        "loop_ping": floor(ping),
        "loop_pong": floor(pong),
    }


def bench(name: str, runs: dict[str, Callable[[], float]], rounds: int, per: int, unit: str) -> None:
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for label, fn in runs.items():
            best[label] = min(best[label], fn())
    base = best["blocking"]
    print(f"{name}:")
    for label, t in best.items():
        ratio = "" if label == "blocking" else f"   ratio {t / base:.2f}x"
        print(f"  {label:<20} {t / per * 1e6:8.2f} µs/{unit}{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--no-trio", action="store_true")
    parser.add_argument("--no-anyio", action="store_true")
    args = parser.parse_args()
    n = args.messages
    kinds = ["asyncio"] + ([] if args.no_uvloop or uvloop is None else ["uvloop"])
    if not args.no_trio and trio is not None:
        kinds.append("trio")
    if not args.no_anyio and anyio is not None:
        kinds.append("anyio/asyncio")
        if trio is not None:
            kinds.append("anyio/trio")
    sides = {kind: async_sides(kind) for kind in kinds}

    stream: dict[str, Callable[[], float]] = {
        "blocking": lambda: run_pair(blocking_stream_send, blocking_stream_recv, n)
    }
    for kind in kinds:
        s = sides[kind]
        stream[f"async/{kind}"] = lambda s=s: run_pair(s["stream_send"], s["stream_recv"], n)  # type: ignore[misc]
    bench(f"stream-1fd ({n} messages)", stream, args.rounds, n, "msg")

    m = max(1, n // 10)
    pingpong: dict[str, Callable[[], float]] = {
        "blocking": lambda: run_pair(blocking_ping, blocking_pong, m, pin=True)
    }
    for kind in kinds:
        s = sides[kind]
        pingpong[f"async/{kind}"] = lambda s=s: run_pair(s["ping"], s["pong"], m, pin=True)  # type: ignore[misc]
    bench(f"pingpong-1fd ({m} round trips, one CPU)", pingpong, args.rounds, m, "round trip")

    floor: dict[str, Callable[[], float]] = {"blocking": lambda: run_pair(raw_ping, raw_pong, m, pin=True)}
    for kind in kinds:
        s = sides[kind]
        floor[f"async/{kind}"] = lambda s=s: run_pair(s["loop_ping"], s["loop_pong"], m, pin=True)  # type: ignore[misc]
    title = f"loop-floor: 1 byte each way, no fdchannel ({m} round trips, one CPU)"
    bench(title, floor, args.rounds, m, "round trip")


if __name__ == "__main__":
    main()
