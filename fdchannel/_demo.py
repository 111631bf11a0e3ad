"""``python -m fdchannel demo``: a parent hands a child three kinds of fd.

The parent opens a file, a pipe and a listening TCP socket, sends them with
a payload in one message, and the child uses each: it reads the file, writes
into the pipe, and serves one connection on the socket.  Both sides print
what they do, so the transcript shows the fds at work in the other process,
under other numbers there: an fd number means something in one process only.

The transcript is in causal order however the two processes are scheduled:
each side prints only while the other waits for what this side does next
(the child reports on the channel before the parent reads the pipe, and
answers the TCP connection only after printing), so no line can overtake
another.
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
    # Flushed before this side goes on: the other side's next line waits for
    # what this side does next, so it cannot come out first.
    print(f"[{who} {os.getpid()}] {text}", flush=True)


def _identity(fd: int) -> list[int] | None:
    """The open file behind *fd*, the same in every process: device and inode.

    None where ``fstat`` cannot tell (a Windows socket is no CRT fd).
    """
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def parent() -> int:
    """Run the parent side; return the exit code."""
    proc, channel = spawn([sys.executable, "-m", "fdchannel", "demo-child"])
    with channel:
        channel.settimeout(TIMEOUT)
        # Opened in this order and sent pipe first, the three get other
        # numbers in the child than here (a fresh child numbers them from 3,
        # skipping its channel's fd): the transcript shows numbers do not travel.
        r, w = os.pipe()
        listener = None
        try:
            with tempfile.TemporaryFile() as f:
                listener = socket.create_server(("127.0.0.1", 0))
                port = listener.getsockname()[1]
                f.write(b"a line written by the parent before the fd left\n")
                f.flush()  # the child gets the fd, not this process's buffer
                f.seek(0)  # the offset is shared: the child reads from here
                fds = [w, f.fileno(), listener.fileno()]
                _say(
                    "parent",
                    f"sending 3 fds: a pipe's write end (fd {fds[0]}), a temporary file "
                    f"(fd {fds[1]}) and a listening TCP socket on port {port} (fd {fds[2]}); "
                    "it closes its own pipe end and socket right after",
                )
                payload = {"fds": fds, "files": [_identity(fd) for fd in fds], "port": port}
                channel.send(json.dumps(payload).encode(), fds=[w, f, listener])
            # The child has its own copies now; closing ours proves it.
            os.close(w)
            w = -1
            listener.close()
            with channel.recv() as step:  # the child has written into the pipe
                if step.payload != b"pipe written":
                    raise RuntimeError(f"unexpected report from the child: {step.payload!r}")
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
            if listener is not None:
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
            ours = [int(fd.fileno()) for fd in msg.fds]
            same = all(
                mine is None or theirs is None or mine == theirs
                for mine, theirs in zip((_identity(fd) for fd in ours), info["files"], strict=True)
            )
            _say(
                "child",
                f"received 3 fds: here they are fds {ours}, in the parent fds {info['fds']}: "
                f"other numbers, {'the same' if same else 'NOT the same'} open files",
            )
            pipe_fd, file_fd, sock_fd = msg.fds
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
                # Printed first, then reported: the parent's next line waits for this.
                channel.send(b"pipe written")
                srv.settimeout(TIMEOUT)
                conn, addr = srv.accept()
                with conn:
                    data = conn.recv(200)
                    _say("child", f"accepted a connection from {addr[0]}, got {data.decode()!r}")
                    conn.sendall(data.upper())
        channel.send(b"file read, pipe written, one TCP connection served")
    return 0 if same else 1


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
