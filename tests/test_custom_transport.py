"""A third-party transport, written against the public interface only.

``ProcFdOpen`` passes fds by reference like the duplication transports, but
the receiver reopens ``/proc/<pid>/fd/<n>`` (a new open file description:
the offset is not shared, sockets do not work: a toy, but a real one).  It
uses every hook: transport data, control frames (acknowledgements),
`discard`, `peer_closed` and `close`.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Sequence

import pytest

from fdchannel import Channel, ProtocolError
from fdchannel.transports import Outgoing, Session, Transport, default_transport

from ._proc import TIMEOUT, fork_child, wait_child

_REF = struct.Struct("<II")  # fd number, access mode


class _ProcFdSession(Session):
    def __init__(self) -> None:
        self.kept: dict[int, list[int]] = {}  # seq -> duplicates held until acknowledged
        self.seq = 0
        self.acks: list[bytes] = []

    def outgoing(self, fds: Sequence[int]) -> Outgoing:
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except BaseException:
            for d in dups:
                os.close(d)
            raise
        self.seq += 1
        self.kept[self.seq] = dups
        refs = b"".join(_REF.pack(d, 0) for d in dups)
        modes = b"".join(struct.pack("<I", _mode(d)) for d in dups)
        return Outgoing(aux=struct.pack("<IQ", os.getpid(), self.seq) + refs + modes, token=self.seq)

    def discard(self, out: Outgoing) -> None:
        assert isinstance(out.token, int)
        for d in self.kept.pop(out.token, []):
            os.close(d)

    def incoming(self, nfds: int, aux: bytes, in_band: list[int]) -> list[int]:
        if len(aux) != 12 + nfds * (_REF.size + 4):
            raise ProtocolError("ProcFdOpen: bad transport data")
        pid, seq = struct.unpack_from("<IQ", aux)
        self.acks.append(struct.pack("<Q", seq))
        opened: list[int] = []
        try:
            for i in range(nfds):
                fd, _ = _REF.unpack_from(aux, 12 + i * _REF.size)
                (mode,) = struct.unpack_from("<I", aux, 12 + nfds * _REF.size + 4 * i)
                opened.append(os.open(f"/proc/{pid}/fd/{fd}", mode | os.O_CLOEXEC))
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return opened

    def control(self, payload: bytes) -> None:
        (seq,) = struct.unpack("<Q", payload)
        for d in self.kept.pop(seq, []):
            os.close(d)

    def take_control(self) -> list[bytes]:
        out, self.acks = self.acks, []
        return out

    def peer_closed(self) -> None:
        self.close()

    def close(self) -> None:
        for dups in self.kept.values():
            for d in dups:
                os.close(d)
        self.kept.clear()


def _mode(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


class ProcFdOpen(Transport):
    wire_id = 200  # 0-15 are fdchannel's own
    name = "ProcFdOpen"

    def max_aux(self, max_fds: int) -> int:
        return 12 + max_fds * (_REF.size + 4)

    def session(self, sock: socket.socket) -> Session:
        return _ProcFdSession()


@pytest.mark.skipif(
    sys.platform == "win32", reason="needs os.fork(), fcntl and /proc/<pid>/fd, which Windows lacks"
)
def test_a_custom_transport_carries_fds_between_processes() -> None:
    a, b = Channel.pair(transport=ProcFdOpen())
    r, w = os.pipe()

    def child() -> None:
        a.close()
        b.settimeout(TIMEOUT)
        with b.recv() as msg:
            assert msg.payload == b"custom"
            os.write(msg.fds[0].fileno(), b"through /proc")
        b.send(b"done")
        b.close()

    try:
        a.settimeout(TIMEOUT)
        pid = fork_child(child)
        b.close()
        a.send(b"custom", fds=[w])
        assert a.recv().payload == b"done"
        assert wait_child(pid) == 0
        assert os.read(r, 100) == b"through /proc"
    finally:
        a.close()
        os.close(r)
        os.close(w)


def test_a_custom_transport_mismatch_is_a_protocol_error_without_garbage_fds() -> None:
    x, y = socket.socketpair()
    theirs = default_transport()  # UnixRights (in band) on POSIX, WinDuplicate on Windows
    a, b = Channel(x, transport=theirs), Channel(y, transport=ProcFdOpen())
    r, w = os.pipe()
    try:
        b.settimeout(TIMEOUT)
        a.send(b"in band", fds=[w])
        with pytest.raises(ProtocolError, match=f"transport id {theirs.wire_id}"):
            b.recv()
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)
