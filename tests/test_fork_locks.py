"""fork() while another thread is inside send(): the child can close both ends.

The child inherits the channel with its send lock held by a thread that
does not exist there; nothing the child does with the channel may wait on
that lock.  Real threads, a real fork, a real socket kept full.
"""

from __future__ import annotations

import platform
import sys
import threading
import time
import warnings

import pytest

from fdchannel import Channel, ProtocolError
from fdchannel.transports import PidfdGetfd, Transport, UnixRights

from ._proc import fork_child, needs_fork, wait_child

pytestmark = needs_fork

_SENDMSG = {"x86_64": 46, "aarch64": 211}.get(platform.machine()) if sys.platform != "win32" else None


def _blocked_in_send(thread: threading.Thread, timeout: float = 10.0) -> None:
    """Return once *thread* is blocked in sendmsg (no event says so: /proc is polled)."""
    deadline = time.monotonic() + timeout
    tid = thread.native_id
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            if f.read().split()[0] == str(_SENDMSG):
                return
        time.sleep(0.001)
    raise TimeoutError("the sender never blocked in sendmsg")


def _fork_during_a_blocked_send(child_body: str, transport: Transport | None) -> None:  # noqa: PLR0915 - one scenario
    a, b = Channel.pair(transport=transport, max_payload=32 * 1024 * 1024)
    done = threading.Event()
    failed: list[BaseException] = []

    def sender() -> None:
        try:
            a.send(b"x" * (16 * 1024 * 1024), [0])  # the peer does not read: it blocks, holding the lock
        except (OSError, ValueError):
            pass  # the main thread closed the channel to end the test
        except BaseException as exc:
            failed.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        _blocked_in_send(thread)
        assert a._send_lock.locked()

        def child() -> None:
            # The child must not hang: the parent's wait_child() kills it and fails.
            if child_body == "close both":
                a.close()
                b.close()
            elif child_body == "close_other":
                b.close_other()  # closes a, whose send lock the dead thread holds
                b.close()
            elif child_body == "send on the blocked end":
                # The parent's frame is half written: the copy refuses to add to it.
                with pytest.raises(ProtocolError, match="forked while another thread was inside send"):
                    a.send(b"from the child")
                a.close()
                b.close()
            elif child_body == "send on the other end":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ResourceWarning)
                    b.send(b"from the child")
                    a.close()
                    b.close()
            assert a.closed
            assert b.closed

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
            pid = fork_child(child)
        assert wait_child(pid, timeout=20) == 0
    finally:
        # Drain so the sender's write completes, then close.
        b.settimeout(10)
        with b.recv() as msg:
            assert len(msg.payload) == 16 * 1024 * 1024
        done.wait(20)
        thread.join(20)
        a.close()
        b.close()
    assert not failed, failed


@pytest.mark.skipif(_SENDMSG is None or not sys.platform.startswith("linux"), reason="Linux /proc syscall")
@pytest.mark.parametrize(
    "child_body", ["close both", "close_other", "send on the blocked end", "send on the other end"]
)
@pytest.mark.parametrize("transport_name", ["UnixRights", "PidfdGetfd"])
def test_a_child_forked_during_a_blocked_send_closes_the_channel(
    child_body: str, transport_name: str
) -> None:
    if transport_name == "PidfdGetfd":
        reason = PidfdGetfd.unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
        if child_body == "send on the other end":
            # Its send() reads the shared socket for acknowledgements: in a
            # forked copy that steals the parent's stream (fork's own rule).
            pytest.skip("a PidfdGetfd send() reads the socket it shares with the parent")
        transport: Transport | None = PidfdGetfd()
    else:
        transport = UnixRights()
    _fork_during_a_blocked_send(child_body, transport)


@pytest.mark.parametrize(
    "transport",
    [
        pytest.param(UnixRights(acknowledge=True), id="UnixRights-acked"),
        pytest.param(
            PidfdGetfd(), id="PidfdGetfd", marks=pytest.mark.skipif(sys.platform != "linux", reason="Linux")
        ),
    ],
)
def test_a_child_forked_while_a_thread_holds_the_session_lock_closes_the_channel(
    transport: Transport,
) -> None:
    """A session lock a parent thread held at the fork does not hold the child's close()."""
    a, b = Channel.pair(transport=transport)
    holding, release = threading.Event(), threading.Event()
    lock = a._session._lock  # type: ignore[attr-defined]

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with a thread running: on purpose
            pid = fork_child(lambda: (a.close(), b.close()))
        assert wait_child(pid, 10) == 0  # before: the child's close() waited for ever
    finally:
        release.set()
        t.join(10)
        a.close()
        b.close()
