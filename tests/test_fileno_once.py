"""Each object's ``fileno()`` runs once per send, whichever path takes the message.

The compiled path reads the fd numbers first, as the Python path does.  When
it then hands the message over (a state or a limit it leaves to Python, a
payload type it does not take, an error the Python path words), it hands
over the numbers it read as well, so that no ``fileno()`` runs twice (a
``fileno()`` may have side effects, or give another number the second time).
Every case runs on both paths, which must call ``fileno()`` as often and end
the same way.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from fdchannel import Channel, _fastpath

TIMEOUT = 10.0

PATHS = [
    pytest.param(
        True,
        id="compiled",
        marks=pytest.mark.skipif(
            not _fastpath.compiled_available(), reason=f"not built here: {_fastpath.why_pure()}"
        ),
    ),
    pytest.param(False, id="pure"),
]


class Counted:
    """An object with ``fileno()``, counting its calls (and maybe misbehaving)."""

    def __init__(self, fd: int, *, gives: Any = None, raises: BaseException | None = None) -> None:
        self.fd = fd
        self.gives = gives
        self.raises = raises
        self.calls = 0
        self.then: Callable[[], None] | None = None

    def fileno(self) -> Any:
        self.calls += 1
        if self.then is not None:
            self.then()
        if self.raises is not None:
            raise self.raises
        return self.fd if self.gives is None else self.gives


@contextmanager
def _channels(compiled: bool) -> Iterator[tuple[Channel, Channel, int]]:
    r, w = os.pipe()
    try:
        with _fastpath.forced(compiled):
            a, b = Channel.pair()
        with a, b:
            a.settimeout(TIMEOUT)
            b.settimeout(0.0)
            yield a, b, r
    finally:
        os.close(r)
        os.close(w)


def _outcome(call: Callable[[], None], b: Channel) -> tuple[str, list[tuple[bytes, int]]]:
    """What a send did: the error it raised (type and text), and what arrived."""
    try:
        call()
        error = ""
    except (TypeError, ValueError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    got = []
    while True:
        try:
            msg = b.recv()
        except BlockingIOError:
            return error, got
        with msg:
            got.append((bytes(msg.payload), len(msg.fds)))


# -- send --------------------------------------------------------------------------


SEND_CASES = {
    # The compiled path reads the numbers, then leaves these to Python.
    "payload over max_payload": lambda a, obj: a.send(b"x" * 100, [obj]),
    "a negative int after it": lambda a, obj: a.send(b"x", [obj, -1]),
    "a bool after it": lambda a, obj: a.send(b"x", [obj, True]),
    "the channel's own socket after it": lambda a, obj: a.send(b"x", [obj, a.fileno()]),
    "a payload it does not take": lambda a, obj: a.send(memoryview(b"x")[::1], [obj]),
    "an object without fileno after it": lambda a, obj: a.send(b"x", [obj, object()]),
    "a state it leaves to Python": lambda a, obj: a.send(b"x", (obj, obj)),
    "sent in C": lambda a, obj: a.send(b"x", [obj]),
}


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("case", list(SEND_CASES))
def test_send_calls_each_fileno_once(compiled: bool, case: str) -> None:
    with _channels(compiled) as (a, b, r):
        a.max_payload = 10
        if case == "a state it leaves to Python":
            a._share_above = 1 << 20  # type: ignore[assignment] # the compiled path declines it
        obj = Counted(r)
        error, got = _outcome(lambda: SEND_CASES[case](a, obj), b)
        expected_calls = 2 if case == "a state it leaves to Python" else 1  # (obj, obj): twice in the tuple
        assert obj.calls == expected_calls
        sent = case in ("a payload it does not take", "a state it leaves to Python", "sent in C")
        assert (error == "") == sent, error
        if sent:
            assert got == [(b"x", expected_calls)]
        else:
            assert got == []


@pytest.mark.parametrize(
    "misbehaviour",
    ["raises OSError", "raises KeyError", "gives a str", "gives -1", "gives 2**40", "gives True"],
)
def test_a_misbehaving_fileno_runs_once_and_ends_alike_on_both_paths(misbehaviour: str) -> None:
    outcomes = []
    for compiled in [True, False] if _fastpath.compiled_available() else [False]:
        with _channels(compiled) as (a, b, r):
            kind, what = misbehaviour.split(" ", 1)
            errors = {"OSError": OSError(9, "gone"), "KeyError": KeyError("no")}
            raises = errors.get(what) if kind == "raises" else None
            gives = {"a str": "3", "-1": -1, "2**40": 2**40, "True": True}.get(what)
            obj = Counted(r, gives=gives, raises=raises)
            ok = Counted(r)
            try:
                a.send(b"x", [ok, obj])
                error = ""
            except (TypeError, ValueError, OSError, KeyError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            assert (obj.calls, ok.calls) == (1, 1)
            got = _outcome(lambda: None, b)[1]
            outcomes.append((error, got))
    assert all(o == outcomes[0] for o in outcomes), outcomes
    if misbehaviour == "gives True":
        assert outcomes[0][0] == ""  # fileno_of takes an int subclass (True is fd 1)
    else:
        assert outcomes[0][0]
        assert outcomes[0][1] == []


@pytest.mark.parametrize("compiled", PATHS)
def test_a_fileno_that_empties_the_list_is_read_once_from_a_snapshot(compiled: bool) -> None:
    """As ``list(fds)`` on the Python path: the items as they were when the call began."""
    with _channels(compiled) as (a, b, r):
        first, second = Counted(r), Counted(r)
        fds: list[Any] = [first, second]
        first.then = fds.clear
        error, got = _outcome(lambda: a.send(b"x", fds), b)
        assert (error, got) == ("", [(b"x", 2)])
        assert (first.calls, second.calls) == (1, 1)


# -- send_many ---------------------------------------------------------------------


def _read(b: Channel, n: int, into: list[tuple[bytes, int]]) -> None:
    b.settimeout(TIMEOUT)
    for _ in range(n):
        with b.recv() as msg:
            into.append((bytes(msg.payload), len(msg.fds)))


MANY_CASES = {
    "a later payload it does not take": lambda obj, r: [(b"x", [obj]), (bytearray(b"y"), [r])],
    "a later negative fd": lambda obj, r: [(b"x", [obj]), (b"y", [obj, -1])],
    "a later object without fileno": lambda obj, r: [(b"x", [obj]), (b"y", [object()])],
    "more bytes than one group": lambda obj, r: [(b"x", [obj]), (b"y" * 300_000, [])],
    "more fds than one group": lambda obj, r: [(b"x", [obj]), (b"y", [r] * 253)],
    "a later item that is a list": lambda obj, r: [(b"x", [obj]), [b"y", [r]]],
    "sent in C": lambda obj, r: [(b"x", [obj]), (b"y", [obj, r])],
    # The review: fds that are no list or tuple, after a fileno() ran (the
    # compiled path read them as a list: a crash, or a MemoryError).
    "a later generator of fds": lambda obj, r: [(b"x", [obj]), (b"y", (f for f in [r]))],
    "a later set of fds": lambda obj, r: [(b"x", [obj]), (b"y", {r})],
    "a later deque of fds": lambda obj, r: [(b"x", [obj]), (b"y", collections.deque([r, r]))],
    "a later range of fds": lambda obj, r: [(b"x", [obj]), (b"y", range(r, r + 1))],
    "a later dict view of fds": lambda obj, r: [(b"x", [obj]), (b"y", {r: 0}.keys())],
    "a later list subclass of fds": lambda obj, r: [(b"x", [obj]), (b"y", _Fds([r, r, r]))],
}


class _Fds(list[int]):
    pass


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("case", list(MANY_CASES))
def test_send_many_calls_each_fileno_once(compiled: bool, case: str) -> None:
    with _channels(compiled) as (a, b, r):
        a.max_payload = 1 << 20
        obj = Counted(r)
        messages = MANY_CASES[case](obj, r)
        expected = [(p, 1 if "generator" in case else len(list(fds))) for p, fds in messages]
        if case == "more bytes than one group":
            # More than the socket holds: read as it is written.
            got = []
            reader = threading.Thread(target=_read, args=(b, len(messages), got))
            reader.start()
            try:
                a.send_many(messages)
                error = ""
            finally:
                reader.join(TIMEOUT)
            assert not reader.is_alive()
        else:
            error, got = _outcome(lambda: a.send_many(messages), b)
        occurrences = sum(fds.count(obj) for _, fds in messages if isinstance(fds, list))
        assert obj.calls == occurrences
        if case in ("a later negative fd", "a later object without fileno"):
            assert error
            assert got == []
        else:
            assert error == ""
            assert got == [(bytes(p), n) for p, n in expected]


@pytest.mark.parametrize("compiled", PATHS)
def test_a_fileno_that_adds_a_message_is_seen_as_the_python_path_iterates(compiled: bool) -> None:
    """``send_many`` reads a list lazily on the Python path: an item added while it runs is sent too."""
    with _channels(compiled) as (a, b, r):
        obj = Counted(r)
        messages: list[Any] = [(b"x", [obj])]
        obj.then = lambda: messages.append((b"added", [r])) if len(messages) == 1 else None
        error, got = _outcome(lambda: a.send_many(messages), b)
        assert error == ""
        assert obj.calls == 1
        assert got == [(b"x", 1), (b"added", 1)]


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("refused", ["own socket", "max_payload", "max_fds"])
def test_send_many_reads_no_fds_past_a_message_it_refuses(compiled: bool, refused: str) -> None:
    """As the Python path: message 0 is refused before message 1's ``fileno()`` runs."""
    with _channels(compiled) as (a, b, r):
        a.max_payload, a.max_fds = 10, 2
        first = {
            "own socket": (b"x", [a.fileno()]),
            "max_payload": (b"x" * 11, []),
            "max_fds": (b"x", [r] * 3),
        }
        later = Counted(r)
        error, got = _outcome(lambda: a.send_many([first[refused], (b"y", [later])]), b)
        assert error.startswith("ValueError")
        assert got == []
        assert later.calls == 0


class _Lookups:
    """``fileno`` is a property that raises AttributeError: the lookup fails (and counts)."""

    def __init__(self) -> None:
        self.lookups = 0

    @property
    def fileno(self) -> Any:
        self.lookups += 1
        raise AttributeError("fileno")


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("call", ["send", "send_many"])
def test_a_failing_fileno_lookup_runs_once(compiled: bool, call: str) -> None:
    with _channels(compiled) as (a, b, r):
        obj, ok = _Lookups(), Counted(r)
        if call == "send":
            error, got = _outcome(lambda: a.send(b"x", [ok, obj]), b)
        else:
            error, got = _outcome(lambda: a.send_many([(b"x", [ok]), (b"y", [obj])]), b)
        assert error == "TypeError: expected an int fd or an object with fileno(), got _Lookups"
        assert got == []
        assert (obj.lookups, ok.calls) == (1, 1)


# -- code that runs while the compiled path reads (the second review) -------------------
#
# Each runs in a child with the debug allocator (freed memory is poisoned), so
# that reading freed memory crashes the child instead of passing by luck.

_LIST_REGROWN_BY_A_COLLECTION = """
import gc, os, sys
from fdchannel import Channel, _fastpath
with _fastpath.forced(sys.argv[1] == "compiled"):
    a, b = Channel.pair()
r, w = os.pipe()
class Obj:
    def fileno(self):
        return r
class Regrow:
    # Cyclic garbage: the next collection runs this, which regrows the list.
    def __init__(self, target):
        self.target, self.me = target, self
    def __del__(self):
        self.target[:] = [w] * 40
seen = set()
for _ in range(50):
    fds = [Obj()] + [w] * 29  # 30 items: past the tuple free list, a real allocation
    Regrow(fds)
    gc.set_threshold(1)  # collect at the next allocation (at once on CPython 3.11)
    try:
        a.send(b"x", fds)
    finally:
        gc.set_threshold(700)
    with b.recv() as msg:
        seen.add(len(msg.fds))
print(sorted(seen))
"""

_MESSAGE_REPLACED_BY_A_FINALIZER = """
import os, sys
from fdchannel import Channel, _fastpath
with _fastpath.forced(sys.argv[1] == "compiled"):
    a, b = Channel.pair()
r, w = os.pipe()
messages = []
class Killer:
    def fileno(self):
        return r
    def __del__(self):
        messages[1] = (b"other", [w])  # frees the old message 1 and its fds list
class Marker:
    def fileno(self):
        return w
class Dropper:
    def __init__(self, fds):
        self.fds = fds
    def fileno(self):
        self.fds.clear()  # message 0's snapshot now holds the last reference to the Killer
        return r
got = []
for _ in range(200):
    fds0 = [Killer()]
    fds0.insert(0, Dropper(fds0))
    messages[:] = [(b"zero", fds0), (b"one", [Marker()] + [w] * 10)]
    a.send_many(messages)
    got.append([(bytes(m.payload), len(m.fds)) for m in (b.recv(), b.recv())])
print(sorted(set(map(tuple, got))))
"""


def _child(code: str, path: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, path],
        env={**os.environ, "PYTHONMALLOC": "debug"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.mark.parametrize("compiled", PATHS)
def test_a_list_a_collection_regrows_is_read_whole(compiled: bool) -> None:
    """The snapshot of the fds was copied from an item array a collection had freed (a segfault)."""
    seen = _child(_LIST_REGROWN_BY_A_COLLECTION, "compiled" if compiled else "pure")
    # The list as it was before or after the collection: a collection's moment
    # is the interpreter's to choose.
    assert seen in ("[30]", "[40]", "[30, 40]")


@pytest.mark.parametrize("compiled", PATHS)
def test_a_message_a_finalizer_replaces_is_read_safely(compiled: bool) -> None:
    """send_many read message 1's fds after freeing what kept them alive (a segfault)."""
    got = _child(_MESSAGE_REPLACED_BY_A_FINALIZER, "compiled" if compiled else "pure")
    # Message 0 as list(fds) read it; message 1 as the finalizer left it.
    assert got == "[((b'zero', 2), (b'other', 1))]"


_OUTBOX_SWAPPED_BY_A_PROPERTY = """
import copy, os, sys
from fdchannel import Channel, _fastpath
class Swapping(Channel):
    # Reading _share_above swaps the outbox for a copy: the old one is freed.
    swaps = 0
    @property
    def _share_above(self):
        d = self.__dict__
        if "_outbox" in d:
            d["_outbox"] = copy.copy(d["_outbox"])
            type(self).swaps += 1
        return None
    @_share_above.setter
    def _share_above(self, value):
        pass
with _fastpath.forced(sys.argv[1] == "compiled"):
    a, b = Channel.pair()
    s = Swapping(a._sock.dup())
a.close()
r, w = os.pipe()
for _ in range(100):
    s.send(b"x", [r])
    b.recv().close()
print(Swapping.swaps > 0)
"""


@pytest.mark.parametrize("compiled", PATHS)
def test_state_a_subclass_property_replaces_while_it_is_read_is_not_used(compiled: bool) -> None:
    """Reading the channel's state ran a property that freed the outbox it had just read (a segfault)."""
    assert _child(_OUTBOX_SWAPPED_BY_A_PROPERTY, "compiled" if compiled else "pure") == "True"


_DICT_READ_BY_A_FINALIZER_AS_IT_IS_MADE = """
import gc, os, sys
from fdchannel import Channel, _fastpath
mode = sys.argv[1].split("-")
r, w = os.pipe()
at, inside, kept = [], [False], []
class Cycle:
    # Freed only by a collection: one runs while recv() allocates.
    def __init__(self, channel):
        self.me, self.channel = self, channel
    def __del__(self):
        at.append(inside[0])
        self.channel.__dict__["_decoder"] = self.channel._decoder
got = []
for _ in range(3):
    with _fastpath.forced(mode[0] == "compiled"):
        a, b = Channel.pair()
    if mode[1] == "lone":
        b.send(b"x", [r])
    else:
        b.send_many([(b"x", [r]), (b"y", [w])])
    a.settimeout(0)
    gc.collect()  # the count starts afresh: the next allocation (in recv) collects
    Cycle(a)
    gc.set_threshold(1, 1, 1)
    inside[0] = True
    m = a.recv()
    inside[0] = False
    gc.set_threshold(700, 10, 10)
    with m:
        got.append((bytes(m.payload), len(m.fds)))
    # Kept: a message let go would be the next recv()'s (spare_messages in
    # _speedups.c), and that recv would then allocate no object to collect in.
    kept.append(m)
    a.close()
    b.close()
    gc.collect()
print(got[0], at == [True] * 3)
"""


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("shape", ["lone", "group"])
def test_a_finalizer_reading_the_channel_dict_as_recv_makes_it_is_safe(compiled: bool, shape: str) -> None:
    """The fourth review's hardening crash: the compiled recv's first look at a channel's
    state made its dict from inline values (CPython 3.11), a collection ran inside, and a
    finalizer's own __dict__ made a second dict over the same values (a segfault later)."""
    out = _child(_DICT_READ_BY_A_FINALIZER_AS_IT_IS_MADE, f"{'compiled' if compiled else 'pure'}-{shape}")
    assert out == "(b'x', 1) True"


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("call", ["send", "send_many"])
def test_a_send_inside_fileno_leaves_nothing_on_the_outer_error(compiled: bool, call: str) -> None:
    """The counts a compiled call leaves for its wrapper were the inner send's, put on the outer error."""
    with _channels(compiled) as (a, b, r):
        obj = Counted(r, raises=OSError(9, "gone"))
        obj.then = lambda: a.send_many([(b"inner", [])]) if call == "send_many" else a.send(b"inner")
        with pytest.raises(OSError, match="gone") as info:
            if call == "send":
                a.send(b"x", [obj])
            else:
                a.send_many([(b"x", [obj])])
        assert not hasattr(info.value, "characters_written")
        assert not hasattr(info.value, "messages_taken")
        assert _outcome(lambda: None, b)[1] == [(b"inner", 0)]


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("limit", ["max_fds", "max_payload"])
def test_a_limit_lowered_by_fileno_is_seen_before_the_next_fileno(compiled: bool, limit: str) -> None:
    """Message 0's own fileno() lowers the limit it then breaks: message 1's never runs."""
    with _channels(compiled) as (a, b, r):
        first, later = Counted(r), Counted(r)
        first.then = lambda: setattr(a, limit, 0)
        error, got = _outcome(lambda: a.send_many([(b"x", [first]), (b"y", [later])]), b)
        assert error.startswith("ValueError")
        assert got == []
        assert (first.calls, later.calls) == (1, 0)


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("limit", ["max_fds", "max_payload"])
def test_a_limit_lowered_by_a_later_fileno_leaves_earlier_messages_sent(compiled: bool, limit: str) -> None:
    """The third review: the compiled path checked message 0 again against the new limit and refused it."""
    with _channels(compiled) as (a, b, r):
        later = Counted(r)
        later.then = lambda: setattr(a, limit, 1 if limit == "max_fds" else 3)
        error, got = _outcome(lambda: a.send_many([(b"hello", [r, r]), (b"x", [later])]), b)
        assert error == ""
        assert got == [(b"hello", 2), (b"x", 1)]


@pytest.mark.parametrize("compiled", PATHS)
def test_a_later_fileno_cannot_resize_an_earlier_payload(compiled: bool) -> None:
    """Message 1's fileno() grows message 0's bytearray: refused, nothing written.

    The size in message 0's header was read before; a buffer grown after it
    would put bytes on the stream that no header counts (the pure path
    wrote 12 bytes under a 5-byte header, and the reader's next frame began
    inside them).  Both paths hold each payload from its size onwards.
    """
    with _channels(compiled) as (a, b, r):
        grown = bytearray(b"hello")
        later = Counted(r)
        later.then = lambda: grown.extend(b" world!")
        with pytest.raises(BufferError):
            a.send_many([(grown, [r]), (b"y", [later])])
        assert later.calls == 1
        assert grown == b"hello"
        grown.extend(b" again")  # free once the call is over
        a.send_many([(grown, [r]), (b"y", [r])])
        assert _outcome(lambda: None, b) == ("", [(b"hello again", 1), (b"y", 1)])
