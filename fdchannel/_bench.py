"""``python -m fdchannel bench``: fdchannel side by side with the stdlib, Perl and raw C.

Every implementation runs every workload once per round, the rounds
interleaved (and the order rotated each round) so that machine noise hits
all alike.  The table gives the median time per unit and the spread (the
25th to 75th percentile over the rounds), then each fdchannel row's ratio
to the references, computed round by round (same round, same conditions).

Implementations: ``fdchannel`` (the compiled fast path, when it was built),
``fdchannel-pure`` (the pure-Python path, as with ``FDCHANNEL_PURE=1``),
``stdlib`` (``socket.send_fds``/``recv_fds``; ``sendall``/``recv_into`` for
payloads), ``perl`` (IO::FDPass, when ``perl -MIO::FDPass`` works),
``raw-c`` (sendmsg/recvmsg and nothing else, built on the fly when a C
compiler is found) and, for the 1-fd rows, ``python-floor``: a C extension
built on the fly whose three functions (send one fd, receive one, close
it) are each one system call with the GIL released and nothing else, the
least any Python API with a call per operation can cost.  Perl and C time
themselves, excluding their start-up.

Timing lives here, never in the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import _fastpath
from ._channel import Channel

# The workloads need AF_UNIX socketpairs, SCM_RIGHTS and fork: `_demo` does
# not import this module on Windows.
assert sys.platform != "win32"

__all__ = ["main"]

MANY = 200  # fds per message in the fd200 workload
BATCH = 64  # messages sent at once in the batch workload
BIG = 64 * 1024 * 1024  # payload bytes in the payload workload
_SRC = Path(__file__).with_name("_benchsrc")


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    count: int  # messages per round at scale 1
    per: int  # units per message (fds, MiB)
    unit: str
    unit_scale: float  # seconds -> unit shown


WORKLOADS = [
    Workload("local1", "1 fd + 1 byte, one process send+recv+close", 20000, 1, "us/msg", 1e6),
    Workload("stream1", "1 fd + 1 byte, two processes streaming", 20000, 1, "us/msg", 1e6),
    Workload("fd200", f"{MANY} fds per message, one process", 200, MANY, "ns/fd", 1e9),
    Workload("batch", f"{BATCH} 1-fd messages at once (send_many), one process", 20000, 1, "us/msg", 1e6),
    Workload("payload", "64 MiB payload into the caller's buffer, two processes", 4, 64, "ms/MiB", 1e3),
]

Runner = Callable[[int], float]  # message count -> seconds


# -- processes ---------------------------------------------------------------------


def _two_processes(
    sender: Callable[[socket.socket, int], None], receiver: Callable[[socket.socket, int], None], n: int
) -> float:
    """Fork a receiver; return the wall time from go to the receiver's last message."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the receiver
        code = 1
        try:
            a.close()
            os.close(ready_r)
            os.close(done_r)
            os.write(ready_w, b"r")
            receiver(b, n)
            os.write(done_w, b"d")
            code = 0
        finally:
            os._exit(code)
    b.close()
    os.close(ready_w)
    os.close(done_w)
    try:
        if os.read(ready_r, 1) != b"r":
            raise RuntimeError("the receiver did not start")
        start = time.perf_counter()
        sender(a, n)
        if os.read(done_r, 1) != b"d":
            raise RuntimeError("the receiver failed")
        elapsed = time.perf_counter() - start
    finally:
        os.close(ready_r)
        os.close(done_r)
        a.close()
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("the receiver failed")
    return elapsed


# -- the stdlib --------------------------------------------------------------------


def _std_local1(null: int, n: int) -> float:
    send_fds, recv_fds, close = socket.send_fds, socket.recv_fds, os.close
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        start = time.perf_counter()
        for _ in range(n):
            send_fds(a, [b"x"], [null])
            close(recv_fds(b, 1, 1)[1][0])
        return time.perf_counter() - start


def _std_send1(null: int, sock: socket.socket, n: int) -> None:
    send_fds = socket.send_fds
    for _ in range(n):
        send_fds(sock, [b"x"], [null])


def _std_recv1(sock: socket.socket, n: int) -> None:
    recv_fds, close = socket.recv_fds, os.close
    for _ in range(n):
        close(recv_fds(sock, 1, 1)[1][0])


def _std_fd200(null: int, n: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    many = [null] * MANY
    with a, b:
        start = time.perf_counter()
        for _ in range(n):
            socket.send_fds(a, [b"x"], many)
            for fd in socket.recv_fds(b, 1, MANY)[1]:
                os.close(fd)
        return time.perf_counter() - start


def _std_batch(null: int, n: int) -> float:
    send_fds, recv_fds, close = socket.send_fds, socket.recv_fds, os.close
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        start = time.perf_counter()
        for _ in range(0, n, BATCH):
            for _ in range(BATCH):
                send_fds(a, [b"x"], [null])
            for _ in range(BATCH):
                close(recv_fds(b, 1, 1)[1][0])
        return time.perf_counter() - start


def _std_send_big(sock: socket.socket, n: int) -> None:
    data = b"p" * BIG
    for _ in range(n):
        sock.sendall(data)


def _std_recv_big(sock: socket.socket, n: int) -> None:
    view = memoryview(bytearray(BIG))  # preallocated once: the best case
    for _ in range(n):
        got = 0
        while got < BIG:
            got += sock.recv_into(view[got:])


def _std_runners(null: int) -> dict[str, Runner]:
    return {
        "local1": partial(_std_local1, null),
        "stream1": partial(_two_processes, partial(_std_send1, null), _std_recv1),
        "fd200": partial(_std_fd200, null),
        "batch": partial(_std_batch, null),
        "payload": partial(_two_processes, _std_send_big, _std_recv_big),
    }


# -- fdchannel -------------------------------------------------------------------


def _fdc_pair(compiled: bool) -> tuple[Channel, Channel]:
    with _fastpath.forced(compiled):
        return Channel.pair()


def _fdc_channel(compiled: bool, sock: socket.socket) -> Channel:
    with _fastpath.forced(compiled):
        return Channel(sock.dup())


def _fdc_local1(null: int, compiled: bool, n: int) -> float:
    a, b = _fdc_pair(compiled)
    with a, b:
        send, recv, one = a.send, b.recv, [null]
        start = time.perf_counter()
        for _ in range(n):
            send(b"x", one)
            recv().close()
        return time.perf_counter() - start


def _fdc_send1(null: int, compiled: bool, sock: socket.socket, n: int) -> None:
    with _fdc_channel(compiled, sock) as ch:
        send, one = ch.send, [null]
        for _ in range(n):
            send(b"x", one)


def _fdc_recv1(compiled: bool, sock: socket.socket, n: int) -> None:
    with _fdc_channel(compiled, sock) as ch:
        recv = ch.recv
        for _ in range(n):
            recv().close()


def _fdc_fd200(null: int, compiled: bool, n: int) -> float:
    a, b = _fdc_pair(compiled)
    many = [null] * MANY
    with a, b:
        start = time.perf_counter()
        for _ in range(n):
            a.send(b"x", many)
            b.recv().close()
        return time.perf_counter() - start


def _fdc_batch(null: int, compiled: bool, n: int) -> float:
    a, b = _fdc_pair(compiled)
    with a, b:
        send_many, recv = a.send_many, b.recv
        batch = [(b"x", [null])] * BATCH
        start = time.perf_counter()
        for _ in range(0, n, BATCH):
            send_many(batch)
            for _ in range(BATCH):
                recv().close()
        return time.perf_counter() - start


def _fdc_send_big(compiled: bool, sock: socket.socket, n: int) -> None:
    data = b"p" * BIG
    with _fdc_channel(compiled, sock) as ch:
        for _ in range(n):
            ch.send(data)


def _fdc_recv_big(compiled: bool, sock: socket.socket, n: int) -> None:
    buf = bytearray(BIG)  # preallocated once, as the stdlib row's
    with _fdc_channel(compiled, sock) as ch:
        for _ in range(n):
            ch.recv_into(buf)


def _fdc_runners(null: int, compiled: bool) -> dict[str, Runner]:
    return {
        "local1": partial(_fdc_local1, null, compiled),
        "stream1": partial(
            _two_processes, partial(_fdc_send1, null, compiled), partial(_fdc_recv1, compiled)
        ),
        "fd200": partial(_fdc_fd200, null, compiled),
        "batch": partial(_fdc_batch, null, compiled),
        "payload": partial(
            _two_processes, partial(_fdc_send_big, compiled), partial(_fdc_recv_big, compiled)
        ),
    }


# -- Perl and C, timing themselves ------------------------------------------------------


def _external(argv: list[str], modes: dict[str, str]) -> dict[str, Runner]:
    def runner(mode: str) -> Runner:
        def run(n: int) -> float:
            argv_n = [*argv, mode, str(n)]
            out = subprocess.run(argv_n, capture_output=True, text=True, timeout=600, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{argv[0]} {mode} failed: {out.stderr.strip()}")
            return float(out.stdout)

        return run

    return {workload: runner(mode) for workload, mode in modes.items()}


def _perl() -> tuple[dict[str, Runner] | None, str]:
    perl = shutil.which("perl")
    if perl is None:
        return None, "no perl"
    probe = subprocess.run([perl, "-MIO::FDPass", "-e", "1"], capture_output=True, timeout=60, check=False)
    if probe.returncode != 0:
        return None, "perl has no IO::FDPass (Debian: libio-fdpass-perl)"
    script = str(_SRC / "fdpass.pl")
    return _external([perl, script], {"local1": "local1", "stream1": "stream1"}), ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _floor_module(workdir: str) -> tuple[Any, str]:
    """`_benchsrc/floor.c` built as an extension module in *workdir* and loaded, or None and why not."""
    cc = _compiler()
    include = sysconfig.get_paths()["include"]
    if cc is None or not os.path.exists(os.path.join(include, "Python.h")):
        return None, "no C compiler (cc)" if cc is None else f"no Python headers in {include}"
    so = os.path.join(workdir, "_fdbench_floor" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    argv = [cc, "-O2", "-shared", "-fPIC", f"-I{include}", "-o", so, str(_SRC / "floor.c")]
    build = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    spec = importlib.util.spec_from_file_location("_fdbench_floor", so) if build.returncode == 0 else None
    if spec is None or spec.loader is None:
        return None, f"{cc} failed: {build.stderr.strip()[:200]}"
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, ""


def _floor(null: int, workdir: str) -> tuple[dict[str, Runner] | None, str]:
    """The python-floor runners (see the module's docstring)."""
    mod, why = _floor_module(workdir)
    if mod is None:
        return None, why
    send1, recv1, close1 = mod.send1, mod.recv1, mod.close1

    def local1(n: int) -> float:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            fa, fb = a.fileno(), b.fileno()
            start = time.perf_counter()
            for _ in range(n):
                send1(fa, null)
                close1(recv1(fb))
            return time.perf_counter() - start

    def sender(sock: socket.socket, n: int) -> None:
        fa = sock.fileno()
        for _ in range(n):
            send1(fa, null)

    def receiver(sock: socket.socket, n: int) -> None:
        fb = sock.fileno()
        for _ in range(n):
            close1(recv1(fb))

    return {"local1": local1, "stream1": partial(_two_processes, sender, receiver)}, ""


def _raw_c(workdir: str) -> tuple[dict[str, Runner] | None, str]:
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc)"
    exe = os.path.join(workdir, "raw")
    build = subprocess.run(
        [cc, "-O2", "-o", exe, str(_SRC / "raw.c")], capture_output=True, text=True, timeout=120, check=False
    )
    if build.returncode != 0:
        return None, f"{cc} failed: {build.stderr.strip()[:200]}"
    modes = {"local1": "local1", "stream1": "stream1", "fd200": "fd200", "batch": "batch"}
    return _external([exe], modes), ""


# -- the run ---------------------------------------------------------------------


@dataclass
class Results:
    # (implementation, workload) -> seconds per unit, one per round
    times: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, impl: str, workload: str, seconds: float) -> None:
        self.times.setdefault((impl, workload), []).append(seconds)

    def get(self, impl: str, workload: str) -> list[float]:
        return self.times.get((impl, workload), [])


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


@contextmanager
def _null_fd() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _implementations(null: int, workdir: str, notes: list[str]) -> dict[str, dict[str, Runner]]:
    impls: dict[str, dict[str, Runner]] = {}
    if _fastpath.compiled_available():
        impls["fdchannel"] = _fdc_runners(null, compiled=True)
    else:
        notes.append(f"fdchannel (compiled): not built ({_fastpath.why_pure()})")
    impls["fdchannel-pure"] = _fdc_runners(null, compiled=False)
    impls["stdlib"] = _std_runners(null)
    others = (("perl", _perl()), ("raw-c", _raw_c(workdir)), ("python-floor", _floor(null, workdir)))
    for name, (found, why) in others:
        if found is None:
            notes.append(f"{name}: skipped ({why})")
        else:
            impls[name] = found
    return impls


def run(
    rounds: int, scale: float, workloads: list[Workload], log: Callable[[str], None]
) -> tuple[Results, list[str]]:
    """Run every implementation on *workloads* for *rounds* rounds; also return notes on what was skipped."""
    results = Results()
    notes: list[str] = []
    with _null_fd() as null, tempfile.TemporaryDirectory(prefix="fdchannel-bench-") as workdir:
        impls = _implementations(null, workdir, notes)
        names = list(impls)
        # A short unrecorded pass first: imports, caches and page faults are
        # paid there, not by whoever comes first in round 1.
        for w in workloads:
            for impl in names:
                runner = impls[impl].get(w.name)
                if runner is not None:
                    log(f"warm-up: {w.name:<8} {impl}")
                    runner(BATCH if w.name == "batch" else 1)
        for r in range(rounds):
            for w in workloads:
                n = max(1, round(w.count * scale))
                if w.name == "batch":
                    n = max(BATCH, n - n % BATCH)
                # Rotate the order each round: no implementation always goes first.
                order = names[r % len(names) :] + names[: r % len(names)]
                for impl in order:
                    runner = impls[impl].get(w.name)
                    if runner is None:
                        continue
                    log(f"round {r + 1}/{rounds}: {w.name:<8} {impl}")
                    results.add(impl, w.name, runner(n) / (n * w.per))
    return results, notes


def _ratio(results: Results, impl: str, ref: str, workload: str) -> tuple[float, float, float] | None:
    mine, theirs = results.get(impl, workload), results.get(ref, workload)
    if not mine or not theirs:
        return None
    return _quartiles([m / t for m, t in zip(mine, theirs, strict=False)])


REFERENCES = ("stdlib", "perl", "raw-c", "python-floor")


def table(results: Results, workloads: list[Workload]) -> str:
    """The Markdown tables: times per unit, then each fdchannel row's ratios to the references."""
    ours = ("fdchannel", "fdchannel-pure")
    impls = sorted({impl for impl, _ in results.times}, key=lambda i: (i not in ours, i))
    lines = ["| workload | implementation | median | p25-p75 |", "|---|---|---|---|"]
    for w in workloads:
        for impl in impls:
            values = results.get(impl, w.name)
            if values:
                med, lo, hi = (v * w.unit_scale for v in _quartiles(values))
                lines.append(f"| {w.title} | {impl} | {med:.3g} {w.unit} | {lo:.3g}-{hi:.3g} |")
    lines += ["", "| workload | fdchannel | " + " | ".join(f"vs {r}" for r in REFERENCES) + " |"]
    lines.append("|---|---|" + "---|" * len(REFERENCES))
    for w in workloads:
        for impl in ("fdchannel", "fdchannel-pure"):
            if not results.get(impl, w.name):
                continue
            cells = []
            for ref in REFERENCES:
                q = _ratio(results, impl, ref, w.name)
                cells.append("n/a" if q is None else f"{q[0]:.2f}x ({q[1]:.2f}-{q[2]:.2f})")
            lines.append(f"| {w.title} | {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(results: Results, workloads: list[Workload], path: str) -> str:
    """Draw each implementation's time relative to the stdlib; return what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install 'fdchannel[plots]')"
    impls = sorted({impl for impl, _ in results.times})
    # 7.5 in = 720 px: the docs' text column shows it at (nearly) its drawn size.
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs: list[float] = []
        meds: list[float] = []
        errs: list[list[float]] = [[], []]
        for j, w in enumerate(workloads):
            q = _ratio(results, impl, "stdlib", w.name)
            if q is None:
                continue
            xs.append(j + i * width)
            meds.append(q[0])
            errs[0].append(q[0] - q[1])
            errs[1].append(q[2] - q[0])
        ax.bar(xs, meds, width, yerr=errs, capsize=2, label=impl)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))])
    ax.set_xticklabels([w.name for w in workloads])
    ax.set_ylabel("time relative to the stdlib (lower is faster)")
    ax.set_title("fdchannel bench: median of the rounds, bars from p25 to p75")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"chart written to {path}"


def main(argv: list[str]) -> int:
    """Run ``python -m fdchannel bench``; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m fdchannel bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=11, help="rounds of every workload (default 11)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply each workload's message count")
    parser.add_argument("--only", action="append", choices=[w.name for w in WORKLOADS], help="run these only")
    parser.add_argument("--chart", default="fdchannel-bench.png", help="chart file (.png or .svg)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.scale <= 0:
        parser.error("--rounds must be at least 1 and --scale positive")
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.rounds} rounds", flush=True)
    results, notes = run(args.rounds, args.scale, workloads, log)
    for note in notes:
        print(note)
    print()
    print(table(results, workloads))
    if not args.no_chart:
        print()
        print(chart(results, workloads, args.chart))
    return 0
