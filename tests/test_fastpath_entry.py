"""`Channel.send` and `Channel.recv` are the compiled module's own functions when it is loaded.

They take the common case in C and call the Python methods for the rest:
keyword arguments, subclasses, channels without a `FastPath` and whatever
the compiled path does not take.
"""

from __future__ import annotations

import inspect
import os
import socket
from typing import Any

import pytest

from fdchannel import Channel, _fastpath

from ._transports import needs_unix_rights

TIMEOUT = 10.0

compiled = pytest.mark.skipif(not _fastpath.compiled_available(), reason="the compiled path is not loaded")


@compiled
def test_send_and_recv_are_the_compiled_entry_points() -> None:
    assert type(Channel.__dict__["send"]).__name__ == "method_descriptor"
    assert type(Channel.__dict__["recv"]).__name__ == "method_descriptor"
    # The Python methods stay, for everything unusual.
    assert inspect.isfunction(Channel._python_send)  # type: ignore[attr-defined]
    assert inspect.isfunction(Channel._python_recv)  # type: ignore[attr-defined]


@compiled
def test_the_compiled_entry_points_keep_their_docs_and_signatures() -> None:
    assert Channel.send.__doc__ is not None
    assert Channel.send.__doc__.startswith("Send one message")
    assert Channel.recv.__doc__ is not None
    assert Channel.recv.__doc__.startswith("Receive one whole message")
    assert str(inspect.signature(Channel.send)) == "(self, /, payload=b'', fds=())"
    assert str(inspect.signature(Channel.recv)) == "(self, /)"


def _pipe() -> tuple[int, int]:
    return os.pipe()


@needs_unix_rights
def test_keyword_and_default_arguments_work() -> None:
    r, w = _pipe()
    a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(payload=b"kw", fds=[r])
        a.send(b"half", fds=(w,))
        a.send()
        Channel.send(a, b"unbound", [r])
        with b.recv() as msg:
            assert msg.payload == b"kw"
            assert len(msg.fds) == 1
        with b.recv() as msg:
            assert msg.payload == b"half"
            assert len(msg.fds) == 1
        with b.recv() as msg:
            assert msg.payload == b""
            assert msg.fds == ()
        with Channel.recv(b) as msg:
            assert msg.payload == b"unbound"
        with pytest.raises(TypeError):
            a.send(b"x", [], "extra")  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            a.send(b"x", nonsense=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            b.recv(1)  # type: ignore[call-arg]
    os.close(r)
    os.close(w)


class _Counting(Channel):
    calls: list[str]

    def send(self, payload: Any = b"", fds: Any = ()) -> None:
        self.calls.append("send")
        super().send(payload, fds)

    def recv(self) -> Any:
        self.calls.append("recv")
        return super().recv()


@needs_unix_rights
def test_a_subclass_override_runs_and_super_reaches_the_channel() -> None:
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with _Counting(sa) as a, _Counting(sb) as b:
        a.calls, b.calls = [], []
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"sub", [0])
        with b.recv() as msg:
            assert msg.payload == b"sub"
            assert len(msg.fds) == 1
        assert a.calls == ["send"]
        assert b.calls == ["recv"]


@needs_unix_rights
def test_a_subclass_without_overrides_takes_the_python_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly as before the entry points: the Python method, which tries the FastPath itself."""

    class Plain(Channel):
        pass

    seen: list[str] = []
    if _fastpath.compiled_available():
        py_send, py_recv = Channel._python_send, Channel._python_recv  # type: ignore[attr-defined]

        def send(self: Channel, *args: Any, **kwargs: Any) -> None:
            seen.append("send")
            py_send(self, *args, **kwargs)

        def recv(self: Channel) -> Any:
            seen.append("recv")
            return py_recv(self)

        monkeypatch.setattr(Plain, "send", send)
        monkeypatch.setattr(Plain, "recv", recv)
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with Plain(sa) as a, Plain(sb) as b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"plain", [0])
        with b.recv() as msg:
            assert msg.payload == b"plain"
    if _fastpath.compiled_available():
        assert seen == ["send", "recv"]


@compiled
@needs_unix_rights
def test_each_hand_over_case_reaches_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: PLR0915 - one table of cases
    """What the compiled entry points do not take goes to the Python methods (recv: Channel._recv)."""
    calls: list[str] = []
    py_send = Channel._python_send  # type: ignore[attr-defined]
    py_recv_loop = Channel._recv

    def send(self: Channel, *args: Any, **kwargs: Any) -> None:
        calls.append("send")
        py_send(self, *args, **kwargs)

    def _recv(self: Channel, into: Any) -> Any:
        calls.append("recv")
        return py_recv_loop(self, into)

    a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        monkeypatch.setattr(Channel, "_python_send", send)
        monkeypatch.setattr(Channel, "_recv", _recv)
        # install() kept its own references: swap them for the spies.
        _fastpath._speedups.install(Channel, send, Channel.__dict__["_python_recv"])
        try:
            a.send(b"fast", [0])
            with b.recv() as msg:
                assert msg.payload == b"fast"
            assert calls == []  # both in C
            for name, value in (("_suspect", True), ("_unclaimed", True), ("_share_above", 1 << 20)):
                c, d = Channel.pair()
                with c, d:
                    setattr(c, name, value)
                    calls.clear()
                    try:
                        c.send(b"x")
                    except Exception:
                        pass  # the Python path's own rules; only who ran matters here
                    assert calls == ["send"], name
            calls.clear()
            a.send(b"gen", (fd for fd in [0]))  # a generator of fds
            a.send(b"kw", fds=[0])
            a.send(b"many", [0] * 300)  # more than one write carries
            assert calls == ["send", "send", "send"]
            for _ in range(3):
                b.recv().close()
            # The peer's messages above are all taken: now the recv cases.
            for name, value in (("_delivering", True), ("_unclaimed", True)):
                c, d = Channel.pair()
                with c, d:
                    c.send(b"waiting")
                    setattr(d, name, value)
                    calls.clear()
                    try:
                        d.recv().close()
                    except Exception:
                        pass
                    assert calls == ["recv"], name
            calls.clear()
            with pytest.raises(BlockingIOError):
                b.settimeout(0.0)
                b.recv()  # nothing there: the Python path waits (here: raises)
            assert calls == ["recv"]
        finally:
            _fastpath._speedups.install(
                Channel, Channel.__dict__["_python_send"], Channel.__dict__["_python_recv"]
            )
            monkeypatch.undo()
            _fastpath._speedups.install(
                Channel, Channel.__dict__["_python_send"], Channel.__dict__["_python_recv"]
            )


@needs_unix_rights
def test_a_channel_forced_pure_takes_the_python_path_through_the_entry_points() -> None:
    with _fastpath.forced(False):
        a, b = Channel.pair()
    with a, b:
        assert a._fast is None
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"pure", [0])
        with b.recv() as msg:
            assert msg.payload == b"pure"
            assert len(msg.fds) == 1


@needs_unix_rights
def test_state_changes_between_calls_are_seen() -> None:
    """The compiled path re-reads a channel's state when its attributes change."""
    a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"one")
        b.recv().close()
        a.max_payload = 3
        with pytest.raises(ValueError, match="max_payload"):
            a.send(b"four")
        a.max_payload = 1 << 20
        a.send(b"four")
        b.recv().close()
        a.close()
        with pytest.raises(ValueError):
            a.send(b"closed")
