"""Lazy fd ownership: a received message holds numbers until `fds` is read.

Run against every transport (`make_pair`): each hands its fds to the
message the same way, so laziness must hold on every path.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable

import pytest

from fdchannel import Channel, Message, OwnedFd, _fastpath
from fdchannel.shm import SealedMemory

from ._portable import is_open, read_fd
from ._transports import PairFactory

TIMEOUT = 10.0


def _owned_fds_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, OwnedFd))


def test_closing_an_untouched_message_makes_no_ownedfd_and_closes_every_fd(make_pair: PairFactory) -> None:
    a, b = make_pair()
    r, w = os.pipe()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"three", [r, w, r])
        before = _owned_fds_alive()
        msg = b.recv()
        assert _owned_fds_alive() == before, "recv() made OwnedFd objects nobody asked for"
        numbers = list(msg._raw)
        assert len(numbers) == 3
        assert all(is_open(n) for n in numbers)
        msg.close()
        assert not any(is_open(n) for n in numbers)
        assert _owned_fds_alive() == before
        # Read after close, the fds are there, closed, as they always were.
        assert len(msg.fds) == 3
        assert all(fd.closed for fd in msg.fds)
        msg.close()  # idempotent
    os.close(r)
    os.close(w)


def test_fds_become_owned_objects_once_and_what_was_taken_stays_open(make_pair: PairFactory) -> None:
    a, b = make_pair()
    r, w = os.pipe()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"x", [r, w])
        with b.recv() as msg:
            fds = msg.fds
            assert msg.fds is fds  # made once, the same objects afterwards
            assert all(isinstance(fd, OwnedFd) for fd in fds)
            kept_w = fds[1].detach()
            other = fds[0].fileno()
        # Leaving `with` closed the read end nobody took, not the detached write end.
        assert not is_open(other)
        assert is_open(kept_w)
        os.write(kept_w, b"k")
        os.close(kept_w)
        assert read_fd(r) == b"k"
    os.close(r)
    os.close(w)


def test_repr_shows_the_fds_without_taking_them(make_pair: PairFactory) -> None:
    a, b = make_pair()
    r, w = os.pipe()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"p", [r])
        with b.recv() as msg:
            before = _owned_fds_alive()
            text = repr(msg)
            assert text.startswith("Message(payload=b'p', fds=(<OwnedFd fd=")
            assert _owned_fds_alive() == before
    os.close(r)
    os.close(w)


def test_a_dropped_message_closes_its_fds_and_warns(make_pair: PairFactory) -> None:
    a, b = make_pair()
    r, w = os.pipe()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"dropped", [w])
        os.close(w)
        msg = b.recv()
        number = msg._raw[0]
        with pytest.warns(ResourceWarning, match=f"unclosed <OwnedFd fd={number}>"):
            del msg
            gc.collect()
        assert not is_open(number)
    os.close(r)


def test_assigning_fds_replaces_them_as_before() -> None:
    r, w = os.pipe()
    msg = Message._owning(b"", [r])
    replacement = (OwnedFd(w),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        old = msg.fds  # the number became an object: the caller holds it now
    msg.fds = replacement
    assert msg.fds is replacement
    msg.close()
    assert old[0].fileno() == r
    assert not is_open(w)
    old[0].close()


def test_a_constructed_message_keeps_the_objects_it_was_given() -> None:
    r, w = os.pipe()
    given = (OwnedFd(r), OwnedFd(w))
    with Message(b"y", given) as msg:
        assert msg.fds is given
        assert msg.payload == b"y"
    assert all(fd.closed for fd in given)


def _in_child(pure: bool, args: list[str], **env: str) -> str:
    """What a child Python run with *args* prints (pure: with FDCHANNEL_PURE=1); it must exit 0."""
    environ = {**os.environ, **env, **({"FDCHANNEL_PURE": "1"} if pure else {})}
    out = subprocess.run(
        [sys.executable, *args], env=environ, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


_CLOSE_THAT_EMPTIES_THE_LIST = """
import fdchannel
closed = []
class Closer:
    def close(self):
        closed.append(self)
        fds.clear()  # the message's own list of fds
fds = [Closer(), Closer(), Closer()]
fdchannel.Message(b"p", fds).close()
print(len(closed))
"""


@pytest.mark.parametrize("pure", [False, True], ids=["compiled-if-built", "pure"])
def test_close_over_a_list_that_a_close_empties_stops_where_the_list_ends(pure: bool) -> None:
    """A review: the compiled Message.close kept the first length of the list and read past its end."""
    out = _in_child(pure, ["-c", _CLOSE_THAT_EMPTIES_THE_LIST], PYTHONMALLOC="debug")
    assert out.strip() == "1"  # as a for loop over the list: it ends when the list does


_FDS_UNDER_A_STORM = """
import gc, os, signal, sys
from fdchannel import Channel, Message
# Raises only while Message.fds moves numbers into objects: a storm of
# SIGALRMs, so that a second error may strike while the first is handled.
MOVING = {Message.fds.fget.__code__, getattr(Message, "_own_raw", Message.fds.fget).__code__}
def handler(signum, frame):
    if frame is not None and frame.f_code in MOVING:
        raise KeyboardInterrupt
signal.signal(signal.SIGALRM, handler)
a, b = Channel.pair()
null = os.open(os.devnull, os.O_RDONLY)
interrupted = twice = 0
for _ in range(int(sys.argv[1])):
    a.send(b"x", [null] * 100)
    m = b.recv()
    signal.setitimer(signal.ITIMER_REAL, 2e-5, 2e-5)
    try:
        m.fds
    except KeyboardInterrupt:
        interrupted += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
    # Opened now, these take the numbers of any fd closed already: a second
    # close of such a number closes one of them.
    canaries = [os.pipe() for _ in range(60)]
    try:
        m.close()
    except OSError:
        twice += 1  # EBADF: closed before
    del m
    gc.collect()
    for pair in canaries:
        for fd in pair:
            try:
                os.fstat(fd)
            except OSError:
                twice += 1
            else:
                os.close(fd)
a.close(); b.close(); os.close(null)
print(interrupted > 0, twice)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="a setitimer storm against the Linux channel")
@pytest.mark.parametrize("pure", [False, True], ids=["compiled-if-built", "pure"])
def test_fds_cut_short_by_a_storm_of_handlers_closes_each_number_once(pure: bool) -> None:
    """A review: a second handler's error while the first was handled left objects owning
    numbers the message still listed, and both closed them."""
    out = _in_child(pure, ["-W", "ignore::ResourceWarning", "-c", _FDS_UNDER_A_STORM, "400"])
    assert out.split() == ["True", "0"]  # interrupted, and no number closed twice


LINGER = 1  # seconds a close of the lingering socket below blocks
LINUX_LINGER = "SO_LINGER's blocking close as Linux does it (in seconds)"


def _lingering_client() -> tuple[socket.socket, socket.socket]:
    """A TCP connection whose client end has unsent data and SO_LINGER on: its last close blocks LINGER s.

    The server end never reads, so the data can never leave and the close
    waits out the whole linger time (then resets the connection).
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        server, _ = listener.accept()
    client.setblocking(False)
    chunk = b"x" * 65536
    try:
        while True:
            client.send(chunk)
    except BlockingIOError:
        pass  # both buffers full: what is left in the client's stays unsent
    client.setblocking(True)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER))
    return client, server


def _open_copies(files: set[tuple[int, int]]) -> list[int]:
    """This process's fds open on any of *files* (``(st_dev, st_ino)``)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue  # (the listing's own fd)
        if (st.st_dev, st.st_ino) in files:
            found.append(int(name))
    return found


# Each closes the fd of the one message in *box*, which holds its only reference.


def _close_message(box: list[Message]) -> None:
    box[0].close()


def _drop_message(box: list[Message]) -> None:
    with pytest.warns(ResourceWarning, match="unclosed <OwnedFd"):
        box.clear()  # the last reference: the finalizer closes the fd


def _close_ownedfd(box: list[Message]) -> None:
    OwnedFd(box.pop().fds[0].detach()).close()


def _drop_ownedfd(box: list[Message]) -> None:
    owned = [OwnedFd(box.pop().fds[0].detach())]
    with pytest.warns(ResourceWarning, match="unclosed <OwnedFd"):
        owned.clear()


# SealedMemory owns a memfd, whose close never blocks; owning the lingering
# socket instead, it shows that its closes (the C finalizer's too) let go of
# the GIL as OwnedFd's do.


def _close_sealed(box: list[Message]) -> None:
    SealedMemory._own(box.pop().fds[0].detach(), 0).close()


def _drop_sealed(box: list[Message]) -> None:
    sealed = [SealedMemory._own(box.pop().fds[0].detach(), 0)]
    with pytest.warns(ResourceWarning, match="unclosed <SealedMemory"):
        sealed.clear()


@pytest.mark.skipif(
    sys.platform != "linux", reason="SO_LINGER's blocking close as Linux does it (in seconds)"
)
@pytest.mark.parametrize(
    "closer",
    [_close_message, _drop_message, _close_ownedfd, _drop_ownedfd, _close_sealed, _drop_sealed],
    ids=[
        "Message.close",
        "Message-finalizer",
        "OwnedFd.close",
        "OwnedFd-finalizer",
        "SealedMemory.close",
        "SealedMemory-finalizer",
    ],
)
def test_a_close_that_blocks_lets_other_threads_run(closer: Callable[[list[Message]], None]) -> None:
    """Every close of a received fd releases the GIL around close(), as os.close does.

    A close can block (here a socket lingering on data it cannot send, for
    LINGER s): another thread that waits for it to begin runs during it, not
    after.  (Linux takes the number out of the fd table as the close begins,
    before the lingering wait.)
    """
    client, server = _lingering_client()
    a, b = Channel.pair()
    with a, b, server:
        a.send(b"", [client])
        client.close()  # the message's fd is now the connection's last
        box = [b.recv()]
        number = box[0]._raw[0]
        ran = []

        def other() -> None:
            deadline = time.monotonic() + TIMEOUT
            while is_open(number) and time.monotonic() < deadline:
                pass  # (each fstat releases the GIL)
            ran.append(time.monotonic())

        thread = threading.Thread(target=other)
        thread.start()
        start = time.monotonic()
        closer(box)
        end = time.monotonic()
        box.clear()
        thread.join(TIMEOUT)
        assert end - start >= LINGER / 2, "the close did not block: the premise of this test failed"
        assert ran, "the other thread never ran"
        # Held across the close, the GIL would let the other thread see the
        # close begin only once it had returned.
        assert end - ran[0] >= LINGER / 2, (
            f"the other thread ran {end - ran[0]:.3f} s before the close returned"
        )


@pytest.mark.skipif(
    sys.platform != "linux", reason="SO_LINGER's blocking close as Linux does it (in seconds)"
)
@pytest.mark.parametrize("npipes", [20, 150], ids=["41-fds", "301-fds"])
@pytest.mark.parametrize(
    "closer",
    [
        _close_message,
        _drop_message,
    ],
    ids=["Message.close", "Message-finalizer"],
)
def test_a_fork_while_a_close_blocks_leaves_the_child_none_of_the_fds_still_to_close(
    closer: Callable[[list[Message]], None], npipes: int
) -> None:
    """A close of a message's fds in one thread, a fork in another as the first close blocks.

    The child gets a copy of every fd not yet closed; each must still be owned
    there (the child's copy of the message) or closed as the child starts: a
    review found 40 of 41 left open, with no owner, in the child.
    """
    client, server = _lingering_client()
    pipes = [os.pipe() for _ in range(npipes)]
    a, b = Channel.pair()
    with a, b, server:
        a.send(b"", [client] + [fd for pair in pipes for fd in pair])
        client.close()
        for pair in pipes:
            os.close(pair[0])
            os.close(pair[1])
        box = [b.recv()]
        numbers = list(box[0]._raw)
        # By file, not by number: an at-fork hook in the child may open
        # something under a number the child has just closed.
        files = {(st.st_dev, st.st_ino) for st in map(os.fstat, numbers[1:])}
        thread = threading.Thread(target=closer, args=(box,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # (the finalizer's, in the other thread)
            thread.start()
            # The first close has begun once its number has left the fd table
            # (Linux takes it out before the lingering wait).
            deadline = time.monotonic() + TIMEOUT
            while is_open(numbers[0]):
                assert time.monotonic() < deadline, "the close never began"
            pid = os.fork()
            if pid == 0:  # the child: close what its copy of the message owns, count what is left
                code = 100
                try:
                    for msg in box:
                        msg.close()
                    code = min(len(_open_copies(files)), 254)
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            thread.join(TIMEOUT)
        assert os.waitstatus_to_exitcode(status) == 0, "fds left open, with no owner, in the child"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")
@pytest.mark.parametrize("finalizer", [False, True], ids=["Message.close", "Message-finalizer"])
@pytest.mark.parametrize("fences", [True, False], ids=["membarrier", "lock-per-fd"])
def test_a_fork_at_any_moment_of_a_close_leaves_the_child_at_most_the_fd_being_closed(
    finalizer: bool, fences: bool
) -> None:
    """A fork while another thread closes the 250 fds of a message, at a moment that varies.

    At most the one fd whose close was under way may stay open in the child
    (its number may already be free in the parent, so nothing may close it
    there).  A review found a child left up to all 250 of 250 on the compiled
    path: Linux copies the fd table before the memory, and the closes went on
    in between.  The compiled close takes each index under a lock a fork
    holds, or, where membarrier is registered, only reads a count the fork
    raises before it makes every thread run a barrier (*fences*): both ways.
    """
    speedups = getattr(_fastpath, "_speedups", None) if _fastpath.compiled_available() else None
    if speedups is None:
        if not fences:
            pytest.skip("the compiled close's other way: not built here")
    elif not speedups.use_fences(fences) and fences:
        pytest.skip("membarrier's private expedited command is not registered here")
    try:
        _fork_during_closes(finalizer)
    finally:
        if speedups is not None:
            speedups.use_fences(True)


def _fork_during_closes(finalizer: bool) -> None:
    rng = random.Random(1234)
    # Memory to copy makes the fork's copy of it take longer after its copy
    # of the fd table: the moment the review's reproduction widened.
    ballast = bytearray(256 << 20)
    ballast[::4096] = b"x" * len(range(0, len(ballast), 4096))
    worst = 0
    for _ in range(200):
        r, w = os.pipe()
        files = {(os.fstat(r).st_dev, os.fstat(r).st_ino)}
        box = [Message._owning(b"", tuple(os.dup(r) for _ in range(250)))]
        os.close(r)
        os.close(w)
        started = threading.Event()

        def closer(box: list[Message] = box, started: threading.Event = started) -> None:
            started.set()
            if finalizer:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ResourceWarning)
                    box.clear()
            else:
                box[0].close()

        thread = threading.Thread(target=closer)
        thread.start()
        assert started.wait(TIMEOUT)
        end = time.perf_counter() + rng.random() * 0.0005  # somewhere in the close (a spin, not a sleep)
        while time.perf_counter() < end:
            pass
        pid = os.fork()
        if pid == 0:
            code = 255
            try:
                for msg in box:
                    msg.close()  # what the child's copy of the message owns
                code = min(len(_open_copies(files)), 254)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        thread.join(TIMEOUT)
        box.clear()
        worst = max(worst, os.waitstatus_to_exitcode(status))
    del ballast
    assert worst <= 1, f"a child held {worst} of the fds still to close, with no owner"
