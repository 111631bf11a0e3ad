"""A `Message` let go: its finalizer, weakrefs, subclasses and what the next one looks like.

The compiled path frees a `Message` with its own dealloc and keeps a few
for the next ``recv()`` (``_speedups.c``: spare_messages).  These tests
hold on both paths (.ci/run runs them again with ``FDCHANNEL_PURE=1``):
a message kept alive by its own `ResourceWarning` stays whole, weakrefs
die with it, a subclass's own slots and dict are freed, and a message
handed out again carries nothing of the last one.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
import weakref

import pytest

from fdchannel import Channel, Message, OwnedFd

from ._portable import is_open

TIMEOUT = 10.0


def _pair() -> tuple[Channel, Channel]:
    a, b = Channel.pair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return a, b


def test_many_messages_let_go_one_after_another_each_come_back_fresh() -> None:
    """Each recv() hands out a message with its own payload and fds, tracked by the GC, never finalized."""
    a, b = _pair()
    r, w = os.pipe()
    with a, b:
        seen: list[weakref.ref[Message]] = []
        for i in range(40):
            a.send(b"m%d" % i, [r] * (i % 3))
            msg = b.recv()
            assert msg.payload == b"m%d" % i
            assert gc.is_tracked(msg)
            assert not gc.is_finalized(msg)
            if i % 4 == 0:
                # Read the fds on some: a spare must not keep the last one's OwnedFds.
                assert len(msg.fds) == i % 3
            else:
                assert len(msg._raw) == i % 3
            if i % 5 == 0:
                seen.append(weakref.ref(msg))
            msg.close()
            assert all(isinstance(f, OwnedFd) and f.closed for f in msg.fds)
            del msg
        assert all(ref() is None for ref in seen)
    os.close(r)
    os.close(w)


def test_a_weakref_dies_with_the_message_and_its_callback_runs_once() -> None:
    a, b = _pair()
    with a, b:
        calls: list[object] = []
        a.send(b"weak")
        msg = b.recv()
        ref = weakref.ref(msg, calls.append)
        del msg
        assert ref() is None
        assert calls == [ref]
        # The next message is a new referent: the old weakref stays dead.
        a.send(b"next")
        nxt = b.recv()
        assert ref() is None
        ref2 = weakref.ref(nxt)
        assert ref2() is nxt
        nxt.close()
        del nxt
        assert ref2() is None
        assert calls == [ref]


def test_a_message_kept_alive_by_its_own_resource_warning_stays_whole() -> None:
    """The warning's record holds the message (its ``source``): resurrected, it is still a valid message."""
    a, b = _pair()
    r, w = os.pipe()
    with a, b:
        a.send(b"kept", [w])
        os.close(w)
        msg = b.recv()
        number = msg._raw[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            del msg
            gc.collect()
        assert not is_open(number)  # the finalizer closed it, as for any dropped message
        [record] = [c for c in caught if issubclass(c.category, ResourceWarning)]
        back = record.source
        assert isinstance(back, Message)
        assert back.payload == b"kept"
        assert gc.is_finalized(back)
        assert all(f.closed for f in back.fds)
        back.close()
        # Let go a second time: freed, and the finalizer does not run again.
        ref = weakref.ref(back)
        del back, record, caught
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            gc.collect()
        assert ref() is None
        # The channel and its next message are unaffected.
        a.send(b"after", [r])
        with b.recv() as after:
            assert after.payload == b"after"
            assert not gc.is_finalized(after)
            assert len(after.fds) == 1
    os.close(r)


class _Slotted(Message):
    __slots__ = ("extra",)


class _WithDict(Message):
    pass


@pytest.mark.parametrize("cls", [_Slotted, _WithDict])
def test_a_subclass_frees_its_own_slots_its_dict_and_the_messages(cls: type[Message]) -> None:
    class Marker:
        pass

    marker = Marker()
    marker_ref = weakref.ref(marker)
    payload = bytearray(b"sub")
    r, w = os.pipe()
    fd = OwnedFd(w)
    msg = cls(payload, (fd,))  # type: ignore[arg-type]
    msg.extra = marker  # type: ignore[attr-defined]
    msg_ref = weakref.ref(msg)
    del marker
    refs_before = sys.getrefcount(payload)
    msg.close()
    assert fd.closed
    del msg
    assert msg_ref() is None
    assert marker_ref() is None
    assert sys.getrefcount(payload) == refs_before - 1
    # Every instance let go gives its reference to the type back.
    type_refs = sys.getrefcount(cls)
    for _ in range(100):
        again = cls(b"again")
        again.extra = Marker()  # type: ignore[attr-defined]
        assert again.payload == b"again"
        del again
    assert sys.getrefcount(cls) == type_refs
    os.close(r)


def test_a_constructed_message_let_go_is_not_handed_out_with_its_contents() -> None:
    """Message(...) made in Python and let go: the next received message has none of its state."""
    r, w = os.pipe()
    payload = bytearray(b"made")
    fd = OwnedFd(os.dup(r))
    fd_refs, payload_refs = sys.getrefcount(fd), sys.getrefcount(payload)
    made = Message(payload, (fd,))
    made.close()
    del made
    # What it held is let go with it, not kept by a message kept for reuse.
    assert (sys.getrefcount(fd), sys.getrefcount(payload)) == (fd_refs, payload_refs)
    del fd
    a, b = _pair()
    with a, b:
        a.send(b"received", [w])
        with b.recv() as msg:
            assert msg.payload == b"received"
            assert len(msg._raw) == 1
            [fd] = msg.fds
            assert not fd.closed
    os.close(r)
    os.close(w)
