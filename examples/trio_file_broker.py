"""A file broker on trio: a server opens files, clients get the fds.

The broker serves a Unix socket with `fdchannel.trio.serve` (handlers in a
nursery).  Each request is a file name; the broker checks it against the
directory it shares, opens the file read-only and sends the open fd back
(or an error message).  The clients are separate processes: they never
open the files themselves, they read through the fds they received.

Run:

    python examples/trio_file_broker.py --clients 4     # self-test, then exit

It creates a scratch directory with a few files, starts the broker, runs
the clients (``python trio_file_broker.py client SOCKET NAME``), checks
what each read, shuts the broker down and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable

import fdchannel.trio
import trio
from fdchannel.trio import TrioChannel


def broker_handler(root: str) -> Callable[[TrioChannel], Awaitable[None]]:
    """A handler answering each request with an open fd (or an error)."""

    async def handle(channel: TrioChannel) -> None:
        async for request in channel:
            with request:
                name = os.fsdecode(request.payload)
            if os.sep in name or name.startswith("."):
                await channel.send(
                    b"error: only plain names in the shared directory"
                )
                continue
            try:
                fd = os.open(
                    os.path.join(root, name), os.O_RDONLY | os.O_CLOEXEC
                )
            except OSError as exc:
                await channel.send(b"error: " + str(exc).encode())
                continue
            try:
                await channel.send(b"ok", fds=[fd])
            finally:
                # Ours to close as soon as send() returns or raises.
                os.close(fd)

    return handle


async def client(path: str, name: str) -> None:
    """Ask the broker for *name* and print what the received fd reads."""
    async with await fdchannel.trio.connect(path) as channel:
        creds = channel.peer_credentials()
        await channel.send(name.encode())
        with trio.fail_after(10):
            reply = await channel.recv()
        with reply:
            if reply.payload != b"ok":
                print(
                    f"client {os.getpid()}: {name}: {reply.payload.decode()}"
                )
                return
            data = os.read(reply.fds[0].fileno(), 1000)
        print(
            f"client {os.getpid()}: {name} from broker pid {creds.pid}: "
            f"{data.decode()!r}"
        )


async def demo(clients: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "shared")
        os.mkdir(root)
        names = [f"file{i}.txt" for i in range(clients)]
        for name in names:
            with open(os.path.join(root, name), "w") as f:
                f.write(f"contents of {name}")
        path = os.path.join(tmp, "broker.sock")
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                fdchannel.trio.serve, broker_handler(root), path
            )
            print(f"broker: serving {server.path}")
            outputs: list[str] = []

            async def run_client(name: str) -> None:
                done = await trio.run_process(
                    [sys.executable, __file__, "client", path, name],
                    capture_stdout=True,
                )
                outputs.append(done.stdout.decode())

            async with trio.open_nursery() as group:
                for name in [*names, "../escape", "missing.txt"]:
                    group.start_soon(run_client, name)
            server.close()  # serve() returns once its handlers are done
        ok = sum(
            f"{n} from broker" in out and f"contents of {n}" in out
            for out in outputs
            for n in names
        )
        refused = sum("error:" in out for out in outputs)
        print("".join(sorted(outputs)), end="")
        print(
            f"demo: {ok}/{clients} clients read their file through the "
            f"broker, {refused} refused"
        )
        if ok != clients or refused != 2:
            raise SystemExit(1)


def main() -> None:
    if sys.argv[1:2] == ["client"]:
        trio.run(client, sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    trio.run(demo, args.clients)


if __name__ == "__main__":
    main()
