"""Restart without dropping connections: hand a listening socket on.

An "old" server process listens on 127.0.0.1 and answers each connection
with its name.  A "new" server process starts, connects to the old one's
control `Listener` and receives the listening socket itself over a channel;
the old one then closes its copy and exits.  The socket never stops
listening, so connections that arrive during the handoff wait in its backlog
and the new process accepts them: a client that keeps connecting throughout
sees no refused connection.

Run it: ``python examples/handoff.py``.  It starts both servers and a client
loop, prints the tally and exits 0 when the client saw both servers and not
a single refused or failed connection.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys
import tempfile
import threading

import fdchannel

TIMEOUT = 30.0
ROUNDS = 20  # answers the client wants from each server


def answer(listening: socket.socket, name: bytes) -> None:
    conn, _ = listening.accept()
    with conn:
        conn.sendall(name + b"\n")


def server(name: str, control: str, takeover: bool) -> int:
    """One server generation.

    The orchestrator's channel (FDCHANNEL_FD) says when to stop.
    """
    boss = fdchannel.Channel.from_environ()
    if takeover:
        with fdchannel.Channel.connect(control, timeout=TIMEOUT) as old:
            with old.recv() as msg:
                listening = msg.fds[0].socket()
            # After this the old process lets go of its copy.
            old.send(b"ready")
        handoff = None
    else:
        listening = socket.create_server(("127.0.0.1", 0), backlog=128)
        handoff = fdchannel.Listener(control, mode=0o600)
        boss.send(b"%d" % listening.getsockname()[1])
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(boss)
        cleanup.enter_context(listening)
        if handoff is not None:
            cleanup.callback(handoff.close)
        poller = select.poll()
        poller.register(listening, select.POLLIN)
        poller.register(boss, select.POLLIN)
        if handoff is not None:
            poller.register(handoff, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll(int(TIMEOUT * 1000))}
            if not ready or boss.fileno() in ready:
                return 0  # told to stop (or nothing happened for too long)
            if listening.fileno() in ready:
                answer(listening, name.encode())
            if handoff is not None and handoff.fileno() in ready:
                with handoff.accept() as successor:
                    successor.settimeout(TIMEOUT)
                    # From here on we accept nothing: new connections queue
                    # in the backlog for the successor.
                    successor.send(b"listening socket", fds=[listening])
                    ok = successor.recv().payload == b"ready"
                boss.send(b"handed off" if ok else b"handoff failed")
                return 0 if ok else 1


class Client(threading.Thread):
    """Connects again and again, counting who answered and what failed."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.seen = {b"old": 0, b"new": 0}
        self.refused = 0
        self.failed: list[str] = []
        self.saw_old = threading.Event()
        self.saw_new = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=TIMEOUT
                ) as sock:
                    reply = b"".join(iter(lambda: sock.recv(64), b"")).strip()
            except ConnectionRefusedError:
                self.refused += 1
                continue
            except OSError as exc:
                self.failed.append(repr(exc))
                if len(self.failed) > 10:
                    return
                continue
            if reply not in self.seen:
                self.failed.append(f"unexpected reply {reply!r}")
                continue
            self.seen[reply] += 1
            if self.seen[b"old"] >= ROUNDS:
                self.saw_old.set()
            if self.seen[b"new"] >= ROUNDS:
                self.saw_new.set()
                return


def orchestrate() -> int:
    here = [sys.executable, __file__, "server", "--control"]
    with tempfile.TemporaryDirectory() as tmp:
        control = os.path.join(tmp, "control.sock")
        old, old_ch = fdchannel.spawn([*here, control, "--name", "old"])
        procs = [(old, old_ch)]
        try:
            old_ch.settimeout(TIMEOUT)
            port = int(old_ch.recv().payload)
            client = Client(port)
            client.start()
            try:
                if not client.saw_old.wait(TIMEOUT):
                    print("the old server never answered")
                    return 1
                # The client keeps connecting while the new generation
                # takes over.
                new, new_ch = fdchannel.spawn(
                    [*here, control, "--name", "new", "--takeover"]
                )
                procs.append((new, new_ch))
                print(f"old server: {old_ch.recv().payload.decode()}")
                if old.wait(TIMEOUT) != 0:
                    return 1
                client.saw_new.wait(TIMEOUT)
            finally:
                client.stop.set()
                client.join(TIMEOUT)
        finally:
            for proc, channel in procs:
                channel.close()  # a server exits when its channel closes
                try:
                    proc.wait(TIMEOUT)
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
    print(
        f"answers: old={client.seen[b'old']} new={client.seen[b'new']}; "
        f"refused={client.refused} failed={len(client.failed)}"
    )
    for failure in client.failed:
        print(f"  {failure}")
    ok = (
        client.refused == 0
        and not client.failed
        and client.saw_old.is_set()
        and client.saw_new.is_set()
    )
    print("zero refused connections across the handoff" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    srv = sub.add_parser(
        "server", help="run one server generation (used by the orchestrator)"
    )
    srv.add_argument("--control", required=True)
    srv.add_argument("--name", required=True)
    srv.add_argument("--takeover", action="store_true")
    args = parser.parse_args()
    if args.role == "server":
        return server(args.name, args.control, args.takeover)
    return orchestrate()


if __name__ == "__main__":
    sys.exit(main())
