"""WinDuplicate's protocol logic and the Win32 fdpass format, against the simulated adapter.

The real Win32 adapter is not exercised here (docs/portability.md); the
simulation models what the protocol depends on, and one test shows it
catches a protocol that misdelivers.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

import pytest

from fdchannel import Channel, FdsWithdrawn, ProtocolError, _fdpass_win
from fdchannel.transports import WinDuplicate
from fdchannel.transports._pull import HEAD
from fdchannel.transports._windows import KIND_HANDLE, _WinSession

from ._proc import TIMEOUT
from ._win_sim import PROCESS_DUP_HANDLE, SimMachine, SimProcess


class Ends:
    """Two simulated processes with one channel's sessions; frames move by hand."""

    def __init__(self, machine: SimMachine, a: SimProcess, b: SimProcess, session: type = _WinSession):
        self.machine, self.a, self.b = machine, a, b
        self.sa: _WinSession = session(a.api)
        self.sb: _WinSession = session(b.api)
        self.control()  # the hellos

    def control(self) -> None:
        for payload in self.sa.take_control():
            self.sb.control(payload)
        for payload in self.sb.take_control():
            self.sa.control(payload)

    def send(self, fds: list[int]) -> tuple[int, bytes]:
        out = self.sa.outgoing(fds)
        return len(fds), out.aux

    def recv(self, frame: tuple[int, bytes]) -> list[int]:
        return self.sb.incoming(frame[0], frame[1], [])


@pytest.fixture
def ends() -> Ends:
    machine = SimMachine()
    return Ends(machine, machine.spawn(), machine.spawn())


def names(proc: SimProcess, fds: list[int]) -> list[str]:
    return [proc.object_of_fd(fd).name for fd in fds]


def test_files_cross_and_copies_are_released_on_acknowledgement(ends: Ends) -> None:
    a, b = ends.a, ends.b
    fds = [a.open_file("alpha"), a.open_file("beta")]
    before_a, before_b = dict(a.handles), dict(b.handles)
    got = ends.recv(ends.send(fds))
    assert names(b, got) == ["alpha", "beta"]
    assert len(a.handles) == len(before_a) + 3  # two duplicates and the lease
    ends.control()  # the acknowledgement
    assert len(a.handles) == len(before_a) + 1  # only the lease is left
    for fd in got:
        b.api.close_fd(fd)
    ends.sa.close()
    ends.sb.close()
    assert a.handles == before_a
    assert b.handles == before_b


def test_the_caller_may_close_its_fd_right_after_send(ends: Ends) -> None:
    fd = ends.a.open_file("alpha")
    frame = ends.send([fd])
    ends.a.api.close_fd(fd)
    assert names(ends.b, ends.recv(frame)) == ["alpha"]


def test_invalid_fds_and_pseudo_handles_are_never_duplicated(ends: Ends) -> None:
    a = ends.a
    before = dict(a.handles)
    with pytest.raises(OSError, match="no valid handle") as info:
        ends.send([a.bad_crt_fd()])  # its handle is INVALID_HANDLE_VALUE == the process pseudo-handle
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError, match="bad file descriptor"):
        ends.send([a.open_file("ok"), 99])
    assert {h for h in a.handles if h not in before} == {a.crt[3]}  # only the file just opened


def test_the_simulation_shows_why_pseudo_handles_matter(ends: Ends) -> None:
    # Duplicating the value -1 out of a process hands over that process itself.
    api = ends.b.api
    proc = api.open_process(ends.a.pid)
    got = api.duplicate_handle(proc, -1, api.current_process(), False)
    assert ends.b.handles[got][0] is ends.a.obj
    # The receiver refuses such a value before duplicating anything.
    aux = HEAD.pack(ends.a.pid, 0x100, 1, b"\0" * 16) + b"".join(
        [KIND_HANDLE.to_bytes(4, "little"), (0xFFFFFFFF).to_bytes(4, "little")]
    )
    with pytest.raises(ProtocolError, match="invalid handle"):
        ends.sb.incoming(1, aux, [])


def test_sockets_go_through_share_once_the_peer_pid_is_known() -> None:
    machine = SimMachine()
    a, b = machine.spawn(), machine.spawn()
    sa, sb = _WinSession(a.api), _WinSession(b.api)
    sock = a.new_socket("listener")
    with pytest.raises(OSError, match="announced its process id") as info:
        sa.outgoing([sock])
    assert info.value.errno == errno.ENOTCONN
    for payload in sb.take_control():  # b's hello
        sa.control(payload)
    out = sa.outgoing([sock, a.open_file("file")])
    got = sb.incoming(2, out.aux, [])
    assert names(b, got) == ["listener", "file"]
    assert b.api.is_socket(got[0])


def test_sender_closes_with_messages_in_flight_and_values_reused(ends: Ends) -> None:
    a, b = ends.a, ends.b
    frames = [ends.send([a.open_file(f"real {i}")]) for i in range(3)]
    ends.sa.close()  # lease first, then the unacknowledged duplicates
    decoys = [a.open_file(f"decoy {i}") for i in range(10)]  # reuse the released values
    assert decoys
    before_b = dict(b.handles)
    for frame in frames:
        with pytest.raises(FdsWithdrawn, match="closed its channel"):
            ends.recv(frame)
    assert b.handles == before_b


def test_sender_exits_with_messages_in_flight(ends: Ends) -> None:
    frame = ends.send([ends.a.open_file("alpha")])
    ends.a.exit()
    before_b = dict(ends.b.handles)
    with pytest.raises(FdsWithdrawn, match="exited"):
        ends.recv(frame)
    assert ends.b.handles == before_b
    ends.machine.reap(ends.a)
    with pytest.raises(FdsWithdrawn, match="exited"):
        ends.recv(frame)


def test_access_denied_is_a_permission_error_and_is_acknowledged() -> None:
    machine = SimMachine()
    a, b = machine.spawn("alice"), machine.spawn("bob")
    ends = Ends(machine, a, b)
    before_a, before_b = len(a.handles), dict(b.handles)
    frame = ends.send([a.open_file("secret")])
    with pytest.raises(PermissionError, match="not allowed"):
        ends.recv(frame)
    assert b.handles == before_b
    ends.control()
    assert len(a.handles) == before_a + 2  # the file itself and the lease: the duplicate is gone


def test_receiver_closes_first(ends: Ends) -> None:
    before = len(ends.a.handles)
    ends.send([ends.a.open_file("alpha")])
    ends.sb.close()
    ends.sa.peer_closed()  # the channel calls this at EOF
    assert len(ends.a.handles) == before + 2  # the file and the lease


class _NoLeaseCheck(_WinSession):
    """A deliberately broken protocol: trusts that numbers are never reused."""

    def _os_same_lease(self, peer: Any) -> bool:
        return True

    def _attach(self, pid: int, lease_num: int, token: bytes, proof: Any) -> Any:
        proc = self._os_open_peer(pid)
        return type("P", (), {"proc": proc, "pid": pid})()


def test_the_simulation_catches_a_misdelivering_protocol() -> None:
    machine = SimMachine()
    a, b = machine.spawn(), machine.spawn()
    ends = Ends(machine, a, b, session=_NoLeaseCheck)
    frame = ends.send([a.open_file("meant for b")])
    ends.sa.close()
    a.open_file("unrelated")  # takes the value the sender just released
    (got,) = ends.recv(frame)
    assert b.object_of_fd(got).name == "unrelated"  # misdelivered: the simulation shows it


def test_hello_flows_through_a_real_channel() -> None:
    machine = SimMachine()
    proc = machine.spawn()
    a, b = Channel.pair(transport=WinDuplicate(proc.api))
    with a, b:
        b.settimeout(TIMEOUT)
        a.send(b"no fds")
        assert b.recv().payload == b"no fds"
        assert isinstance(b._session, _WinSession)
        assert b._session.peer_pid == proc.pid


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows refusal")
def test_without_windows_construction_fails() -> None:
    with pytest.raises(OSError, match="needs Windows") as info:
        Channel.pair(transport=WinDuplicate())
    assert info.value.errno == errno.ENOSYS


# -- IO::FDPass's Win32 format (fdchannel.fdpass on Windows) ----------------------


def test_fdpass_win_moves_a_handle_in_io_fdpass_format() -> None:
    machine = SimMachine()
    a, b = machine.spawn(), machine.spawn()
    x, y = socket.socketpair()
    with x, y:
        y.settimeout(TIMEOUT)
        fd = a.open_file("passed")
        before_a = dict(a.handles)
        _fdpass_win.send(x, fd, api=a.api)
        raw = y.recv(_fdpass_win.WIRE.size, socket.MSG_PEEK)
        pid, handle = _fdpass_win.WIRE.unpack(raw)
        assert pid == a.pid
        assert handle not in before_a
        got = _fdpass_win.recv(y, api=b.api)
        # No more access than IO::FDPass asks for: PROCESS_DUP_HANDLE alone
        # (a failure asks SYNCHRONIZE too, to tell an exited sender apart).
        assert b.api.opened_with == PROCESS_DUP_HANDLE
        assert b.object_of_fd(got).name == "passed"
        assert a.handles == before_a  # DUPLICATE_CLOSE_SOURCE took the duplicate
        assert a.object_of_fd(fd).name == "passed"  # the caller's fd is untouched


def test_fdpass_win_refuses_pseudo_handles_and_sockets() -> None:
    machine = SimMachine()
    a, b = machine.spawn(), machine.spawn()
    x, y = socket.socketpair()
    with x, y:
        with pytest.raises(OSError, match="no valid handle"):
            _fdpass_win.send(x, a.bad_crt_fd(), api=a.api)
        with pytest.raises(OSError, match="Winsock"):
            _fdpass_win.send(x, a.new_socket("s"), api=a.api)
        x.sendall(_fdpass_win.WIRE.pack(a.pid, 0xFFFFFFFF))  # a Perl peer sending INVALID_HANDLE_VALUE
        before_b = dict(b.handles)
        with pytest.raises(OSError, match="pseudo handle") as info:
            _fdpass_win.recv(y, api=b.api)
        assert info.value.errno == errno.EBADMSG
        assert b.handles == before_b


def test_fdpass_win_sender_exited_or_denied_leaks_nothing_here() -> None:
    machine = SimMachine()
    a, b, c = machine.spawn("alice"), machine.spawn("alice"), machine.spawn("carol")
    x, y = socket.socketpair()
    with x, y:
        _fdpass_win.send(x, a.open_file("one"), api=a.api)
        a.exit()
        before_b = dict(b.handles)
        with pytest.raises(ProcessLookupError, match="exited"):
            _fdpass_win.recv(y, api=b.api)
        assert b.handles == before_b
        d = machine.spawn("alice")
        _fdpass_win.send(x, d.open_file("two"), api=d.api)
        before_c = dict(c.handles)
        with pytest.raises(PermissionError):
            _fdpass_win.recv(y, api=c.api)
        assert c.handles == before_c


def test_fdpass_win_eof_and_non_blocking() -> None:
    machine = SimMachine()
    b = machine.spawn()
    x, y = socket.socketpair()
    with y:
        y.setblocking(False)
        x.sendall(b"\1\2")  # part of a record
        with pytest.raises(BlockingIOError):
            _fdpass_win.recv(y, api=b.api)
        x.close()
        y.settimeout(TIMEOUT)
        with pytest.raises(OSError, match="middle of a record"):
            _fdpass_win.recv(y, api=b.api)
        with pytest.raises(EOFError):
            _fdpass_win.recv(y, api=b.api)
