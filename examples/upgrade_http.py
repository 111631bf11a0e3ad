"""An HTTP server upgraded again and again under load: `fdchannel.upgrade`.

The server (stdlib `http.server`, one thread per connection) gets its
listening socket from `Upgrader.socket`: the first generation creates it,
each later one inherits it.  On SIGHUP it starts its successor
(`Upgrader.upgrade`, the child model); once the successor says it is ready
the old process stops accepting, answers the requests in flight (the next
response on a keep-alive connection says ``Connection: close``; one idle
for ``EXIT_GRACE`` is closed), and exits.  The pid file always names the
serving process.

Run it: ``python examples/upgrade_http.py``.  It starts a server, client
threads that keep sending requests over keep-alive and over new
connections, and upgrades the server ``--upgrades`` times, one SIGHUP to
the pid in the pid file each time the last generation has exited.  It
prints the tally and exits 0 when no connection was refused and no request
failed.  A keep-alive connection that the old process closed while the
client was reusing it is counted as *reset* and the request retried on a
new connection (as HTTP clients do with a stale keep-alive connection).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import http.server
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fdchannel.upgrade import UpgradeError, Upgrader

TIMEOUT = 30.0
KEEPALIVE_IDLE = 10.0  # seconds an idle keep-alive connection is kept
EXIT_GRACE = 0.5  # ... and once the process is told to exit


# -- the server ---------------------------------------------------------------


def make_handler(up: Upgrader) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def handle(self) -> None:
            self.close_connection = True
            self.handle_one_request()
            while not self.close_connection:
                if up.exiting:
                    # Once told to exit, a keep-alive connection gets one more
                    # response (with Connection: close) if its client comes
                    # back soon; closing it at once would race with a request
                    # the client is sending.
                    ready = select.select(
                        [self.connection], [], [], EXIT_GRACE
                    )[0]
                else:
                    ready = select.select(
                        [self.connection, up], [], [], KEEPALIVE_IDLE
                    )[0]
                    if up in ready and self.connection not in ready:
                        continue
                if self.connection not in ready:
                    # Idle: closed (the client's next request opens a new
                    # connection).
                    return
                self.handle_one_request()

        def do_GET(self) -> None:
            body = json.dumps({"pid": os.getpid(), "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if up.exiting:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet under load

    return Handler


class Server(http.server.ThreadingHTTPServer):
    """One thread per connection, counted as work in flight once accepted."""

    daemon_threads = True

    def __init__(self, up: Upgrader, sock: socket.socket) -> None:
        super().__init__(
            sock.getsockname(), make_handler(up), bind_and_activate=False
        )
        self.socket.close()
        self.socket = sock
        self.up = up

    def process_request(self, request: Any, client_address: Any) -> None:
        # Counted here, in the accepting thread: a connection accepted just
        # before the exit order is never missed by drain().
        work = self.up.track()
        work.__enter__()

        def run() -> None:
            try:
                self.process_request_thread(request, client_address)
            finally:
                work.__exit__(None, None, None)

        threading.Thread(target=run, daemon=True).start()


def serve(pid_file: str, port: int) -> int:
    up = Upgrader(pid_file=pid_file, ready_timeout=TIMEOUT)
    sock = up.socket(
        "http", lambda: socket.create_server(("127.0.0.1", port), backlog=1024)
    )
    httpd = Server(up, sock)

    def on_hup(_signo: int, _frame: Any) -> None:
        def upgrade() -> None:
            try:
                up.upgrade()
            except UpgradeError as exc:
                print(
                    f"pid {os.getpid()}: upgrade failed, still serving: {exc}",
                    file=sys.stderr,
                )

        threading.Thread(target=upgrade, daemon=True).start()

    # A signal may land in any thread, and only that thread's select() is
    # interrupted: the wake-up fd tells the main thread whichever it was.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGHUP, on_hup)
    up.ready()  # writes the pid file; tells the predecessor, which then exits
    if (
        up.predecessor_pid is None
    ):  # the first generation tells the orchestrator its port
        print(
            json.dumps({"pid": os.getpid(), "port": sock.getsockname()[1]}),
            flush=True,
        )
    accepting = threading.Thread(
        target=httpd.serve_forever, args=(0.05,), daemon=True
    )
    accepting.start()
    while not up.exiting:
        if wake_r in select.select([up, wake_r], [], [])[0]:
            os.read(wake_r, 512)  # the handlers ran when select() returned
    # Stops accepting; the socket stays open (the successor listens on it).
    httpd.shutdown()
    left = up.drain(TIMEOUT)
    if left:
        print(
            f"pid {os.getpid()}: {left} connections still open at the "
            "deadline",
            file=sys.stderr,
        )
    # Never shutdown() a shared listening socket; our fd goes with the
    # process.
    sock.detach()
    up.close()
    return 0


# -- the load -----------------------------------------------------------------


@dataclass
class Tally:
    connections: int = 0
    refused: int = 0
    reset: int = 0
    requests: int = 0
    failed: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    served: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.served = threading.Condition(self.lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


class Client(threading.Thread):
    """Requests in a loop, *keepalive* per connection (1: new each time)."""

    def __init__(
        self, port: int, keepalive: int, tally: Tally, stop: threading.Event
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.keepalive, self.tally, self.stop = (
            port,
            keepalive,
            tally,
            stop,
        )

    def connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=TIMEOUT
        )
        self.tally.add(connections=1)
        conn.connect()
        return conn

    def request(self, conn: http.client.HTTPConnection) -> None:
        conn.request("GET", "/")
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        pid = json.loads(data)["pid"]
        with self.tally.lock:
            self.tally.pids.add(pid)
            self.tally.requests += 1
            self.tally.served.notify_all()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn = self.connect()
            except ConnectionRefusedError:
                self.tally.add(refused=1)
                continue
            except OSError as exc:
                self.tally.failed.append(f"connect: {exc!r}")
                continue
            with contextlib.closing(conn):
                for i in range(self.keepalive):
                    if self.stop.is_set():
                        return
                    try:
                        self.request(conn)
                    except (
                        http.client.RemoteDisconnected,
                        ConnectionResetError,
                        BrokenPipeError,
                    ) as exc:
                        if i == 0:
                            self.tally.failed.append(
                                f"request on a new connection: {exc!r}"
                            )
                        else:
                            # The old process closed the idle connection as
                            # we reused it:
                            # retry on a new connection, as HTTP clients do.
                            self.tally.add(reset=1)
                        break
                    except (
                        OSError,
                        http.client.HTTPException,
                        ValueError,
                    ) as exc:
                        self.tally.failed.append(f"request: {exc!r}")
                        break
                    if conn.sock is None:  # the server said Connection: close
                        break


# -- the orchestration --------------------------------------------------------


def become_subreaper() -> None:
    """Linux: orphaned generations become our children, to wait for each."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def read_pid(pid_file: str) -> int:
    with open(pid_file) as f:
        return int(f.read())


def run(
    upgrades: int, keepalive_clients: int, new_clients: int, settle: int
) -> dict[str, Any]:
    """Start a server, load it, upgrade it *upgrades* times; the figures."""
    become_subreaper()
    with tempfile.TemporaryDirectory() as tmp:
        pid_file = os.path.join(tmp, "server.pid")
        first = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "serve",
                "--pid-file",
                pid_file,
            ],
            stdout=subprocess.PIPE,
        )
        assert first.stdout is not None
        try:
            hello = json.loads(first.stdout.readline())
            first.stdout.close()
            tally = Tally()
            stop = threading.Event()
            clients = [
                Client(hello["port"], 100, tally, stop)
                for _ in range(keepalive_clients)
            ]
            clients += [
                Client(hello["port"], 1, tally, stop)
                for _ in range(new_clients)
            ]
            for c in clients:
                c.start()
            times: list[float] = []
            try:
                for _ in range(upgrades):
                    times.append(upgrade_once(pid_file, tally, settle))
            finally:
                stop.set()
                for c in clients:
                    c.join(TIMEOUT)
            final = read_pid(pid_file)
        finally:
            with contextlib.suppress(
                ProcessLookupError, FileNotFoundError, ValueError
            ):
                os.kill(read_pid(pid_file), signal.SIGTERM)
            first.wait(TIMEOUT)
            reap_all()
    return {
        "upgrades": upgrades,
        "clients": {
            "keepalive": keepalive_clients,
            "new_connection": new_clients,
        },
        "connections_attempted": tally.connections,
        "refused": tally.refused,
        "reset": tally.reset,
        "requests": tally.requests,
        "failed_requests": len(tally.failed),
        "failures": tally.failed[:10],
        "generations_seen": len(tally.pids),
        "final_pid": final,
        "upgrade_to_exit_ms": {
            "median": round(statistics.median(times) * 1000, 1)
            if times
            else None,
            "max": round(max(times) * 1000, 1) if times else None,
        },
    }


def upgrade_once(pid_file: str, tally: Tally, settle: int) -> float:
    """SIGHUP the serving process and wait for its exit; return the seconds."""
    old = read_pid(pid_file)
    with tally.served:  # let each generation serve some requests first
        target = tally.requests + settle
        tally.served.wait_for(lambda: tally.requests >= target, TIMEOUT)
    start = time.monotonic()
    os.kill(old, signal.SIGHUP)
    _, status = os.waitpid(
        old, 0
    )  # our child, or an orphan we inherited as subreaper
    elapsed = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"generation {old} exited with status {status}")
    if read_pid(pid_file) == old:
        raise RuntimeError(
            f"generation {old} exited but the pid file still names it"
        )
    return elapsed


def reap_all() -> None:
    """Wait for every generation still ours (as subreaper) after the last."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    srv = sub.add_parser(
        "serve",
        help="one server generation (started by the orchestrator, or its own)",
    )
    srv.add_argument("--pid-file", required=True)
    srv.add_argument("--port", type=int, default=0)
    parser.add_argument("--upgrades", type=int, default=5)
    parser.add_argument("--keepalive-clients", type=int, default=2)
    parser.add_argument("--new-clients", type=int, default=2)
    parser.add_argument(
        "--settle",
        type=int,
        default=50,
        help="requests served between upgrades",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the figures as JSON"
    )
    args = parser.parse_args()
    if args.role == "serve":
        return serve(args.pid_file, args.port)
    figures = run(
        args.upgrades, args.keepalive_clients, args.new_clients, args.settle
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key}: {value}")
    ok = figures["refused"] == 0 and figures["failed_requests"] == 0
    ok = ok and figures["generations_seen"] == args.upgrades + 1
    print(
        "zero refused connections and zero failed requests" if ok else "FAILED"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
