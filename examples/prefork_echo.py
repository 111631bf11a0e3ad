"""Prefork TCP echo server: the parent accepts, N worker processes serve.

The parent owns the listening socket and hands each accepted connection to
one worker (round robin) over that worker's channel; the worker echoes lines
until the client closes, then reports back on the same channel.

Run it: ``python examples/prefork_echo.py --workers 3 --clients 12``.  It
serves on 127.0.0.1 (a free port), runs that many clients against itself,
prints which worker served each, and exits 0 when every echo came back.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

import fdchannel

TIMEOUT = 30.0


def worker() -> None:
    """A worker: serve each connection the parent sends, until it stops."""
    with fdchannel.Channel.from_environ() as parent:
        for msg in parent:  # ends when the parent closes its end
            with msg, msg.fds[0].socket() as conn:
                conn.settimeout(TIMEOUT)
                with conn.makefile("rwb") as stream:
                    for line in stream:
                        stream.write(line)
                        stream.flush()
            parent.send(b"served " + msg.payload)


def client(port: int, n: int, results: list[str]) -> None:
    with socket.create_connection(
        ("127.0.0.1", port), timeout=TIMEOUT
    ) as sock:
        with sock.makefile("rwb") as stream:
            for i in range(3):
                line = f"client {n} line {i}\n".encode()
                stream.write(line)
                stream.flush()
                assert stream.readline() == line, "echo mismatch"
        results.append(f"client {n}")


def serve(workers: int, clients: int) -> int:
    procs = [
        fdchannel.spawn([sys.executable, __file__, "--worker"])
        for _ in range(workers)
    ]
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(TIMEOUT)
            port = server.getsockname()[1]
            results: list[str] = []
            threads = [
                threading.Thread(target=client, args=(port, n, results))
                for n in range(clients)
            ]
            for t in threads:
                t.start()
            for n in range(clients):
                conn, _ = server.accept()
                with (
                    conn
                ):  # the worker gets its own copy; ours is closed at once
                    proc, channel = procs[n % workers]
                    channel.send(str(n).encode(), fds=[conn])
                    print(f"connection {n} -> worker pid {proc.pid}")
            for t in threads:
                t.join(TIMEOUT)
        for w, (proc, channel) in enumerate(procs):
            channel.settimeout(TIMEOUT)
            for _ in range(
                w, clients, workers
            ):  # the connections it was given
                print(f"worker {proc.pid}: {channel.recv().payload.decode()}")
        ok = len(results) == clients
        print(
            f"{len(results)}/{clients} clients got their echoes"
            if ok
            else "some clients failed"
        )
        return 0 if ok else 1
    finally:
        for _, channel in procs:
            channel.close()  # the worker sees EOF and exits
        for proc, _ in procs:
            try:
                proc.wait(TIMEOUT)
            except BaseException:
                proc.kill()
                proc.wait()
                raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument(
        "--worker", action="store_true", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker()
        return 0
    return serve(args.workers, args.clients)


if __name__ == "__main__":
    sys.exit(main())
