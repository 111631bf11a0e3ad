"""An async prefork-style dispatcher: asyncio accepts, worker processes serve.

The parent listens on a TCP port with asyncio and hands each accepted
connection to the least busy of N worker processes over an `AsyncChannel`.
Each worker runs its own event loop, turns every socket it receives into
asyncio streams and serves a line-echo protocol; when a connection ends it
tells the parent (``b"done"``) so the parent's load counts stay right.

Run:

    # serve until Ctrl-C
    python examples/aio_dispatcher.py --workers 4 --port 8000
    # self-test, then exit
    python examples/aio_dispatcher.py --workers 2 --demo 20

``--demo N`` starts N clients against the dispatcher on 127.0.0.1, checks
every echo, shuts down and exits 0.  ``--loop uvloop`` runs parent and
workers on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import fdchannel
from fdchannel import Channel
from fdchannel.aio import AsyncChannel


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


# -- worker process ----------------------------------------------------------


async def serve_connection(conn: socket.socket, parent: AsyncChannel) -> None:
    """Echo lines on *conn* (owned here) until the client closes; report."""
    reader, writer = await asyncio.open_connection(
        sock=conn
    )  # the streams own conn now
    try:
        while line := await reader.readline():
            writer.write(b"worker %d: %s" % (os.getpid(), line))
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        with contextlib.suppress(OSError, ValueError):
            await parent.send(b"done")


async def worker(parent: AsyncChannel) -> None:
    """Serve each connection the parent sends until it says ``stop``."""
    tasks: set[asyncio.Task[None]] = set()
    async with parent:
        async for msg in parent:
            if msg.payload == b"stop":
                break
            with msg:
                # The socket object takes over the fd: msg has nothing left
                # to close.
                conn = msg.fds[0].socket()
            task = asyncio.create_task(serve_connection(conn, parent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        # Let connections in flight finish (and report) before the channel
        # closes; the parent reads until it sees that close.
        if tasks:
            await asyncio.wait(tasks)


def worker_main(loop: str) -> None:
    # spawn() left our end in FDCHANNEL_FD; the async channel takes it over.
    parent = AsyncChannel.from_channel(Channel.from_environ())
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(worker(parent))


# -- dispatcher (parent) -----------------------------------------------------


class Worker:
    """One worker process, its channel (owned here) and its current load."""

    def __init__(
        self, proc: subprocess.Popen[bytes], channel: AsyncChannel
    ) -> None:
        self.proc = proc
        self.channel = channel
        self.load = 0
        self.served = 0

    async def collect(self) -> None:
        """Count the worker's ``done`` reports until it closes its end."""
        async for msg in self.channel:
            msg.close()
            self.load -= 1

    async def stop(self) -> None:
        """Ask the worker to finish, read its last reports, close the channel.

        Closing first would leave its reports unread in our socket, and a
        Unix socket closed with unread data resets the connection: the
        worker would get ConnectionResetError instead of a clean end.
        """
        with contextlib.suppress(OSError, ValueError):
            await self.channel.send(b"stop")


def start_workers(count: int, loop: str) -> list[Worker]:
    workers = []
    for _ in range(count):
        proc, channel = fdchannel.spawn(
            [sys.executable, __file__, "--worker", "--loop", loop]
        )
        workers.append(Worker(proc, AsyncChannel.from_channel(channel)))
    return workers


async def dispatch(
    listener: socket.socket, workers: list[Worker], accepts: int | None
) -> None:
    """Accept connections (*accepts* of them, or forever) for the workers."""
    loop = asyncio.get_running_loop()
    handed = 0
    while accepts is None or handed < accepts:
        conn, _ = await loop.sock_accept(listener)
        with conn:  # our copy: the worker gets its own through the channel
            target = min(workers, key=lambda w: w.load)
            target.load += 1
            target.served += 1
            await target.channel.send(b"conn", fds=[conn])
        handed += 1


async def demo_clients(port: int, count: int) -> set[bytes]:
    """Run *count* clients at once; return the worker tags that answered."""

    async def one(i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"hello %d\n" % i)
            await writer.drain()
            reply = await reader.readline()
            tag, _, echoed = reply.partition(b": ")
            assert echoed == b"hello %d\n" % i, reply
            return tag
        finally:
            writer.close()
            await writer.wait_closed()

    async with asyncio.timeout(30):
        return set(await asyncio.gather(*(one(i) for i in range(count))))


async def main_async(args: argparse.Namespace) -> None:
    workers = start_workers(args.workers, args.loop)
    collectors_done = asyncio.gather(*(w.collect() for w in workers))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", args.port))
        listener.listen(128)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        print(
            f"dispatcher: {len(workers)} workers, "
            f"listening on 127.0.0.1:{port}",
            flush=True,
        )
        if args.demo:
            dispatcher = asyncio.create_task(
                dispatch(listener, workers, args.demo)
            )
            tags = await demo_clients(port, args.demo)
            await dispatcher
            for w in workers:
                print(
                    f"worker {w.proc.pid}: {w.served} connections", flush=True
                )
            print(
                f"demo: {args.demo} clients echoed by {len(tags)} workers",
                flush=True,
            )
        else:
            await dispatch(listener, workers, None)
    finally:
        listener.close()
        for w in workers:
            await w.stop()
        try:
            async with asyncio.timeout(30):
                await (
                    collectors_done
                )  # each ends when its worker closed its end
        finally:
            for w in workers:
                await w.channel.aclose()
            for w in workers:
                returncode = await asyncio.to_thread(w.proc.wait, 30)
                if returncode != 0:
                    raise SystemExit(
                        f"worker {w.proc.pid} exited with {returncode}"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--demo",
        type=int,
        default=0,
        metavar="N",
        help="run N clients, then exit",
    )
    parser.add_argument(
        "--loop", choices=["asyncio", "uvloop"], default="asyncio"
    )
    parser.add_argument(
        "--worker", action="store_true", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker_main(args.loop)
        return
    factory = loop_factory(args.loop)
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=factory) as runner,
    ):
        runner.run(main_async(args))


if __name__ == "__main__":
    main()
