"""Workers answering through pipes they were handed, on anyio.

Runs on anyio's asyncio or trio backend.

The parent starts N workers with `fdchannel.spawn` and drives each over an
`AnyioChannel` (`from_channel` takes the blocking end over).  For every job
it makes a pipe, sends the job with the pipe's write end, closes its own
copy at once and reads the answer from the read end: the worker writes
straight into the pipe it received, the channel carries only the job.  All
of it runs in one task group; a job sent under a deadline shows what a
cancelled ``send()`` reports (``characters_written``).

Run:

    python examples/anyio_pipe_workers.py --workers 3 --jobs 12 --backend trio
    python examples/anyio_pipe_workers.py --backend asyncio

Exits 0 when every job came back right.
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio
import fdchannel
from fdchannel import Channel
from fdchannel.anyio import AnyioChannel

# -- worker process -----------------------------------------------------------


async def worker() -> None:
    """Answer each job by writing its result into the pipe sent with it."""
    async with AnyioChannel.from_channel(Channel.from_environ()) as parent:
        async for job in parent:
            with job:
                answer = b"%d: %s" % (os.getpid(), job.payload.upper())
                os.write(job.fds[0].fileno(), answer)
            # Leaving the with-block closed our copy of the write end: the
            # parent sees end-of-file once the answer is read.


# -- parent -------------------------------------------------------------------


async def read_all(fd: int) -> bytes:
    """Read the pipe *fd* to its end without blocking the run."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not chunk:
            return data
        data += chunk


async def run_job(
    channel: AnyioChannel, job: bytes, results: dict[bytes, bytes]
) -> None:
    r, w = os.pipe()
    try:
        try:
            await channel.send(job, fds=[w])
        finally:
            os.close(w)  # the channel needs no copy of ours, whatever happened
        with anyio.fail_after(10):
            results[job] = await read_all(r)
    finally:
        os.close(r)


async def parent(workers: int, jobs: int, backend: str) -> int:
    procs = []
    channels = []
    try:
        for _ in range(workers):
            proc, end = fdchannel.spawn(
                [sys.executable, __file__, "worker", "--backend", backend]
            )
            procs.append(proc)
            channels.append(AnyioChannel.from_channel(end))
        results: dict[bytes, bytes] = {}
        async with anyio.create_task_group() as group:
            for i in range(jobs):
                group.start_soon(
                    run_job, channels[i % workers], b"job %d" % i, results
                )

        # A send under a deadline that has already passed: cancelled before
        # anything was written, so characters_written says "not taken".
        with anyio.move_on_after(0):
            try:
                await channels[0].send(b"never sent")
            except anyio.get_cancelled_exc_class() as exc:
                print(
                    "cancelled send: characters_written="
                    f"{exc.characters_written} (not taken)"
                )
                raise
    finally:
        for channel in channels:
            # The workers see the end of their channel and exit.
            channel.close()
        codes = [await anyio.to_thread.run_sync(proc.wait) for proc in procs]
    ok = 0
    for i in range(jobs):
        job = b"job %d" % i
        pid, _, text = results.get(job, b"").partition(b": ")
        ok += text == job.upper()
        print(f"{job.decode()} -> worker {pid.decode()}: {text.decode()}")
    print(
        f"demo: {ok}/{jobs} jobs answered by {workers} workers "
        f"on anyio's {backend} backend"
    )
    return 0 if ok == jobs and codes == [0] * workers else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "role", nargs="?", default="parent", choices=["parent", "worker"]
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument(
        "--backend", default="asyncio", choices=["asyncio", "trio"]
    )
    args = parser.parse_args()
    if args.role == "worker":
        anyio.run(worker, backend=args.backend)
        return
    raise SystemExit(
        anyio.run(
            parent, args.workers, args.jobs, args.backend, backend=args.backend
        )
    )


if __name__ == "__main__":
    main()
