"""OwnedFd: exactly one owner at a time, on every path."""

from __future__ import annotations

import errno
import gc
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

import pytest

from fdchannel import Message, OwnedFd, _fastpath
from fdchannel._fdutil import SocketHandle

from ._portable import is_open, wine_unbound_socket_quirk


def owned_pipe() -> tuple[OwnedFd, OwnedFd]:
    r, w = os.pipe()
    return OwnedFd(r), OwnedFd(w)


def test_close_is_idempotent_and_marks_closed() -> None:
    r, w = owned_pipe()
    fd = r.fileno()
    assert not r.closed
    r.close()
    r.close()
    assert r.closed
    assert not is_open(fd)
    w.close()


@pytest.mark.parametrize("use", ["fileno", "detach", "dup", "open", "socket"])
def test_every_use_after_close_is_a_value_error(use: str) -> None:
    r, w = owned_pipe()
    r.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        getattr(r, use)()


def test_detach_hands_over_the_number() -> None:
    r, w = owned_pipe()
    fd = r.detach()
    assert r.closed
    r.close()  # a no-op: it owns nothing now
    assert is_open(fd)
    os.close(fd)
    w.close()


def test_dup_is_independent_and_not_inheritable() -> None:
    r, w = owned_pipe()
    with w.dup() as w2:
        assert w2.fileno() != w.fileno()
        assert not os.get_inheritable(w2.fileno())
        w.close()
        os.write(w2.fileno(), b"d")
    assert os.read(r.fileno(), 1) == b"d"
    r.close()


def test_context_manager_closes() -> None:
    r, w = owned_pipe()
    with r as entered:
        assert entered is r
        fd = r.fileno()
    assert not is_open(fd)
    w.close()


def test_open_moves_ownership_to_the_file() -> None:
    with tempfile.TemporaryFile() as tmp:
        tmp.write(b"contents")
        tmp.flush()
        owned = OwnedFd(os.dup(tmp.fileno()))
        fd = owned.fileno()
        f = owned.open("rb")
        assert owned.closed
        with pytest.raises(ValueError, match="closed"):
            owned.fileno()
        owned.close()  # does not touch the file's fd
        assert is_open(fd)
        f.seek(0)
        assert f.read() == b"contents"
        f.close()
        assert not is_open(fd)


def test_open_text_mode_with_arguments() -> None:
    r, w = owned_pipe()
    with w.open("w", encoding="utf-8", errors="strict", newline="") as fw:
        fw.write("héllo")
    with r.open("r", encoding="utf-8") as fr:
        assert fr.read() == "héllo"


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (("zz",), {}, ValueError),
        (("r",), {"encoding": "no-such-codec"}, LookupError),
        (("rb",), {"encoding": "utf-8"}, ValueError),
        (("r",), {"buffering": 0}, ValueError),
    ],
)
def test_open_with_bad_arguments_keeps_ownership(
    args: tuple[str], kwargs: dict[str, object], error: type
) -> None:
    r, w = owned_pipe()
    with pytest.raises(error):
        r.open(*args, **kwargs)
    assert not r.closed
    os.write(w.fileno(), b"still open")
    assert os.read(r.fileno(), 100) == b"still open"
    r.close()
    w.close()


def test_open_refuses_closefd_false() -> None:
    r, w = owned_pipe()
    with pytest.raises(ValueError, match="closefd"):
        r.open("rb", closefd=False)
    assert not r.closed
    r.close()
    w.close()


def test_open_takes_open_arguments_by_position() -> None:
    """closefd is open()'s sixth argument after the file: a falsy newline before it was taken for it."""
    r, w = owned_pipe()
    with w.open("w", -1, "utf-8", "strict", "") as fw:  # newline="" by position
        fw.write("a\r\nb")
    with pytest.raises(ValueError, match="closefd"):
        r.open("rb", -1, None, None, None, False)  # closefd=False by position
    with pytest.raises(TypeError, match="at most 8 arguments"):
        r.open("rb", -1, None, None, None, True, None, "extra")  # as open() itself
    assert not r.closed
    with r.open("r", -1, "utf-8", None, "", True) as fr:  # closefd=True by position
        assert fr.read() == "a\r\nb"


def test_open_makes_a_file_named_by_its_fd_and_keeps_its_inheritable_flag() -> None:
    """As open(fd) does: named by the number, the inheritable flag left as it was."""
    for inheritable in (False, True):
        r, w = owned_pipe()
        fd = r.fileno()
        os.set_inheritable(fd, inheritable)
        with r.open("rb") as fr:
            assert fr.name == fd
            assert fr.raw.name == fd
            assert os.get_inheritable(fd) is inheritable
        with w.open("w", buffering=1) as fw:
            assert fw.name == fw.buffer.name
        assert r.closed


_AUDITED_OPEN = """
import os, sys
from fdchannel import OwnedFd
events = []
sys.addaudithook(lambda event, args: events.append(args) if event == "open" else None)
r, w = os.pipe()
OwnedFd(r).open("rb").close()
os.close(w)
print(all(isinstance(args[0], int) for args in events), len(events) > 0)
"""


def test_open_is_audited_as_an_open_of_the_fd() -> None:
    """A review: an opener made open() audit a path; a hook refusing paths would refuse this."""
    out = subprocess.run(
        [sys.executable, "-c", _AUDITED_OPEN], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]


_NO_AF_UNIX = pytest.mark.skipif(
    not hasattr(socket, "AF_UNIX"), reason="socket.AF_UNIX, which Python on Windows lacks"
)
_AF_UNIX = getattr(socket, "AF_UNIX", -1)


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        pytest.param(_AF_UNIX, socket.SOCK_STREAM, id="AF_UNIX-SOCK_STREAM", marks=_NO_AF_UNIX),
        pytest.param(_AF_UNIX, socket.SOCK_DGRAM, id="AF_UNIX-SOCK_DGRAM", marks=_NO_AF_UNIX),
        pytest.param(
            socket.AF_INET, socket.SOCK_STREAM, id="AF_INET-SOCK_STREAM", marks=wine_unbound_socket_quirk
        ),
    ],
)
def test_socket_detects_family_and_type(family: int, kind: int) -> None:
    s = socket.socket(family, kind)
    # A SOCKET is no CRT fd on Windows: OwnedFd takes it marked as one.
    owned = OwnedFd(SocketHandle(s.detach()) if sys.platform == "win32" else s.detach())
    with owned, owned.socket() as converted:
        assert owned.closed
        assert converted.family == family
        assert converted.type == kind


def test_socket_of_a_non_socket_keeps_ownership() -> None:
    r, w = owned_pipe()
    with r, w:
        with pytest.raises(OSError) as info:
            r.socket()
        assert info.value.errno == errno.ENOTSOCK  # (the wording differs by platform)
        assert not r.closed


def test_garbage_collected_while_open_closes_and_warns() -> None:
    r, w = owned_pipe()
    fd = r.fileno()
    with pytest.warns(ResourceWarning, match="unclosed"):
        del r
        gc.collect()
    assert not is_open(fd)
    w.close()


def test_repr() -> None:
    r, w = owned_pipe()
    assert repr(r) == f"<OwnedFd fd={r.fileno()}>"
    r.close()
    w.close()
    assert repr(r) == "<OwnedFd closed>"


def test_message_close_closes_the_rest_when_one_fails() -> None:
    r, w = os.pipe()
    os.close(r)  # closed behind the OwnedFd's back: its close() fails
    gone, kept = OwnedFd(r), OwnedFd(w)
    msg = Message(b"", (gone, kept))
    with pytest.raises(OSError) as info:
        msg.close()
    assert info.value.errno == errno.EBADF
    assert kept.closed
    with pytest.raises(OSError):
        os.fstat(w)  # really closed


def _interrupting_finalizers(frame: Any, event: str, arg: object) -> None:
    """A tracer: a signal handler's error at the first instruction of every ``__del__``."""
    if frame.f_code.co_name == "__del__":
        raise KeyboardInterrupt


@pytest.mark.skipif(not _fastpath.compiled_available(), reason="the C finalizers come with the compiled path")
def test_an_unclosed_owner_closes_its_fd_even_if_a_handler_raises_as_it_is_collected() -> None:
    """With the compiled path, OwnedFd, SealedMemory and Message close what they own in C:
    no Python finalizer frame, so no first instruction for a handler's error to cut."""
    from fdchannel import _memfd
    from fdchannel.shm import SealedMemory

    r, w = os.pipe()
    mem_fd, size = _memfd.copy(b"sealed", "test")
    owners = [OwnedFd(os.dup(r)), SealedMemory._own(mem_fd, size), Message._owning(b"m", (os.dup(w),))]
    numbers = [owners[0].fileno(), mem_fd, owners[2]._raw[0]]
    unraisable: list[object] = []
    saved_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.warns(ResourceWarning, match="unclosed"):
            while owners:
                # (A tracer that raised is dropped: armed again for each.)
                sys.settrace(_interrupting_finalizers)
                try:
                    owners.pop()  # collected here, unclosed
                finally:
                    sys.settrace(None)
            gc.collect()
    finally:
        sys.unraisablehook = saved_hook
        os.close(r)
        os.close(w)
    assert [n for n in numbers if is_open(n)] == []
    assert unraisable == []


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_collected_owner_of_an_impossible_number_closes_no_other_fd() -> None:
    """OwnedFd(2**32 + n) is refused at close (OverflowError), never truncated to n."""
    r, w = os.pipe()
    unraisable: list[Any] = []
    saved_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        owner = OwnedFd(2**32 + r)
        del owner
        gc.collect()
        assert is_open(r)
    finally:
        sys.unraisablehook = saved_hook
        os.close(r)
        os.close(w)
    assert [type(u.exc_value) for u in unraisable] == [OverflowError]


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_collected_owner_whose_fd_was_closed_elsewhere_says_so() -> None:
    """Its close fails with EBADF, a sign of a double close: reported (unraisable), on both paths."""
    r, w = os.pipe()
    os.close(w)
    owner = OwnedFd(r)
    os.close(r)  # behind its back
    unraisable: list[Any] = []
    saved_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        del owner
        gc.collect()
    finally:
        sys.unraisablehook = saved_hook
    assert [getattr(u.exc_value, "errno", None) for u in unraisable] == [errno.EBADF]


def test_a_subclass_with_an_fd_slot_of_its_own_still_closes_and_warns() -> None:
    class Shadow(OwnedFd):
        __slots__ = ("_fd",)  # a slot of its own, on purpose

    r, w = os.pipe()
    os.close(w)
    owner = Shadow(r)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del owner
        gc.collect()
    assert not is_open(r)
