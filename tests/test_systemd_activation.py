"""Socket activation: `fdchannel.systemd.listen_fds` against the real `systemd-socket-activate`.

The program binds the sockets, waits for a first connection and execs a
Python server with them; the server reports what `listen_fds` gave it over
each connection it accepts.  The malformed-variable cases run in a forked
child that puts real sockets at fds 3 and up; where libsystemd's
``sd_listen_fds_with_names`` (ctypes on libsystemd.so.0) reads a value, the
child asks it first.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._proc import TIMEOUT, run_child
from ._systemd import libsystemd, posix_only, sd_listen_fds_with_names, socket_activate_program

pytestmark = posix_only

REPO = Path(__file__).resolve().parent.parent

SERVER = r"""
import json, os, socket, sys
from fdchannel import systemd

pid_was = os.environ.get("LISTEN_PID")
fds = systemd.listen_fds()
report = {
    "pid_ok": pid_was == str(os.getpid()),
    "names": {name: [fd.fileno() for fd in group] for name, group in fds.items()},
    "inheritable": [os.get_inheritable(fd.fileno()) for group in fds.values() for fd in group],
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
socks = [(name, fd.socket()) for name, group in fds.items() for fd in group]
for name, sock in socks:
    with sock:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(json.dumps(dict(report, served_by=name)).encode())
"""


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*names: str | None) -> list[str]:
        program = socket_activate_program()
        paths = [str(tmp_path / f"s{i}.sock") for i in range(len(names))]
        args = [program]
        for path in paths:
            args += ["-l", path]
        if any(names):
            args.append("--fdname=" + ":".join(n or "" for n in names))
        args += ["-E", f"PYTHONPATH={REPO}", sys.executable, "-c", SERVER]
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        procs.append(proc)
        wait_for_lines(proc, "Listening on", len(paths))
        return paths

    yield start
    for proc in procs:
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            assert proc.stderr is not None
            proc.stderr.close()


def wait_for_lines(proc: subprocess.Popen[bytes], prefix: str, count: int) -> None:
    """Read the program's stderr until *count* lines start with *prefix* (its sockets are bound)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + TIMEOUT
    seen, buf = 0, b""
    while seen < count:
        left = deadline - time.monotonic()
        assert left > 0, f"systemd-socket-activate said only {buf!r}"
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 4096)
        assert chunk, f"systemd-socket-activate exited; it said {buf!r}"
        buf += chunk
        seen = sum(
            line.startswith(prefix.encode()) for line in buf.splitlines(keepends=True) if line.endswith(b"\n")
        )


def ask(path: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    result: dict[str, object] = json.loads(data)
    return result


def test_one_socket_without_names(activate: object) -> None:
    (path,) = activate(None)  # type: ignore[operator]
    report = ask(path)
    assert report["names"] == {"unknown": [3]}  # libsystemd's name when LISTEN_FDNAMES is unset
    assert report["inheritable"] == [False]
    assert report["pid_ok"] is True
    assert report["left"] == []


def test_one_named_socket(activate: object) -> None:
    (path,) = activate("http")  # type: ignore[operator]
    report = ask(path)
    assert report["names"] == {"http": [3]}
    assert report["served_by"] == "http"
    assert report["left"] == []


def test_several_named_sockets(activate: object) -> None:
    paths = activate("http", "admin", "http")  # type: ignore[operator]
    # The server accepts on its sockets name by name: fds 3, 5, then 4.
    reports = [ask(paths[0]), ask(paths[2]), ask(paths[1])]
    # A name shared by two sockets lists both, in the order passed.
    assert reports[0]["names"] == {"http": [3, 5], "admin": [4]}
    assert [r["served_by"] for r in reports] == ["http", "http", "admin"]
    assert all(r["inheritable"] == [False, False, False] for r in reports)
    assert all(r["left"] == [] for r in reports)


# -- the variables, one case at a time, in a child with real sockets at 3.. ---------


def in_child_with_fds(count: int, env: dict[str, str], body: object) -> None:
    """Fork; in the child put *count* inheritable sockets at fds 3.., set *env*, run body(inodes)."""

    def child() -> None:
        try:
            os.close(3 + count)  # the fork's copy of whatever pytest has there: "not open" means it
        except OSError:
            pass
        inodes = []
        for i in range(count):
            a, b = socket.socketpair()
            if a.fileno() == 3 + i:  # the number was free: dup2() would be a no-op, close() would free it
                os.set_inheritable(3 + i, True)
                a.detach()
            else:
                os.dup2(a.fileno(), 3 + i)  # inheritable, as a manager passes them
                a.close()
            b.detach()  # the child exits at once; leaving the peer open keeps 3+i alive
            inodes.append(os.fstat(3 + i).st_ino)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        os.environ.update({k: with_pid(v) for k, v in env.items()})
        body(inodes)  # type: ignore[operator]

    run_child(child)


def with_pid(text: str) -> str:
    """*text* with ``{pid}`` this process's id in decimal, ``{oct}`` in octal."""
    return text.replace("{pid}", str(os.getpid())).replace("{oct}", format(os.getpid(), "o"))


def test_fds_owned_and_close_on_exec() -> None:
    def body(inodes: list[int]) -> None:
        from fdchannel import OwnedFd
        from fdchannel.systemd import listen_fds

        fds = listen_fds()
        assert list(fds) == ["a", "b"]
        got = [fd for group in fds.values() for fd in group]
        assert all(isinstance(fd, OwnedFd) for fd in got)
        assert [os.fstat(fd.fileno()).st_ino for fd in got] == inodes
        assert not any(os.get_inheritable(fd.fileno()) for fd in got)
        assert not any(k in os.environ for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
        for fd in got:
            fd.close()
        try:
            os.fstat(3)
        except OSError:
            pass
        else:
            raise AssertionError("closing the OwnedFd left fd 3 open")

    in_child_with_fds(2, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}, body)


def test_keep_environment_on_request() -> None:
    def body(_inodes: list[int]) -> None:
        from fdchannel.systemd import listen_fds

        fds = listen_fds(unset_environment=False)
        assert os.environ["LISTEN_FDS"] == "1"
        fds["unknown"][0].close()

    in_child_with_fds(1, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1"}, body)


@pytest.mark.parametrize(
    "env",
    [
        {},  # not activated
        {"LISTEN_FDS": "1"},  # no LISTEN_PID
        {"LISTEN_PID": "1", "LISTEN_FDS": "1"},  # another process's (inherited) variables
        {"LISTEN_PID": "{pid}"},  # no LISTEN_FDS
    ],
)
def test_not_for_us(env: dict[str, str]) -> None:
    def body(inodes: list[int]) -> None:
        from fdchannel.systemd import listen_fds

        assert listen_fds() == {}
        assert os.fstat(3).st_ino == inodes[0]  # untouched
        assert os.get_inheritable(3)
        assert "LISTEN_FDS" not in os.environ
        assert "LISTEN_PID" not in os.environ

    in_child_with_fds(1, env, body)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID='abc' is not a decimal number"),
        ({"LISTEN_PID": " {pid}", "LISTEN_FDS": "1"}, "is not a decimal number"),
        ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID='0' is not a process id"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a decimal number"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "1x"}, "LISTEN_FDS='1x'"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "99999999999"}, "larger than any fd table"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, "has 1 names for LISTEN_FDS=2"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b:c"}, "has 3 names"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "3"}, "names fd 5, which is not open"),
    ],
)
def test_malformed_variables(env: dict[str, str], words: str) -> None:
    def body(inodes: list[int]) -> None:
        from fdchannel.systemd import ActivationError, listen_fds

        try:
            listen_fds()
        except ActivationError as exc:
            assert isinstance(exc, ValueError)
            assert words.replace("{pid}", str(os.getpid())) in str(exc), str(exc)
        else:
            raise AssertionError("no ActivationError")
        # Nothing taken: the fds are open, still inheritable, still the same.
        assert [os.fstat(3 + i).st_ino for i in range(2)] == inodes
        assert os.get_inheritable(3)
        assert os.get_inheritable(4)
        # Unset even on error, as sd_listen_fds(1) does.
        assert "LISTEN_PID" not in os.environ
        assert "LISTEN_FDS" not in os.environ

    in_child_with_fds(2, env, body)


def test_fds_are_handed_out_once() -> None:
    """libsystemd returns the same numbers again; a second OwnedFd for each would close them twice."""

    def body(inodes: list[int]) -> None:
        from fdchannel.systemd import ActivationError, listen_fds

        (fd,) = listen_fds(unset_environment=False)["unknown"]
        with pytest.raises(ActivationError, match="handed these fds out already"):
            listen_fds(unset_environment=False)
        assert os.environ["LISTEN_FDS"] == "1"  # kept, as asked
        with pytest.raises(ActivationError, match="handed these fds out already"):
            listen_fds()
        assert "LISTEN_FDS" not in os.environ  # removed all the same
        assert listen_fds() == {}

        def forked() -> None:
            # The copy of `fd` owns fd 3 here too.
            os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
            with pytest.raises(ActivationError, match="forked from"):
                listen_fds()

        run_child(forked)
        assert os.fstat(fd.fileno()).st_ino == inodes[0]
        assert not fd.closed
        fd.close()

    in_child_with_fds(1, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1"}, body)


@pytest.mark.parametrize("unset", [True, False])
def test_interrupted_handout_closes_every_fd(unset: bool) -> None:
    def body(inodes: list[int]) -> None:
        from fdchannel.systemd import ActivationError, listen_fds

        real = os.set_inheritable

        def interrupted(fd: int, inheritable: bool) -> None:
            if fd == 4:
                raise KeyboardInterrupt  # where a signal handler's exception would come out
            real(fd, inheritable)

        os.set_inheritable = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                listen_fds(unset_environment=unset)
        finally:
            os.set_inheritable = real
        # Closed at once, the one already wrapped too (the traceback still
        # holds the frames): no fd left without an owner.
        for fd in (3, 4):
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(fd)
        assert ("LISTEN_FDS" in os.environ) == (not unset)
        # The numbers go to other files; the variables, if kept, still name
        # them, and they are not handed out again.
        a, b = socket.socketpair()
        with a, b:
            assert sorted([a.fileno(), b.fileno()]) == [3, 4]
            if not unset:
                with pytest.raises(ActivationError, match="failed part-way"):
                    listen_fds()
            else:
                assert listen_fds() == {}
            os.fstat(a.fileno())
            os.fstat(b.fileno())

    in_child_with_fds(2, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2"}, body)


def test_empty_fdnames_is_one_empty_name() -> None:
    lib = libsystemd()

    def body(inodes: list[int]) -> None:
        from fdchannel.systemd import listen_fds

        assert sd_listen_fds_with_names(lib, 2) == [""]
        fds = listen_fds()
        assert list(fds) == [""]
        (fd,) = fds[""]
        assert os.fstat(fd.fileno()).st_ino == inodes[0]
        fd.close()

    in_child_with_fds(2, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""}, body)


@pytest.mark.parametrize(
    ("passed", "env", "theirs", "words"),
    [
        # A manager with nothing to pass sets no variable; libsystemd refuses a 0.
        (1, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"}, -errno.EINVAL, "LISTEN_FDS='0' passes no fd"),
        # A leading zero is octal to libsystemd, decimal to int(): which
        # process's (or how many) fds they are depends on who reads it.
        (
            1,
            {"LISTEN_PID": "0{oct}", "LISTEN_FDS": "1"},
            ["unknown"],
            "LISTEN_PID='0{oct}' has a leading zero",
        ),
        (
            1,
            {"LISTEN_PID": "0{pid}", "LISTEN_FDS": "1"},
            "not ours",
            "LISTEN_PID='0{pid}' has a leading zero",
        ),
        (10, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "010"}, ["unknown"] * 8, "LISTEN_FDS='010' has a leading"),
    ],
)
def test_refused_where_libsystemd_refuses_or_reads_otherwise(
    passed: int, env: dict[str, str], theirs: object, words: str
) -> None:
    lib = libsystemd()

    def body(inodes: list[int]) -> None:
        from fdchannel.systemd import ActivationError, listen_fds

        got = sd_listen_fds_with_names(lib, passed)
        if theirs == "not ours":
            assert got in (0, -errno.EINVAL)  # another pid in octal, or no octal number at all
        else:
            assert got == theirs
        with pytest.raises(ActivationError, match=with_pid(words)):
            listen_fds()
        assert [os.fstat(3 + i).st_ino for i in range(passed)] == inodes
        assert all(os.get_inheritable(3 + i) for i in range(passed))
        assert "LISTEN_PID" not in os.environ

    in_child_with_fds(passed, env, body)
