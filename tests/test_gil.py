"""The GIL around the compiled path's system calls.

With another thread in the process the compiled path releases the GIL
around every ``sendmsg``, ``recvmsg`` and ``close`` (test_message_lazy's
lingering close shows it for close).  A thread alone keeps it, makes the
call with ``MSG_DONTWAIT``, and makes it again with the GIL released only if
it would have to wait: these tests run such a thread in a fresh process
(nothing else started there) and check that a call that must wait still
waits, whole messages still arrive, and a thread Python did not start, which
appears while the call waits, is not shut out.  They run on the pure path
too (``FDCHANNEL_PURE=1`` in .ci/run), where every call releases the GIL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fdchannel import Channel, _fastpath

TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the compiled path is built for Linux only")


def _run(code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> str:
    """Run *code* in a fresh interpreter (its main thread alone); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 10,
        pass_fds=pass_fds,
        check=False,
    )
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


# In each child: the compiled path, when it is in use, keeps the GIL here.
_PREMISE = """
import os, signal, sys, threading
from fdchannel import Channel, _fastpath
signal.alarm(int(sys.argv[1]))  # a wait that never ends is cut short, and fails the test
assert threading.active_count() == 1
compiled = _fastpath.enabled()
if compiled:
    assert _fastpath._speedups.alone()
"""


def test_alone_means_no_other_thread_state_and_no_other_interpreter() -> None:
    if not _fastpath.compiled_available():
        pytest.skip(f"the compiled path is not built here: {_fastpath.why_pure()}")
    out = _run(
        _PREMISE
        + textwrap.dedent("""
        ready, go = threading.Event(), threading.Event()
        def other():
            ready.set()
            go.wait(10)
        t = threading.Thread(target=other)
        t.start()
        ready.wait(10)
        with_thread = _fastpath._speedups.alone()
        go.set()
        t.join(10)
        after = _fastpath._speedups.alone()
        import _xxsubinterpreters as interpreters
        sub = interpreters.create()
        with_interpreter = _fastpath._speedups.alone()
        interpreters.destroy(sub)
        print(with_thread, after, with_interpreter, _fastpath._speedups.alone())
        """),
        str(int(TIMEOUT)),
    )
    assert out.split() == ["False", "True", "False", "True"]


def test_a_thread_alone_still_waits_and_sends_whole_messages_through_partial_writes() -> None:
    """Blocking sends far larger than the socket holds, then a recv that must wait, in a process alone.

    ``MSG_DONTWAIT`` makes each 60 KiB write partial (the socket holds about
    8 KiB); the rest must follow, with the fds on the first byte, and the
    recv of the parent's answer (sent once all is read) must wait for it.
    """
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    count, size = 12, 60 * 1024
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _PREMISE
            + textwrap.dedent(
                """
                import socket
                count, size, fileno = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
                with Channel(socket.socket(fileno=fileno)) as ch:
                    for i in range(count):
                        r, w = os.pipe()
                        os.write(w, bytes([i]))
                        ch.send(bytes([i]) * size, [r])
                        os.close(r)
                        os.close(w)
                        ch.send(b"small %d" % i)
                    with ch.recv() as answer:
                        assert answer.payload == b"all here", answer.payload
                print(compiled)
                """
            ),
            str(int(TIMEOUT)),
            str(count),
            str(size),
            str(theirs.fileno()),
        ],
        pass_fds=(theirs.fileno(),),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    ours.settimeout(TIMEOUT)
    with proc, Channel(ours) as ch:
        try:
            for i in range(count):
                with ch.recv() as msg:
                    assert msg.payload == bytes([i]) * size
                    (fd,) = msg.fds
                    assert os.read(fd.fileno(), 1) == bytes([i])
                with ch.recv() as small:
                    assert small.payload == b"small %d" % i
                    assert small.fds == ()
            ch.send(b"all here")
            out, err = proc.communicate(timeout=TIMEOUT + 10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == str(_fastpath.enabled())


@pytest.fixture(scope="module")
def foreign_thread_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the thread that Python did not start")
    so = tmp_path_factory.mktemp("foreign") / "foreign_thread.so"
    src = Path(__file__).parent / "csrc" / "foreign_thread.c"
    build = subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(so), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    return so


def test_a_thread_python_did_not_start_runs_while_a_lone_threads_recv_waits(foreign_thread_lib: Path) -> None:
    """The lone thread's recv waits with the GIL released, so a new C thread can send what it waits for.

    The C thread appears (takes the GIL through ctypes' PyGILState_Ensure)
    only once the main thread is inside recvmsg: after it found itself
    alone.  Had the wait kept the GIL, neither could go on (the alarm ends
    the child, and the test fails).
    """
    out = _run(
        _PREMISE
        + textwrap.dedent("""
        import ctypes
        lib = ctypes.CDLL(sys.argv[2])
        a, b = Channel.pair()
        r, w = os.pipe()
        seen = []
        def call(found):
            seen.append(found)
            a.send(b"from a thread Python did not start", [r])
        callback = ctypes.CFUNCTYPE(None, ctypes.c_int)(call)
        assert lib.start_when_in_recvmsg(threading.get_native_id(), callback) == 0
        with b.recv() as msg:
            assert msg.payload == b"from a thread Python did not start"
            assert len(msg.fds) == 1
        print(seen, compiled)
        """),
        str(int(TIMEOUT)),
        str(foreign_thread_lib),
    )
    found, compiled = out.rsplit(" ", 1)
    assert found == "[1]", "the C thread never saw the main thread in recvmsg: the premise failed"
    assert compiled.strip() == str(_fastpath.enabled())
