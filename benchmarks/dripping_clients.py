"""Server memory under clients that declare a large payload and then drip (issue #11, point 4).

Starts a server (a threaded `Listener`, or `aio.start_server`) in this
process and CLIENTS client processes; each client sends a 26-byte header
declaring a payload just under the default ``max_payload`` (64 MiB), then
one byte every 20 ms.  Prints the server's resident memory (VmRSS) before
the clients and once every channel has read what its client sent.

    python benchmarks/dripping_clients.py [threads|asyncio] [CLIENTS]
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time

from fdchannel import Listener
from fdchannel._codec import HEADER_SIZE, pack_header
from fdchannel._core import DEFAULT_MAX_PAYLOAD
from fdchannel.aio import AsyncChannel, start_server
from fdchannel.transports import UnixRights

DRIP_BYTES = 10


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def client(path: str, stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(pack_header(UnixRights().wire_id, 0, 0, DEFAULT_MAX_PAYLOAD - 1))
    for _ in range(DRIP_BYTES):
        s.sendall(b"x")
        if stop.wait(0.02):
            break
    stop.wait(30)
    s.close()


def start_clients(
    path: str, n: int
) -> tuple[list[multiprocessing.Process], multiprocessing.synchronize.Event]:  # type: ignore[name-defined]
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    procs = [ctx.Process(target=client, args=(path, stop)) for _ in range(n)]
    for p in procs:
        p.start()
    return procs, stop


def wait_read(decoders: list, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(decoders) == n and all(d.received >= HEADER_SIZE + DRIP_BYTES for d in decoders):
            return
        time.sleep(0.05)
    raise TimeoutError("the clients' bytes did not all arrive")


def threads(path: str, n: int) -> float:
    decoders: list = []
    with Listener(path) as listener:
        procs, stop = start_clients(path, n)
        chans = []
        for _ in range(n):
            ch = listener.accept()
            chans.append(ch)
            decoders.append(ch._decoder)

            def serve(ch=ch) -> None:
                try:
                    ch.recv()
                except Exception:
                    pass

            threading.Thread(target=serve, daemon=True).start()
        wait_read(decoders, n)
        held = rss_mib()
        stop.set()
        for p in procs:
            p.join()
        for ch in chans:
            ch.close()
    return held


def aio(path: str, n: int) -> float:
    async def main() -> float:
        decoders: list = []

        async def handler(ch: AsyncChannel) -> None:
            decoders.append(ch._decoder)
            try:
                await ch.recv()
            except Exception:
                pass

        async with await start_server(path, handler):
            procs, stop = start_clients(path, n)
            await asyncio.to_thread(wait_read, decoders, n)
            held = rss_mib()
            stop.set()
            for p in procs:
                await asyncio.to_thread(p.join)
        return held

    return asyncio.run(main())


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "threads"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "srv")
        before = rss_mib()
        held = (threads if mode == "threads" else aio)(path, n)
    print(
        f"{mode}: {n} dripping clients, max_payload {DEFAULT_MAX_PAYLOAD >> 20} MiB: "
        f"server RSS {before:.0f} MiB before, {held:.0f} MiB with the clients ({held - before:+.0f} MiB)"
    )
