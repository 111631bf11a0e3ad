"""One generation of a test server that upgrades itself with `fdchannel.upgrade`.

Run as a script by tests/test_upgrade.py.  Each generation connects to the
test's "boss" `Listener` (``TEST_BOSS``), says what it inherited and takes
commands; it serves a Unix socket (registered as ``service``) answering
each connection with its pid.  ``TEST_BEHAVIOUR`` says how a successor
behaves: ``ok``, ``crash`` (exit 3 after receiving the fds), ``hang`` (never
ready), ``refuse`` (report an error), ``wait`` (ready only when the boss
says ``ready``).  ``--async`` runs the same on `AsyncUpgrader`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import sys
import threading
from typing import Any

import fdchannel
import fdchannel.aio
from fdchannel.upgrade import AsyncUpgrader, UpgradeError, Upgrader

TIMEOUT = 30.0


def readable_among(objs: list[Any], timeout: float) -> list[Any]:
    """``select.select(objs, [], [], timeout)[0]`` with poll(): fds past 1023 too (``--ballast``)."""
    poller = select.poll()
    by_fd = {obj.fileno(): obj for obj in objs}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(int(timeout * 1000))]


def service_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(64)
    return sock


def inherited_report(up: Any) -> dict[str, Any]:
    extra = up.take_all("extra")
    ids = {(os.fstat(fd.fileno()).st_dev, os.fstat(fd.fileno()).st_ino) for fd in extra}
    report = {
        "pid": os.getpid(),
        "predecessor": up.predecessor_pid,
        "inherited": sorted(up.inherited) + (["extra"] if extra else []),
        "extra": len(extra),
        "extra_same_file": len(ids) <= 1,
        "behaviour": os.environ.get("TEST_BEHAVIOUR", "ok"),
    }
    for fd in extra:
        fd.close()
    return report


def outcome(fn: Any) -> dict[str, Any]:
    try:
        pid = fn()
    except UpgradeError as exc:
        return {
            "ok": False,
            "error": type(exc).__name__,
            "message": str(exc),
            "exit_code": getattr(exc, "exit_code", None),
            "reason": getattr(exc, "reason", None),
        }
    return {"ok": True, "pid": pid}


def handle(conn: socket.socket, up: Any) -> None:
    with conn, up.track():
        conn.settimeout(TIMEOUT)
        first = conn.recv(64)
        if first.startswith(b"hold"):
            conn.sendall(b"holding\n")
            conn.recv(64)  # in flight until the client says more
        conn.sendall(b"%d\n" % os.getpid())


def misbehave(up: Upgrader, boss: fdchannel.Channel, behaviour: str) -> int | None:
    """Act out a failing successor; the exit code, or None to go on."""
    if behaviour == "crash":
        os._exit(3)
    if behaviour == "hang":
        boss.recv()  # until killed (or the test goes away)
        return 6
    if behaviour == "refuse":
        up.refuse("bad config")
        up.close()
        return 4
    if behaviour == "wait":
        with boss.recv():
            pass
    return None


class Commands:
    """The boss's commands, each in a thread of its own, so serving and a second command go on."""

    def __init__(self, up: Upgrader, boss: fdchannel.Channel) -> None:
        self.up = up
        self.boss = boss
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def send(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.boss.send(json.dumps(event).encode())

    def start(self, text: str) -> None:
        t = threading.Thread(target=self.run, args=(text,), daemon=True)
        t.start()
        self.threads.append(t)

    def run(self, text: str) -> None:
        word, _, behaviour = text.partition(" ")
        if word == "upgrade":
            env = dict(os.environ, TEST_BEHAVIOUR=behaviour or "ok")
            argv = [sys.executable, __file__, *sys.argv[1:]]
            result = outcome(lambda: self.up.upgrade(argv, env=env))
        else:
            result = outcome(lambda: self.up.accept_upgrade(timeout=TIMEOUT))
        self.send({"event": "upgrade", **result})


def state_report(up: Upgrader, systemd: bool) -> dict[str, Any]:
    """What was inherited; with *systemd* a memfd of state goes on too ("state")."""
    state = up.take("state")
    report = inherited_report(up)
    if state is not None:
        report["state"] = os.pread(state.fileno(), 100, 0).decode()
    if systemd:
        if state is None:
            state = fdchannel.OwnedFd(os.memfd_create("state"))
            os.write(state.fileno(), b"state of generation 1")
        up.register("state", state)
        _keep.append(state)
    return report


_keep: list[Any] = []


def register_extra(up: Upgrader, count: int, report: dict[str, Any]) -> None:
    """The first generation registers *count* more fds (one memfd, many times) under "extra"."""
    if count and "extra" not in report["inherited"]:
        memfd = os.memfd_create("extra")
        up.register("extra", *[memfd] * count)


def run_blocking(args: argparse.Namespace) -> int:
    boss = fdchannel.Channel.connect(os.environ["TEST_BOSS"], timeout=TIMEOUT)
    boss.settimeout(TIMEOUT)
    try:
        up = Upgrader(
            control_path=args.control,
            pid_file=args.pid_file,
            ready_timeout=args.ready_timeout,
            systemd=args.systemd,
        )
    except UpgradeError as exc:
        boss.send(
            json.dumps({"event": "no-upgrade", "error": type(exc).__name__, "message": str(exc)}).encode()
        )
        return 5
    report = state_report(up, args.systemd)
    boss.send(json.dumps({"event": "started", **report}).encode())
    code = misbehave(up, boss, os.environ.get("TEST_BEHAVIOUR", "ok"))
    if code is not None:
        return code
    sock = up.socket("service", lambda: service_socket(args.service))
    register_extra(up, args.extra, report)
    up.ready()
    boss.send(json.dumps({"event": "ready", "pid": os.getpid()}).encode())
    commands = Commands(up, boss)
    workers: list[threading.Thread] = []
    while not up.exiting:
        readable = readable_among([sock, up, boss], TIMEOUT)
        if not readable:
            return 7
        if sock in readable and up not in readable:
            conn, _ = sock.accept()
            workers.append(threading.Thread(target=handle, args=(conn, up)))
            workers[-1].start()
        if boss in readable:
            with boss.recv() as msg:
                if msg.payload == b"store":
                    # A restart through the service manager: it keeps the fds.
                    commands.send({"event": "stored", "ok": up.store_fds()})
                    return 0
                commands.start(msg.payload.decode())
    # Stop accepting: the successor has the socket (no close of its file, no shutdown()).
    for t in commands.threads:
        t.join(TIMEOUT)  # the upgrade's own report goes first
    commands.send({"event": "exiting", "left": up.drain(TIMEOUT)})
    for t in workers:
        t.join(TIMEOUT)
    sock.detach()  # the socket stays open until exit, as a real server would leave it
    up.close()
    boss.close()
    return 0


async def run_async(args: argparse.Namespace) -> int:
    boss_sync = fdchannel.Channel.connect(os.environ["TEST_BOSS"], timeout=TIMEOUT)
    boss = fdchannel.aio.AsyncChannel.from_channel(boss_sync)
    behaviour = os.environ.get("TEST_BEHAVIOUR", "ok")
    up = await AsyncUpgrader.create(
        control_path=args.control, pid_file=args.pid_file, ready_timeout=args.ready_timeout
    )
    report = inherited_report(up)
    await boss.send(json.dumps({"event": "started", **report}).encode())
    if behaviour == "crash":
        os._exit(3)
    if behaviour == "hang":
        await boss.recv()
        return 6
    if behaviour == "refuse":
        await up.refuse("bad config")
        up.close()
        return 4
    sock = up.socket("service", lambda: service_socket(args.service))
    sock.setblocking(False)
    await up.ready()
    await boss.send(json.dumps({"event": "ready", "pid": os.getpid()}).encode())
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        while True:
            conn, _ = await loop.sock_accept(sock)
            with conn, up.track():
                await loop.sock_recv(conn, 64)
                await loop.sock_sendall(conn, b"%d\n" % os.getpid())

    async def commands() -> None:
        while True:
            with await boss.recv() as msg:
                word, _, behaviour = msg.payload.decode().partition(" ")
            try:
                if word == "upgrade":
                    env = dict(os.environ, TEST_BEHAVIOUR=behaviour or "ok")
                    pid = await up.upgrade([sys.executable, __file__, *sys.argv[1:]], env=env)
                else:
                    pid = await up.accept_upgrade(timeout=TIMEOUT)
                result: dict[str, Any] = {"ok": True, "pid": pid}
            except UpgradeError as exc:
                result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            await boss.send(json.dumps({"event": "upgrade", **result}).encode())

    tasks = [asyncio.ensure_future(serve()), asyncio.ensure_future(commands())]
    async with asyncio.timeout(TIMEOUT):
        await up.wait_exit()
    tasks[0].cancel()
    left = await up.drain(TIMEOUT)
    tasks[1].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await boss.send(json.dumps({"event": "exiting", "left": left}).encode())
    sock.detach()
    up.close()
    boss.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--service", required=True)
    parser.add_argument("--control")
    parser.add_argument("--pid-file")
    parser.add_argument("--ready-timeout", type=float, default=TIMEOUT)
    parser.add_argument("--extra", type=int, default=0)
    parser.add_argument("--async", dest="use_async", action="store_true")
    parser.add_argument("--systemd", action="store_true")
    parser.add_argument(
        "--ballast", type=int, default=0, help="fds to hold open first, so later ones are >= 1024"
    )
    args = parser.parse_args()
    if args.ballast:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = args.ballast + 1024
        if soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        ballast = [os.open(os.devnull, os.O_RDONLY) for _ in range(args.ballast)]
        assert min(ballast) < 1024 <= os.open(os.devnull, os.O_RDONLY)  # the next fds are high
    if args.control and args.control.startswith("@"):
        args.control = "\0" + args.control[1:]  # an abstract name (argv cannot hold a NUL)
    if args.use_async:
        return asyncio.run(run_async(args))
    return run_blocking(args)


if __name__ == "__main__":
    sys.exit(main())
