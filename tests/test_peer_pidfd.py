"""Linux's race-free peer identity (SO_PEERPIDFD) and data-only endpoints
(SO_PASSRIGHTS), issue #15.  Real processes, the real kernel."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from fdchannel import Channel, Listener, ProtocolError
from fdchannel._peer import peer_pidfd, refuse_fds

from ._proc import needs_fork

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_PEERPIDFD and SO_PASSRIGHTS are Linux's")

TIMEOUT = 10.0


def _kernel_has(probe: object) -> str | None:
    a, b = socket.socketpair()
    with a, b:
        try:
            if probe == "pidfd":
                os.close(peer_pidfd(a))
            elif not refuse_fds(a):
                return "the kernel has no SO_PASSRIGHTS (Linux 6.16+)"
        except OSError as exc:
            return f"the kernel has no SO_PEERPIDFD (Linux 6.5+): {exc}"
    return None


NO_PIDFD = _kernel_has("pidfd")
NO_PASSRIGHTS = _kernel_has("passrights")
needs_peerpidfd = pytest.mark.skipif(NO_PIDFD is not None, reason=NO_PIDFD or "")
needs_passrights = pytest.mark.skipif(NO_PASSRIGHTS is not None, reason=NO_PASSRIGHTS or "")


@needs_peerpidfd
def test_credentials_carry_an_owned_pidfd_of_the_peer() -> None:
    a, b = Channel.pair()
    with a, b, a.peer_credentials(pidfd=True) as creds:
        assert creds.pid == os.getpid()
        assert creds.pidfd is not None
        assert os.readlink(f"/proc/self/fd/{creds.pidfd.fileno()}") == "anon_inode:[pidfd]"
        assert not os.get_inheritable(creds.pidfd.fileno())
        signal.pidfd_send_signal(creds.pidfd.fileno(), 0)  # it is this process
        assert creds == a.peer_credentials()  # the pidfd takes no part in ==
    assert creds.pidfd.closed


def _child_with_pid(wanted: int) -> tuple[int, int]:
    """Fork a child that waits until its pipe closes, asking the kernel for pid *wanted*.

    Returns (pid, the pipe's write end: close it to let the child exit).
    Root only: ns_last_pid picks the next pid (another process forking at
    the same moment can take it, so the caller checks).
    """
    hold_r, hold_w = os.pipe()
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(wanted - 1))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(hold_w)
        os.read(hold_r, 1)
        os._exit(0)
    os.close(hold_r)
    return pid, hold_w


@needs_fork
@needs_peerpidfd
@pytest.mark.skipif(
    getattr(os, "geteuid", lambda: -1)() != 0, reason="reusing a pid on purpose needs root (ns_last_pid)"
)
def test_pidfd_of_a_peer_whose_pid_was_reused_never_reaches_the_new_process(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Listener(path) as lst:
        lst.settimeout(TIMEOUT)
        peer = os.fork()
        if peer == 0:  # pragma: no cover - the peer: connects, then exits
            with contextlib.suppress(BaseException):
                Channel.connect(path, timeout=TIMEOUT).close()
            os._exit(0)
        with lst.accept() as ch:
            creds = ch.peer_credentials(pidfd=True)
    with creds:
        assert creds.pid == peer
        assert creds.pidfd is not None
        os.waitpid(peer, 0)  # exited and reaped: its pid is free
        for _ in range(5):
            other, release = _child_with_pid(peer)
            if other == peer:
                break
            os.close(release)
            os.waitpid(other, 0)
        else:
            pytest.skip(f"could not get pid {peer} again (other processes kept forking)")
        try:
            # The old pid now names another process; the pidfd does not.
            with pytest.raises(ProcessLookupError):
                signal.pidfd_send_signal(creds.pidfd.fileno(), signal.SIGTERM)
            os.kill(other, 0)  # the new process is alive and was not signalled
        finally:
            os.close(release)
            _, status = os.waitpid(other, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@needs_passrights
def test_a_data_only_channel_keeps_every_fd_out() -> None:
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with Channel(x) as sender, Channel(y, max_fds=0) as receiver:
        sender.settimeout(TIMEOUT)
        receiver.settimeout(TIMEOUT)
        with pytest.raises(PermissionError, match="accepts only data") as info:
            sender.send(b"here is an fd", [0])
        assert info.value.characters_written == 0  # type: ignore[attr-defined]
        sender.send(b"just data")
        with receiver.recv() as msg:
            assert msg.payload == b"just data"
        # A raw peer fares no better: the kernel refuses before anything is queued.
        with pytest.raises(PermissionError):
            x.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(4))])


def test_fds_that_arrived_anyway_are_closed_and_the_message_refused() -> None:
    # What older kernels do (no SO_PASSRIGHTS), and what fds queued before
    # the channel existed meet everywhere: the decoder closes them.
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with x:
        from fdchannel._codec import pack_header

        r, w = os.pipe()
        try:
            x.sendmsg(
                [pack_header(0, 1, 0, 0)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))],
            )
        finally:
            os.close(r)
            os.close(w)
        with Channel(y, max_fds=0) as receiver:
            receiver.settimeout(TIMEOUT)
            with pytest.raises(ProtocolError, match="max_fds"):
                receiver.recv()
    # the autouse leak check proves the fd was closed


def test_pidfd_where_the_kernel_has_none_says_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from fdchannel import _peer

    monkeypatch.setattr(_peer, "_LINUX_SOCKOPTS", False)
    a, b = Channel.pair()
    with a, b, pytest.raises(OSError, match=r"Linux 6\.5") as info:
        a.peer_credentials(pidfd=True)
    assert info.value.errno == errno.ENOPROTOOPT
