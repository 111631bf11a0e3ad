"""PidfdGetfd is no confused deputy: forged frames never make a receiver pull fds it should not.

Real processes, real privileges: a root service and a client running as uid
65534 that cannot open the service's root-only file nor ptrace the service.
The client writes hand-made frames on its own connection; each attack of
the adversarial review (issue 11, point 1) must leave the service with
`UnverifiedSender`, nothing delivered and nothing leaked.  Fd numbers the
attacker would have to guess are handed to it over a control socket (the
numbers are predictable in practice; the tests need them exact).
"""

from __future__ import annotations

import sys

import pytest

if sys.platform != "linux":
    pytest.skip("PidfdGetfd needs Linux", allow_module_level=True)

import json
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fdchannel import Channel, ProtocolError, UnverifiedSender
from fdchannel._codec import HEADER_SIZE, pack_header
from fdchannel.transports import PidfdGetfd
from fdchannel.transports._pidfd_linux import pack_refs
from fdchannel.transports._pull import HEAD

from ._proc import TIMEOUT, fork_child, wait_child
from ._transports import PIDFD_UNAVAILABLE

pytestmark = [
    pytest.mark.skipif(PIDFD_UNAVAILABLE is not None, reason=PIDFD_UNAVAILABLE or ""),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: a root service and a client that drops to uid 65534"
    ),
]

NOBODY = 65534
SECRET = b"root-only secret"
KINDS = ["unix", "tcp"]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file only root can open: mode 0600 in a mode-0700 directory."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = private / "secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def drop_privileges() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def listen(kind: str) -> socket.socket:
    if kind == "unix":
        # Abstract: reachable by uid 65534 without a world-writable directory.
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(f"\0fdchannel-deputy-{os.getpid()}-{id(lst)}")
    else:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    lst.settimeout(TIMEOUT)
    return lst


def connect(lst_addr: Any, kind: str) -> socket.socket:
    family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(lst_addr)
    return sock


def accept(lst: socket.socket) -> Channel:
    conn, _ = lst.accept()
    conn.settimeout(None)
    chan = Channel(conn, transport=PidfdGetfd())
    chan.settimeout(TIMEOUT)
    return chan


def put(ctl: socket.socket, obj: object) -> None:
    ctl.sendall(json.dumps(obj).encode() + b"\n")


def get(ctl: socket.socket) -> Any:
    ctl.settimeout(TIMEOUT)
    data = b""
    while not data.endswith(b"\n"):
        more = ctl.recv(1)
        assert more, "the other process went away"
        data += more
    return json.loads(data)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        assert more, "EOF"
        data += more
    return data


def read_frame_head(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """Read one data frame off the raw socket; return the (pid, lease, seq, token) it names."""
    header = read_exactly(sock, HEADER_SIZE)
    _magic, _version, _wire, _flags, _nfds, aux_len, size = struct.unpack("<4sBBHIIQ", header)
    aux = read_exactly(sock, aux_len)
    read_exactly(sock, size)
    pid, lease, seq, token = HEAD.unpack_from(aux)
    return pid, lease, seq, token


def forge(
    sock: socket.socket, pid: int, lease: int, seq: int, token: bytes, sock_fd: int, refs: list[int]
) -> None:
    """Write a hand-made PidfdGetfd frame naming *pid* and its fd numbers *refs*."""
    aux = HEAD.pack(pid, lease, seq, token) + pack_refs(sock_fd, refs)
    sock.sendall(pack_header(PidfdGetfd.wire_id, len(refs), len(aux), 6) + aux + b"forged")


def client_body(steps: Callable[[], None]) -> Callable[[], None]:
    """The client: drops to uid 65534 (and checks it cannot read the secret itself), then *steps*."""

    def body() -> None:
        drop_privileges()
        steps()

    return body


def assert_refused(chan: Channel, secret: Path) -> None:
    """The forged frame is refused: `UnverifiedSender`, no fd, the channel unusable."""
    try:
        msg = chan.recv()
    except UnverifiedSender:
        pass
    else:
        with msg:
            got = [os.pread(fd.fileno(), 100, 0) for fd in msg.fds]
        pytest.fail(f"a forged frame delivered {len(got)} fd(s) of the service: {got!r}")
    with pytest.raises(ProtocolError, match="unusable"):
        chan.recv()


def cannot_open(secret: Path) -> None:
    with pytest.raises(PermissionError):
        secret.open("rb")


@pytest.fixture
def ctl() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


# -- variant 1: the client replays the service's own pid, lease and token ---------------


@pytest.mark.parametrize("kind", KINDS)
def test_replaying_the_receivers_own_lease_pulls_nothing(
    kind: str, secret: Path, ctl: tuple[socket.socket, socket.socket]
) -> None:
    here, there = ctl
    lst = listen(kind)

    def steps() -> None:
        here.close()
        cannot_open(secret)
        with connect(lst.getsockname(), kind) as sock:
            lst.close()
            info = get(there)
            # The service's frames tell the client its pid, lease and token.
            pid, lease, seq, token = read_frame_head(sock)
            forge(sock, pid, lease, seq + 1, token, info["sock_fd"], [info["secret_fd"]])
            put(there, "forged")
            assert get(there) == "done"

    child = fork_child(client_body(steps))
    try:
        there.close()
        with accept(lst) as chan, secret.open("rb") as f:
            r, w = os.pipe()
            chan.send(b"hello", fds=[w])
            os.close(r)
            os.close(w)
            put(here, {"secret_fd": f.fileno(), "sock_fd": chan.fileno()})
            assert get(here) == "forged"
            assert_refused(chan, secret)
        put(here, "done")
    finally:
        lst.close()
        assert wait_child(child) == 0


# -- variant 2: the service's copy of the client's lease, pulled out of the service ------


@pytest.mark.parametrize("kind", KINDS)
def test_the_receivers_copy_of_the_senders_lease_pulls_nothing(
    kind: str, secret: Path, ctl: tuple[socket.socket, socket.socket]
) -> None:
    here, there = ctl
    lst = listen(kind)

    def steps() -> None:
        here.close()
        cannot_open(secret)
        sock = connect(lst.getsockname(), kind)
        lst.close()
        with Channel(sock, transport=PidfdGetfd()) as chan:
            r, w = os.pipe()
            chan.send(b"honest", fds=[w])  # the service keeps a copy of our lease
            os.close(r)
            os.close(w)
            info = get(there)
            session: Any = chan._session
            forge(
                chan._sock,
                info["pid"],
                info["lease_copy"],  # our lease, as the service holds it
                session._seq + 1,
                session._token,  # our token: the copy holds it
                info["sock_fd"],
                [info["secret_fd"]],
            )
            put(there, "forged")
            assert get(there) == "done"

    child = fork_child(client_body(steps))
    try:
        there.close()
        with accept(lst) as chan, secret.open("rb") as f:
            with chan.recv() as msg:
                assert msg.payload == b"honest"
            session: Any = chan._session
            info = {
                "pid": os.getpid(),
                "lease_copy": session._peer.lease,
                "secret_fd": f.fileno(),
                "sock_fd": chan.fileno(),
            }
            put(here, info)
            assert get(here) == "forged"
            assert_refused(chan, secret)
        put(here, "done")
    finally:
        lst.close()
        assert wait_child(child) == 0


# -- variant 3: a third root process holding a copy of the client's lease ----------------


def _other_service(lst: socket.socket, ctl: socket.socket, secret: Path) -> None:
    """S2: a root service that keeps the client's lease (from an honest message) and a root-only file."""
    with accept(lst) as chan, secret.open("rb") as f:
        lst.close()
        with chan.recv() as msg:
            assert msg.payload == b"honest"
        session: Any = chan._session
        put(ctl, {"pid": os.getpid(), "lease_copy": session._peer.lease, "secret_fd": f.fileno()})
        put(ctl, {"sock_fd": chan.fileno()})
        assert get(ctl) == "done"


def _third_party_attacker(kind: str, lsts: list[socket.socket], s1: socket.socket, s2: socket.socket) -> None:
    """The client: an honest message to S2, then a frame to S1 naming S2, its copy of our lease, its file."""
    to_s1 = connect(lsts[0].getsockname(), kind)
    to_s2 = connect(lsts[1].getsockname(), kind)
    for lst in lsts:
        lst.close()
    with to_s1, Channel(to_s2, transport=PidfdGetfd()) as chan:
        r, w = os.pipe()
        chan.send(b"honest", fds=[w])  # S2 keeps a copy of this lease
        os.close(r)
        os.close(w)
        info = get(s2)
        info.update(get(s2))
        session: Any = chan._session
        forge(to_s1, info["pid"], info["lease_copy"], 1, session._token, info["sock_fd"], [info["secret_fd"]])
        put(s1, "forged")
        assert get(s1) == "done"
        put(s2, "done")


@pytest.mark.parametrize("kind", KINDS)
def test_a_third_process_holding_the_senders_lease_is_not_pulled_from(kind: str, secret: Path) -> None:
    lsts = [listen(kind), listen(kind)]
    s1_c, c_s1 = socket.socketpair()  # the service S1 (this process) <-> the client
    s2_c, c_s2 = socket.socketpair()  # the other root service S2 <-> the client
    ctl = [s1_c, c_s1, s2_c, c_s2]

    def keep_only(*keep: socket.socket) -> None:
        for s in ctl:
            if s not in keep:
                s.close()

    def other_service() -> None:
        keep_only(s2_c)
        lsts[0].close()
        _other_service(lsts[1], s2_c, secret)

    def client() -> None:
        keep_only(c_s1, c_s2)
        cannot_open(secret)
        _third_party_attacker(kind, lsts, c_s1, c_s2)

    s2 = fork_child(other_service)
    attacker = -1
    try:
        attacker = fork_child(client_body(client))
        keep_only(s1_c)
        with accept(lsts[0]) as chan:
            assert get(s1_c) == "forged"
            assert_refused(chan, secret)
        put(s1_c, "done")
    finally:
        for s in lsts + ctl:
            s.close()
        if attacker > 0:
            assert wait_child(attacker) == 0
        assert wait_child(s2) == 0


# -- what the proofs still let through: the real peer, and whoever it hands its end to ---


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sender", ["connector", "its child"])
def test_the_peer_and_a_child_holding_its_socket_may_send(kind: str, sender: str) -> None:
    # The connecting process is the one SO_PEERCRED names; a child it forked
    # after connecting is not, and proves itself by the socket it holds.
    lst = listen(kind)

    def send_one(sock: socket.socket) -> None:
        with Channel(sock, transport=PidfdGetfd()) as chan:
            chan.settimeout(TIMEOUT)
            r, w = os.pipe()
            chan.send(b"honest", fds=[w])
            os.close(r)
            os.close(w)
            assert chan.recv().payload == b"got it"

    def steps() -> None:
        sock = connect(lst.getsockname(), kind)
        lst.close()
        if sender == "connector":
            send_one(sock)
            return
        grandchild = fork_child(lambda: send_one(sock))
        sock.close()
        assert wait_child(grandchild) == 0

    child = fork_child(client_body(steps))
    try:
        with accept(lst) as chan:
            with chan.recv() as msg:
                assert msg.payload == b"honest"
                assert os.fstat(msg.fds[0].fileno()).st_mode & 0o170000 == 0o010000  # a pipe
            # Whoever sends proves itself through the socket it holds (the
            # kernel's SO_PEERPIDFD names only who connected).
            chan.send(b"got it")
    finally:
        lst.close()
        assert wait_child(child) == 0


# -- found by the independent review: a handed-on connection, a self-pull ---------------

_HANDED_ON = r"""
import json, os, socket, sys, traceback
from fdchannel import Channel
from fdchannel.transports import PidfdGetfd
from fdchannel.transports._pidfd_linux import pack_refs
from fdchannel.transports._pull import HEAD
from fdchannel._codec import pack_header

secret_path, addr = sys.argv[1], "\0" + sys.argv[2]
lst = socket.socket(socket.AF_UNIX)
lst.bind(addr)
lst.listen(4)


def service():
    conn, _ = lst.accept()
    ch = Channel(conn, transport=PidfdGetfd())
    ch.settimeout(10)
    try:
        with ch.recv() as msg:
            out = b"".join(os.pread(fd.fileno(), 100, 0) for fd in msg.fds)
        ch.send(b"S read: " + out)
    except Exception as e:
        # The channel is unusable after a refused frame: answer on the raw socket.
        os.write(ch.fileno(), f"S refused: {type(e).__name__}".encode())


def client(c_sock, ctl_c, secret_fd):
    os.close(secret_fd)
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    ch = Channel(c_sock, transport=PidfdGetfd())
    ch.settimeout(10)
    r, w = os.pipe()
    ch.send(b"honest", [r])  # T now holds a copy of C's lease
    token = ch._session._token
    info = json.loads(ctl_c.recv(4096).decode())
    _, fds, _, _ = socket.recv_fds(ctl_c, 16, 1)
    conn = socket.socket(fileno=fds[0])
    conn.settimeout(10)
    aux = HEAD.pack(info["t_pid"], info["lease_copy"], 1, token) + pack_refs(0, [info["secret_fd"]])
    conn.sendall(pack_header(PidfdGetfd.wire_id, 1, len(aux), 6) + aux + b"forged")
    data = b""
    while b"S read" not in data and b"S refused" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    print("C got:", data[data.find(b"S "):].decode(errors="replace"))


def fork(fn, *a):
    pid = os.fork()
    if pid == 0:
        try:
            fn(*a)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(0)
    return pid


s_pid = fork(service)
lst.close()
secret_fd = os.open(secret_path, os.O_RDONLY)  # T, a root broker, holds a root-only file
t_sock, c_sock = socket.socketpair()
ctl_t, ctl_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
c_pid = fork(client, c_sock, ctl_c, secret_fd)
c_sock.close()
ctl_c.close()
ch = Channel(t_sock, transport=PidfdGetfd())
ch.settimeout(10)
msg = ch.recv()  # T keeps C's message (and its copy of C's lease)
lease_copy = ch._session._peer.lease
conn = socket.socket(socket.AF_UNIX)
conn.connect(addr)  # T connects to S on C's behalf...
ctl_t.send(json.dumps({"t_pid": os.getpid(), "lease_copy": lease_copy, "secret_fd": secret_fd}).encode())
socket.send_fds(ctl_t, [b"x"], [conn.fileno()])
conn.close()  # ...and no longer holds the connection
os.waitpid(c_pid, 0)
os.waitpid(s_pid, 0)
"""


def test_a_connection_handed_on_by_the_process_that_made_it_is_proven_by_who_holds_it(secret: Path) -> None:
    """SO_PEERPIDFD names who *connected*: a root broker that connected for an
    unprivileged client and handed it the socket no longer holds it, so frames
    naming the broker must not make the service copy the broker's fds."""
    done = subprocess.run(
        [sys.executable, "-c", _HANDED_ON, str(secret), f"fdc-handed-on-{os.getpid()}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "C got: S refused: UnverifiedSender" in done.stdout, done.stdout + done.stderr
    assert SECRET.decode() not in done.stdout


_SELF_PULL = r"""
import fcntl, os, socket, sys
from fdchannel import Channel
from fdchannel.transports import PidfdGetfd
from fdchannel.transports._pidfd_linux import pack_refs
from fdchannel.transports._pull import HEAD
from fdchannel._codec import pack_header

db = sys.argv[1]
a, b = socket.socketpair()
rp, wp = os.pipe()
rq, wq = os.pipe()


def locked_by_other():
    fd = os.open(db, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


pid = os.fork()
if pid == 0:  # the service, holding a POSIX lock (as sqlite does)
    try:
        b.close()
        dbfd = os.open(db, os.O_RDWR)
        fcntl.lockf(dbfd, fcntl.LOCK_EX)
        os.write(wp, f"{os.getpid()} {dbfd}\n".encode())
        ch = Channel(a, transport=PidfdGetfd())
        ch.settimeout(10)
        try:
            ch.recv()
        except Exception as e:
            print("service recv raised", type(e).__name__)
        os.write(wp, b"r")
        os.read(rq, 1)
    finally:
        sys.stdout.flush()
        os._exit(0)
a.close()
s_pid, dbfd = map(int, os.read(rp, 100).split())
print("locked before:", locked_by_other())
# The service's own pid, its locked file's fd as "lease", its fd 0 as "socket".
aux = HEAD.pack(s_pid, dbfd, 1, b"\0" * 16) + pack_refs(0, [dbfd])
b.sendall(pack_header(PidfdGetfd.wire_id, 1, len(aux), 6) + aux + b"forged")
os.read(rp, 1)
print("locked after:", locked_by_other())
os.write(wq, b"x")
os.waitpid(pid, 0)
"""


def test_a_frame_naming_the_receiver_itself_copies_nothing_out_of_it(tmp_path: Path) -> None:
    """Naming the receiver's own pid must not make it pull (and close) a copy of
    its own fds: closing any fd of a file drops the process's POSIX locks on it."""
    db = tmp_path / "db"
    db.write_bytes(b"x" * 10)
    done = subprocess.run(
        [sys.executable, "-c", _SELF_PULL, str(db)], capture_output=True, text=True, timeout=60, check=False
    )
    out = done.stdout + done.stderr
    assert "locked before: True" in out, out
    assert "service recv raised UnverifiedSender" in out, out
    assert "locked after: True" in out, out  # the service's lock survived
