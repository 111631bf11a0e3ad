"""``python -m fdchannel demo``: a parent hands a child three kinds of fd.

The parent opens a file, a pipe and a listening TCP socket, sends them with
a payload in one message, and the child uses each: it reads the file, writes
into the pipe, and serves one connection on the socket.  Both sides print
what they do, so the transcript shows the fds at work in the other process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile

from ._channel import Channel
from ._process import spawn

TIMEOUT = 30.0


def _say(who: str, text: str) -> None:
    print(f"[{who} {os.getpid()}] {text}", flush=True)


def parent() -> int:
    """Run the parent side; return the exit code."""
    proc, channel = spawn([sys.executable, "-m", "fdchannel", "demo-child"])
    r, w = os.pipe()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        with channel, tempfile.TemporaryFile() as f:
            channel.settimeout(TIMEOUT)
            f.write(b"a line written by the parent before the fd left\n")
            f.flush()
            f.seek(0)
            payload = {"file": "a temporary file (no name)", "pipe": "write end", "socket": port}
            _say(
                "parent",
                f"sending 3 fds (file fd {f.fileno()}, pipe fd {w}, listening socket on port {port})",
            )
            channel.send(json.dumps(payload).encode(), fds=[f, w, listener])
            # The child has its own copies now; closing ours proves it.
            os.close(w)
            w = -1
            listener.close()
            _say("parent", "closed its own copies of the pipe's write end and of the listening socket")
            if sys.platform != "win32":
                os.set_blocking(r, True)
            _say("parent", f"read from the pipe: {os.read(r, 200).decode().strip()!r}")
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
                conn.sendall(b"hello over TCP")
                _say("parent", f"connected to port {port}, the child answered {conn.recv(200).decode()!r}")
            with channel.recv() as done:
                _say("parent", f"child reports: {done.payload.decode()}")
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        listener.close()
    code = proc.wait(TIMEOUT)
    _say("parent", f"child exited with status {code}")
    return code


def child() -> int:
    """Run the child side (started by `parent`)."""
    with Channel.from_environ() as channel:
        channel.settimeout(TIMEOUT)
        with channel.recv() as msg:
            info = json.loads(msg.payload)
            _say("child", f"received {len(msg.fds)} fds with payload {info}")
            file_fd, pipe_fd, sock_fd = msg.fds
            with file_fd.open("rb") as f:
                _say("child", f"read from the file: {f.read().decode().strip()!r}")
            with pipe_fd.open("wb", buffering=0) as pipe:
                pipe.write(b"hello through the pipe, from the child\n")
            _say("child", "wrote into the pipe")
            with sock_fd.socket() as srv:
                _say(
                    "child",
                    f"listening socket: family={srv.family.name} type={srv.type.name} {srv.getsockname()}",
                )
                srv.settimeout(TIMEOUT)
                conn, addr = srv.accept()
                with conn:
                    data = conn.recv(200)
                    _say("child", f"accepted a connection from {addr[0]}, got {data.decode()!r}")
                    conn.sendall(data.upper())
        channel.send(b"file read, pipe written, one TCP connection served")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``python -m fdchannel``."""
    if argv[:1] == ["demo"]:
        return parent()
    if argv[:1] == ["demo-child"]:
        return child()
    if argv[:1] == ["bench"]:
        if sys.platform != "win32":
            from ._bench import main as bench

            return bench(argv[1:])
        print("python -m fdchannel bench needs AF_UNIX socketpairs and fork", file=sys.stderr)
        return 2
    print("usage: python -m fdchannel demo | bench [--help]", file=sys.stderr)
    return 2
