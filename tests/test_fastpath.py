"""The compiled fast path (`fdchannel._speedups`): in use when built, off when forced, same wire.

The shared channel, codec, edge and property suites run on whichever path
this process chose; .ci/run runs them a second time with ``FDCHANNEL_PURE=1``.
With ``FDCHANNEL_REQUIRE_COMPILED=1`` (set by .ci/run on Linux) a missing
build fails here instead of silently testing the pure path twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fdchannel import Channel, _fastpath

from ._transports import needs_unix_rights

TIMEOUT = 10.0


@pytest.mark.skipif(sys.platform != "linux", reason="the compiled path is built for Linux only")
def test_the_compiled_path_is_in_use_when_built() -> None:
    if os.environ.get("FDCHANNEL_REQUIRE_COMPILED") == "1":
        assert _fastpath.compiled_available(), _fastpath.why_pure()
    if not _fastpath.compiled_available():
        pytest.skip(f"not built here: {_fastpath.why_pure()}")
    a, b = Channel.pair()
    with a, b:
        assert type(a._fast).__module__ == "fdchannel._speedups"
        assert type(b._fast).__name__ == "FastPath"
        r, w = os.pipe()
        # The compiled path takes this whole message itself (True: handled).
        assert a._fast.send(a, b"direct", [r]) is True
        msg = b._fast.recv(b)
        assert msg is not None
        with msg:
            assert msg.payload == b"direct"
            assert len(msg.fds) == 1
        os.close(r)
        os.close(w)


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11), reason="the inline-values layout is read on CPython 3.11 only"
)
def test_the_compiled_path_reads_made_dicts_without_a_guard_on_3_11() -> None:
    """dict_of() stops collections only while an instance dict is first made: the layout check held."""
    if not _fastpath.compiled_available():
        pytest.skip(f"not built here: {_fastpath.why_pure()}")
    assert _fastpath._speedups.values_layout() is True


def test_fdchannel_pure_forces_the_python_path() -> None:
    code = (
        "from fdchannel import Channel, _fastpath\n"
        "a, b = Channel.pair()\n"
        "print(_fastpath.enabled(), a._fast, _fastpath.why_pure())\n"
        "a.close(); b.close()\n"
    )
    env = {**os.environ, "FDCHANNEL_PURE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "False None FDCHANNEL_PURE is set"


@needs_unix_rights
@pytest.mark.parametrize(("sender_compiled", "receiver_compiled"), [(True, False), (False, True)])
def test_the_two_paths_speak_the_same_wire(sender_compiled: bool, receiver_compiled: bool) -> None:
    with _fastpath.forced(sender_compiled):
        a, b0 = Channel.pair()
    with _fastpath.forced(receiver_compiled):
        b = Channel(b0._sock.dup())
    b0.close()
    r, w = os.pipe()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)

        def sender() -> None:
            for i in range(50):
                a.send(bytes([i]) * i, [r] * (i % 5))
            a.send(b"big" * 100_000, [w])
            a.send(b"many", [r] * 300)  # more than one write carries: the Python path, either side

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        for i in range(50):
            with b.recv() as msg:
                assert msg.payload == bytes([i]) * i
                assert len(msg.fds) == i % 5
        with b.recv() as msg:
            assert msg.payload == b"big" * 100_000
        with b.recv() as msg:
            assert len(msg.fds) == 300
        t.join(TIMEOUT)
        assert not t.is_alive()
    os.close(r)
    os.close(w)


@needs_unix_rights
def test_what_the_compiled_path_does_not_take_goes_the_python_way() -> None:
    a, b = Channel.pair()
    r, w = os.pipe()
    with a, b, open(os.devnull, "rb") as f:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.send(b"objects", [f, r])  # fileno() objects
        a.send(bytearray(b"gen"), (fd for fd in [w]))  # a generator of fds
        with pytest.raises(TypeError, match="bool"):
            a.send(b"x", [True])
        with pytest.raises(ValueError, match="invalid file descriptor"):
            a.send(b"x", [-1])
        with pytest.raises(ValueError, match="own socket"):
            a.send(b"x", [a.fileno()])
        with pytest.raises(ValueError, match="max_payload"):
            a.max_payload = 3
            a.send(b"four")
        a.max_payload = 1 << 20
        with b.recv() as msg:
            assert msg.payload == b"objects"
            assert len(msg.fds) == 2
        with b.recv() as msg:
            assert msg.payload == b"gen"
            assert len(msg.fds) == 1
    os.close(r)
    os.close(w)


@needs_unix_rights
def test_the_compiled_path_leaves_channels_in_the_python_paths_states_to_it() -> None:
    """A send cut twice (_suspect), a forked child's unclaimed end, share_above;
    a recv cut twice (_delivering, fds left in Decoder.landed): the Python
    path's rules apply, so the compiled one does nothing (False/None)."""
    if not _fastpath.compiled_available():
        pytest.skip(f"not built here: {_fastpath.why_pure()}")
    a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        assert a._fast is not None
        assert b._fast is not None
        for name, value in (("_suspect", True), ("_unclaimed", True), ("_share_above", 1 << 20)):
            saved = getattr(a, name)
            setattr(a, name, value)
            try:
                assert a._fast.send(a, b"x", []) is False, name
            finally:
                setattr(a, name, saved)
        a.send(b"waiting")
        b._delivering = True
        try:
            assert b._fast.recv(b) is None
        finally:
            b._delivering = False
        b._decoder.landed.append([])
        try:
            assert b._fast.recv(b) is None
        finally:
            b._decoder.landed.clear()
        with b.recv() as msg:
            assert msg.payload == b"waiting"


@pytest.mark.skipif(sys.platform != "linux", reason="the compiled path is built for Linux only")
def test_the_channel_locks_are_taken_on_their_own_semaphores_where_cpython_uses_them() -> None:
    """sys.thread_info says how CPython builds its locks; the compiled path
    takes a semaphore lock with sem_trywait, skipping a clock read per call."""
    if not _fastpath.compiled_available():
        pytest.skip(f"not built here: {_fastpath.why_pure()}")
    kind = _fastpath._speedups.lock_kind()
    if sys.version_info[:2] in ((3, 11), (3, 12)):
        assert kind == ("semaphore" if sys.thread_info.lock == "semaphore" else "direct")
    a, b = Channel.pair()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        # Held by another owner: the compiled path leaves the call to the
        # Python path, which waits for the lock (here: gives up at once).
        assert b._recv_lock.acquire(timeout=TIMEOUT)
        try:
            a.send(b"held")
            assert b._fast.recv(b) is None
            assert b._recv_lock.locked()
            assert a._send_lock.acquire(timeout=TIMEOUT)
            try:
                assert a._fast.send(a, b"x", []) is False
            finally:
                a._send_lock.release()
        finally:
            b._recv_lock.release()
        # Free again, and released by every compiled call.
        for _ in range(3):
            with b.recv() as msg:
                assert msg.payload == b"held"
            assert not b._recv_lock.locked()
            assert not a._send_lock.locked()
            a.send(b"held")
        assert b._recv_lock.acquire(blocking=False)
        b._recv_lock.release()


@needs_unix_rights
@pytest.mark.parametrize("start", [None, 2**30 - 100, 2**31 - 100, 2**60 - 100])
def test_the_stream_offset_counts_every_byte_and_offsets_read_earlier_keep_their_value(
    start: int | None,
) -> None:
    """The compiled recv may advance the decoder's offset in place (an int
    nobody else holds): every byte counted, past one and two 30-bit digits,
    and an offset someone read keeps the value it had."""
    a, b = Channel.pair()
    r, w = os.pipe()
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        dec = b._decoder
        if start is not None:
            dec._received = start
        base = dec.received
        held: list[tuple[int, int]] = []
        for i in range(60):
            a.send(b"x" * (i % 7), [r] if i % 2 else [])
            with b.recv():
                pass
            base += 24 + i % 7
            assert dec.received == base
            if i % 10 == 0:
                got = dec.received
                held.append((got, int(str(got))))
        assert all(obj == copy for obj, copy in held)
    os.close(r)
    os.close(w)


@pytest.mark.skipif(sys.platform != "linux", reason="the compiled path is built for Linux only")
def test_recv_forgets_the_delivered_message_only_when_it_is_that_message() -> None:
    """``del fast[msg]`` (Channel.recv's success path) clears this thread's record of *msg*, nothing else."""
    if not _fastpath.compiled_available():
        pytest.skip(f"not built here: {_fastpath.why_pure()}")
    a, b = Channel.pair()
    with a, b:
        fast = b._fast
        a.send(b"one")
        with b.recv() as msg:  # through Channel.recv: the record is gone as it returns
            assert msg.payload == b"one"
            assert fast.delivered is None
        a.send(b"two")
        direct = fast.recv(b)  # straight to C: recorded until someone says it arrived
        assert direct is not None
        assert fast.delivered is direct
        with direct:
            del fast[object()]  # not the delivered one: kept
            assert fast.delivered is direct
            del fast[direct]
            assert fast.delivered is None
            del fast[direct]  # again: nothing to forget, no error
        with pytest.raises(TypeError, match="only `del fast"):
            fast[direct] = None


@pytest.mark.skipif(sys.platform != "linux", reason="the compiled path is built for Linux only")
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="reads CPython 3.11's specialized bytecode")
def test_send_and_recv_read_the_compiled_path_with_a_specialized_load_on_3_11() -> None:
    """Channel.send and recv stay cheap once the compiled path has made the channel's dict.

    The C code keeps the channel's state in its instance dict; once made, 3.11
    specializes no read of an attribute stored there (every such read takes the
    generic lookup, about 250 instructions).  ``_fast`` is a slot for that
    reason: its read must be specialized (LOAD_ATTR_SLOT), not left adaptive.
    """
    import dis

    if not _fastpath.compiled_available():
        pytest.skip(f"not built here: {_fastpath.why_pure()}")
    a, b = Channel.pair()
    with a, b:
        r, w = os.pipe()
        try:
            for _ in range(200):
                a.send(b"x", [r])
                b.recv().close()
        finally:
            os.close(r)
            os.close(w)
        for method in (Channel.send, Channel.recv):
            loads = [
                i.opname
                for i in dis.get_instructions(method, adaptive=True)
                if i.opname.startswith("LOAD_ATTR") and i.argval == "_fast"
            ]
            assert loads == ["LOAD_ATTR_SLOT"], (method.__name__, loads)


def test_messages_given_the_same_fd_number_stay_apart(tmp_path: Path) -> None:
    """Each message owns its numbers alone, even when one number comes back.

    The compiled path hands every 1-fd message of a number below 256 the same
    ``(n,)`` tuple (a tuple made and freed per message costs about 250
    instructions); a message's ``_raw`` is replaced, never changed, so the
    sharing must not let one message's close or ``.fds`` reach another's fd.
    """
    a, b = Channel.pair()
    with a, b, open(tmp_path / "f", "w") as f, open(tmp_path / "g", "w") as g:
        a.send(b"1", [f])
        first = b.recv()
        raw = first._raw
        number = raw[0]
        first.close()
        a.send(b"2", [g])
        second = b.recv()  # the number the first had: the lowest free one
        if _fastpath.compiled_available():
            assert second._raw is raw  # shared (the same tuple), so the test means something
        first.close()  # again: closes nothing (the second's fd is the same number)
        assert [fd.closed for fd in first.fds] == [True]
        with second:
            a.send(b"3", [f])
            with b.recv() as third:  # while the second holds its number: another one
                owned = second.fds[0]
                assert owned.fileno() != third.fds[0].fileno()
                assert os.path.samestat(os.fstat(owned.fileno()), os.stat(tmp_path / "g"))
                assert os.path.samestat(os.fstat(third.fds[0].fileno()), os.stat(tmp_path / "f"))
        assert owned.closed
        if _fastpath.compiled_available():
            assert raw == (number,)  # the shared tuple itself is untouched
        a.send(b"4", [g])
        with b.recv() as fourth:  # the number is free again: the fd is the one just sent
            assert os.path.samestat(os.fstat(fourth.fds[0].fileno()), os.stat(tmp_path / "g"))
