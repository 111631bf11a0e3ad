"""Privilege separation: a root parent opens files for a child that cannot.

The child drops to uid/gid 65534 ("nobody") before doing anything else, then
asks the parent for a file by name over its channel.  The parent, still
root, checks the name against its policy, opens the file and sends the open
fd; the child reads through it although it cannot open the path itself.

Run it as root: ``python examples/privsep.py``.  It creates a secret file
readable by root only, shows that the child's own ``open()`` fails, and
exits 0 when the child read the secret through the passed fd.
"""

from __future__ import annotations

import os
import sys
import tempfile

import fdchannel

NOBODY = 65534
TIMEOUT = 30.0


def child() -> int:
    """The unprivileged side: drop privileges, then use only passed fds."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    with fdchannel.Channel.from_environ() as parent:
        parent.settimeout(TIMEOUT)
        path = sys.argv[2]
        try:
            open(path).close()
            print("child: unexpectedly opened the file itself")
            return 1
        except PermissionError as exc:
            print(
                f"child (uid {os.getuid()}): "
                f"open() itself fails: {exc.strerror}"
            )
        parent.send(b"open " + path.encode())
        with parent.recv() as reply:
            if not reply.fds:
                print(f"child: parent refused: {reply.payload.decode()}")
                return 1
            with reply.fds[0].open("r") as f:
                print(
                    f"child: read through the passed fd: {f.read().strip()!r}"
                )
        parent.send(b"open /etc/shadow")  # not in the policy
        with parent.recv() as reply:
            print(f"child: asked for /etc/shadow: {reply.payload.decode()}")
            return 0 if not reply.fds else 1


def parent() -> int:
    if os.geteuid() != 0:
        print(
            "run this example as root: it drops the child to uid 65534",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as private:  # 0o700, owned by root
        secret = os.path.join(private, "secret.txt")
        with open(secret, "w") as f:
            f.write("the parent's secret\n")
        os.chmod(secret, 0o600)
        allowed = {secret}
        proc, channel = fdchannel.spawn(
            [sys.executable, __file__, "--child", secret]
        )
        with channel:
            channel.settimeout(TIMEOUT)
            try:
                for request in channel:
                    path = request.payload.decode().removeprefix("open ")
                    if path not in allowed:
                        channel.send(b"refused by policy")
                        continue
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        channel.send(b"ok", fds=[fd])
                    finally:
                        os.close(fd)  # the child has its own reference now
            finally:
                try:
                    code = proc.wait(TIMEOUT)
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
    print(f"parent: child exited with {code}")
    return code


if __name__ == "__main__":
    sys.exit(child() if sys.argv[1:2] == ["--child"] else parent())
