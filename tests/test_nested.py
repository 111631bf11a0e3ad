"""Channels inside messages: send_channel/recv_channel with real processes, every refusal, every stop."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys
import threading
from types import FrameType

import pytest

import fdchannel
import fdchannel._fastpath
from fdchannel import Channel, ChannelClosed, ProtocolError, recv_channel, send_channel, send_new_channel, shm
from fdchannel._codec import pack_header
from fdchannel._nested import CHANNEL_DESCRIPTOR, asend_channel, asend_new_channel
from fdchannel.aio import AsyncChannel
from fdchannel.transports import PidfdGetfd, UnixRights

from ._portable import AnnouncingLock, in_thread, join_clean, more_than_a_socket_holds
from ._proc import fork_child, wait_child
from ._structured import channel_class, run_kind, sc_kind  # noqa: F401 - sc_kind is a fixture
from ._transports import PIDFD_UNAVAILABLE, PairFactory

if sys.platform == "win32":
    pytest.skip(
        "channels move as sockets in SCM_RIGHTS or pidfd_getfd; a WinDuplicate end cannot move "
        "(send_channel refuses it, tested on Linux)",
        allow_module_level=True,
    )

TIMEOUT = 30.0

END_TRANSPORTS = [
    pytest.param(UnixRights, id="UnixRights"),
    pytest.param(lambda: UnixRights(acknowledge=True, window=5), id="UnixRights-acked"),
    pytest.param(
        PidfdGetfd,
        id="PidfdGetfd",
        marks=pytest.mark.skipif(PIDFD_UNAVAILABLE is not None, reason=PIDFD_UNAVAILABLE or ""),
    ),
]


def same_transport(got: object, want: object) -> bool:
    """The same class, and for UnixRights the same mode and window (repr shows both)."""
    return (type(got), repr(got)) == (type(want), repr(want))


def pair(**kwargs: object) -> tuple[Channel, Channel]:
    a, b = Channel.pair(**kwargs)  # type: ignore[arg-type]
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return a, b


# -- moving an end to another process ---------------------------------------------


@pytest.mark.parametrize("transport", END_TRANSPORTS)
def test_a_child_gets_a_ready_channel_of_the_same_transport_and_limits(transport: type) -> None:
    via, via_child = pair()
    sent_transport = transport()
    kept, moving = Channel.pair(transport=sent_transport, max_payload=1000, max_fds=7)
    kept.settimeout(TIMEOUT)
    shm.share_above(moving, 500)
    r, w = os.pipe()

    def child() -> None:
        via.close()
        kept.close()
        moving.close()
        os.close(w)
        with via_child, via_child.recv() as msg:
            got = recv_channel(msg)
            assert got.payload == b"your channel"
            assert len(got.fds) == 1
            with got.channel as ch, got.fds[0].open("rb") as pipe:
                assert pipe.read() == b"through the pipe"
                assert type(ch) is Channel
                # The same class, mode and window.
                assert same_transport(ch.transport, sent_transport)
                assert (ch.max_payload, ch.max_fds, ch._share_above) == (1000, 7, 500)
                ch.settimeout(TIMEOUT)
                with ch.recv() as hello:
                    assert hello.payload == b"hello"
                    ch.send(b"echo:" + hello.payload, [hello.fds[0]])
                # PidfdGetfd: the parent pulls the fd from this process, so stay until it has.
                assert ch.recv().payload == b"bye"

    pid = fork_child(child)
    via_child.close()
    try:
        send_channel(via, moving, b"your channel", [r])
        assert moving.closed  # the sender's object let go at once
        with pytest.raises(ValueError, match="closed"):
            moving.send(b"x")
        os.close(r)
        os.write(w, b"through the pipe")
        os.close(w)
        a, b = os.pipe()
        kept.send(b"hello", [a])
        os.close(a)
        with kept.recv() as reply:
            assert reply.payload == b"echo:hello"
            assert len(reply.fds) == 1
        os.close(b)
        kept.send(b"bye")
        assert wait_child(pid) == 0
        with pytest.raises(ChannelClosed):
            kept.recv()  # the child's end closed: the only other copy of the socket
    finally:
        kept.close()
        via.close()


def test_data_the_end_never_read_goes_with_it(make_pair: PairFactory) -> None:
    via, via_peer = make_pair()  # every transport carries the end: SCM_RIGHTS, pidfd_getfd, over TCP too
    kept, moving = pair()
    with via, via_peer, kept:
        kept.send(b"sent before the move")
        send_channel(via, moving)
        with via_peer.recv() as msg:
            got = recv_channel(msg)
        with got.channel as ch:
            assert ch.recv().payload == b"sent before the move"


def test_send_new_channel_keeps_one_end_and_sends_the_other() -> None:
    via, via_peer = pair(max_payload=4096)
    with via, via_peer:
        kept = send_new_channel(via, b"new")
        with kept, via_peer.recv() as msg:
            got = recv_channel(msg)
            with got.channel as ch:
                assert got.payload == b"new"
                assert ch.max_payload == 4096
                kept.send(b"direct")
                assert ch.recv().payload == b"direct"


def test_send_new_channel_leaves_nothing_open_when_the_send_fails() -> None:
    via, via_peer = pair()
    via_peer.close()
    via.close()
    with pytest.raises(ValueError, match="closed"):
        send_new_channel(via)


def test_async_ends_stay_async_and_a_receiver_may_choose() -> None:
    async def main() -> None:
        via, via_peer = AsyncChannel.pair()
        async with via, via_peer:
            kept = await asend_new_channel(via, b"async")
            async with kept:
                msg = await via_peer.recv()
                got = recv_channel(msg)
                assert type(got.channel) is AsyncChannel
                async with got.channel as ch:
                    await kept.send(b"ping")
                    assert (await ch.recv()).payload == b"ping"
            a, b = AsyncChannel.pair()
            await asend_channel(via, b)
            async with a:
                with await via_peer.recv() as msg:
                    blocking = recv_channel(msg, cls=Channel).channel
                with blocking:
                    await a.send(b"to blocking")
                    blocking.settimeout(TIMEOUT)
                    assert blocking.recv().payload == b"to blocking"

    asyncio.run(main())


def test_the_receiver_can_cap_the_limits() -> None:
    via, via_peer = pair()
    kept, moving = pair(max_payload=1 << 20)
    with via, via_peer, kept:
        send_channel(via, moving)
        with via_peer.recv() as msg:
            ch = recv_channel(msg, max_payload=10).channel
        with ch:
            assert ch.max_payload == 10
            with pytest.raises(ValueError, match="max_payload"):
                ch.send(b"x" * 11)


# -- refusals: nothing sent, the end unchanged --------------------------------------


def assert_usable(end: Channel, peer: Channel) -> None:
    assert not end.closed
    peer.send(b"still")
    assert end.recv().payload == b"still"
    end.send(b"usable")
    assert peer.recv().payload == b"usable"


def test_a_channel_over_itself_or_its_partner_is_refused() -> None:
    a, b = pair()
    with a, b:
        with pytest.raises(ValueError, match="over itself"):
            send_channel(a, a)
        with pytest.raises(ValueError, match="pair partner"):
            send_channel(a, b)
        dup = Channel(a._sock.dup())
        with dup, pytest.raises(ValueError, match="over itself"):
            send_channel(a, dup)  # another object on the same socket
        assert_usable(a, b)


def test_an_end_with_buffered_received_data_is_refused() -> None:
    via, via_peer = pair()
    end, peer = pair()
    with via, via_peer, end, peer:
        # Two messages in one write: the first recv() buffers the second.
        peer._sock.sendall(pack_header(0, 0, 0, 3) + b"one" + pack_header(0, 0, 0, 3) + b"two")
        assert end.recv().payload == b"one"
        with pytest.raises(ValueError, match="received data not yet returned"):
            send_channel(via, end)
        assert end.recv().payload == b"two"
        assert_usable(end, peer)
        send_channel(via, end)  # now it may go
        with via_peer.recv() as msg:
            recv_channel(msg).channel.close()


def test_an_end_with_pending_output_is_refused() -> None:
    via, via_peer = pair()
    end, peer = pair()
    with via, via_peer, end, peer:
        end.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            end.send(b"x" * more_than_a_socket_holds(1 << 20))
        assert info.value.characters_written > 0  # type: ignore[attr-defined]
        assert end.pending
        with pytest.raises(ValueError, match="pending output"):
            send_channel(via, end)
        assert not end.closed


def test_closed_unusable_and_odd_ends_are_refused() -> None:
    via, via_peer = pair()
    with via, via_peer:
        gone, gone_peer = pair()
        gone.close()
        gone_peer.close()
        with pytest.raises(ValueError, match="closed"):
            send_channel(via, gone)
        broken, raw = pair()
        with broken, raw:
            raw._sock.sendall(b"garbage that is no frame header")
            with pytest.raises(ProtocolError):
                broken.recv()
            with pytest.raises(ValueError, match="unusable"):
                send_channel(via, broken)
        with pytest.raises(TypeError, match="Channel or AsyncChannel"):
            send_channel(via, object())  # type: ignore[arg-type]
        end, peer = pair()
        with end, peer:
            with pytest.raises(TypeError, match="bytes-like"):
                send_channel(via, end, "text")  # type: ignore[arg-type]
            assert_usable(end, peer)


def test_an_end_in_use_by_another_thread_is_refused() -> None:
    via, via_peer = pair()
    end, peer = pair()
    with via, via_peer, end, peer:
        entered = threading.Event()
        got: list[bytes] = []

        def reader() -> None:
            entered.set()
            got.append(bytes(end.recv().payload))

        thread = threading.Thread(target=reader)
        thread.start()
        assert entered.wait(TIMEOUT)
        # The reader holds the receive lock from before recv() blocks until it returns.
        while not end._recv_lock.locked():
            thread.join(0.001)
        with pytest.raises(RuntimeError, match="in use by another recv"):
            send_channel(via, end)
        peer.send(b"done")
        thread.join(TIMEOUT)
        assert got == [b"done"]
        assert_usable(end, peer)


# -- a send that stops: taken or not, exactly one owner -------------------------------


def test_a_send_not_taken_leaves_the_end_usable() -> None:
    via, via_peer = pair()
    end, peer = pair()
    with via, via_peer, end, peer:
        via.setblocking(False)
        with pytest.raises(BlockingIOError):
            via.send(b"y" * more_than_a_socket_holds(1 << 20))
        assert via.pending
        # Older data must go first and cannot: the message is not taken.
        with pytest.raises(BlockingIOError) as info:
            send_channel(via, end)
        assert info.value.characters_written == 0  # type: ignore[attr-defined]
        assert_usable(end, peer)


def test_a_send_that_fails_leaves_the_end_usable() -> None:
    via, via_peer = pair()
    end, peer = pair()
    via_peer.close()
    with via, end, peer:
        with pytest.raises((BrokenPipeError, ConnectionResetError)) as info:
            send_channel(via, end, b"to nobody")
        assert info.value.characters_written == 0  # type: ignore[attr-defined]
        assert_usable(end, peer)


def test_a_send_taken_in_part_moves_the_end_and_the_rest_follows() -> None:
    via, via_peer = pair(max_payload=1 << 30)
    end, peer = pair()
    with via, via_peer, peer:
        via.setblocking(False)
        big = b"z" * more_than_a_socket_holds(1 << 20)
        with pytest.raises(BlockingIOError) as info:
            send_channel(via, end, big)
        assert info.value.characters_written > 0  # type: ignore[attr-defined]
        assert end.closed  # taken: the channel duplicated the fd for the rest
        done = threading.Event()

        def flush() -> None:
            via.settimeout(TIMEOUT)
            via.flush()
            done.set()

        thread = threading.Thread(target=flush)
        thread.start()
        with via_peer.recv() as msg:
            got = recv_channel(msg)
        thread.join(TIMEOUT)
        assert done.is_set()
        assert got.payload == big
        with got.channel as ch:
            peer.send(b"after the move")
            assert ch.recv().payload == b"after the move"


def test_a_cancelled_send_that_was_not_taken_leaves_the_end_usable() -> None:
    async def main() -> None:
        via, via_peer = AsyncChannel.pair(max_payload=1 << 30)
        end, peer = AsyncChannel.pair()
        async with via, via_peer, end, peer:
            # Older data blocks the socket: the message carrying the end never starts.
            stuck = asyncio.ensure_future(via.send(b"w" * more_than_a_socket_holds(1 << 20)))
            await asyncio.sleep(0)
            task = asyncio.ensure_future(asend_channel(via, end))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await task
            assert info.value.characters_written == 0  # type: ignore[attr-defined]
            assert not end.closed
            await peer.send(b"still")
            assert (await end.recv()).payload == b"still"
            stuck.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stuck

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_a_cancelled_send_that_was_taken_moves_the_end() -> None:
    async def main() -> None:
        via, via_peer = AsyncChannel.pair(max_payload=1 << 30)
        end, peer = AsyncChannel.pair()
        async with via, via_peer, peer:
            big = b"v" * more_than_a_socket_holds(1 << 20)
            task = asyncio.ensure_future(asend_channel(via, end, big))
            await asyncio.sleep(0)  # the first bytes, with the fd, leave before the first wait
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await task
            assert info.value.characters_written > 0  # type: ignore[attr-defined]
            assert end.closed
            receiving = asyncio.ensure_future(via_peer.recv())
            await via.flush()
            with await receiving as msg:
                got = recv_channel(msg)
            async with got.channel as ch:
                assert got.payload == big
                await peer.send(b"moved")
                assert (await ch.recv()).payload == b"moved"

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_an_end_closed_while_its_send_waits_for_its_turn_is_not_replaced_by_another_file() -> None:
    """Another task closes *end*, and a pipe takes its number, while the send waits for *via*.

    Before, the number read as the call began went out: the peer got the pipe.
    """

    async def main() -> None:
        via, via_peer = AsyncChannel.pair(max_payload=1 << 30)
        end, peer = AsyncChannel.pair()
        number = end.fileno()
        async with via, via_peer, peer:
            big = b"w" * more_than_a_socket_holds(1 << 20)
            stuck = asyncio.ensure_future(via.send(big))  # older data: the next send waits
            await asyncio.sleep(0)
            task = asyncio.ensure_future(asend_channel(via, end, b"end"))
            while not via._send_gate._waiters:  # the send waits its turn, the numbers read
                await asyncio.sleep(0.001)
            end.close()
            r, w = os.pipe()
            try:
                assert number in (r, w)  # the number names the pipe now
                assert (await via_peer.recv()).payload == big
                with await via_peer.recv() as msg:
                    got = recv_channel(msg)
                await stuck
                await task
                async with got.channel as ch:
                    assert got.payload == b"end"
                    assert stat.S_ISSOCK(os.fstat(ch.fileno()).st_mode)
                    await peer.send(b"moved")
                    assert (await ch.recv()).payload == b"moved"
            finally:
                os.close(r)
                os.close(w)

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_an_end_closed_while_its_send_waits_for_the_lock_is_not_replaced_by_another_file() -> None:
    """The blocking twin: another thread closes *end* while ``send_channel`` waits for *via*'s lock."""
    with fdchannel._fastpath.forced(False):  # the compiled path hands a busy lock to this one
        via, via_peer = pair(max_payload=1 << 30)
    end, peer = pair()
    number = end.fileno()
    with via, via_peer, peer:
        big = b"w" * more_than_a_socket_holds(1 << 20)
        lock = via._send_lock = AnnouncingLock(via._send_lock)  # type: ignore[assignment]
        first = in_thread(lambda: via.send(big))
        assert lock.held.wait(TIMEOUT)  # the first send holds the lock, waiting to write
        second = in_thread(lambda: send_channel(via, end, b"end"))
        assert lock.second.wait(TIMEOUT)
        end.close()
        r, w = os.pipe()
        try:
            assert number in (r, w)
            assert via_peer.recv().payload == big
            with via_peer.recv() as msg:
                got = recv_channel(msg)
            join_clean(first)
            join_clean(second)
            with got.channel as ch:
                assert stat.S_ISSOCK(os.fstat(ch.fileno()).st_mode)
        finally:
            os.close(r)
            os.close(w)


def test_a_handlers_error_as_the_sent_duplicate_is_closed_still_moves_the_end() -> None:
    """The review: the message had left, a handler raised at the duplicate's close, the end stayed open too.

    A trace function raises where a signal handler's error would (at the
    first instruction of ``socket.close``), as tests/_faults.py does.
    """
    via, via_peer = pair()
    end, peer = pair()
    with via, via_peer, peer:

        def strike(frame: FrameType, event: str, arg: object) -> None:
            if (
                event == "call"
                and frame.f_code.co_name == "close"
                and frame.f_code.co_filename == socket.__file__
            ):
                sys.settrace(None)
                raise KeyboardInterrupt

        sys.settrace(strike)
        try:
            with pytest.raises(KeyboardInterrupt):
                send_channel(via, end, b"end")
        finally:
            sys.settrace(None)
        assert end.closed  # the peer's now: one owner
        with via_peer.recv() as msg:
            got = recv_channel(msg)
        with got.channel as ch:
            ch.settimeout(TIMEOUT)
            peer.send(b"moved")
            assert ch.recv().payload == b"moved"


# -- receiving -------------------------------------------------------------------------


def test_recv_channel_refuses_a_message_without_a_channel_and_changes_nothing() -> None:
    via, via_peer = pair()
    with via, via_peer:
        r, w = os.pipe()
        try:
            via.send(b"plain", [r])
            with via_peer.recv() as msg:
                with pytest.raises(ValueError, match="carries no channel"):
                    recv_channel(msg)
                assert not msg.fds[0].closed
            # A forged descriptor with a pipe instead of a socket.
            forged = CHANNEL_DESCRIPTOR.pack(b"FDCHCHAN", 1, 0, 0, 0, 64, 100, 10, -1)
            via.send(forged, [r])
            with via_peer.recv() as msg:
                with pytest.raises(ValueError, match="not a connected stream socket"):
                    recv_channel(msg)
                assert not msg.fds[0].closed  # still the message's, closed with it
            via.send(CHANNEL_DESCRIPTOR.pack(b"FDCHCHAN", 1, 0, 9, 0, 64, 100, 10, -1), [r])
            with via_peer.recv() as msg, pytest.raises(ValueError, match="unknown transport id 9"):
                recv_channel(msg)
        finally:
            os.close(r)
            os.close(w)


def test_the_public_names() -> None:
    assert fdchannel.send_channel is send_channel
    assert fdchannel.recv_channel is recv_channel
    assert fdchannel.asend_channel is asend_channel


def test_trio_and_anyio_ends_move_and_arrive_as_their_kind(sc_kind: str) -> None:  # noqa: F811
    cls = channel_class(sc_kind)

    async def main() -> None:
        via, via_peer = cls.pair()
        async with via, via_peer:
            kept = await asend_new_channel(via, b"structured")
            async with kept:
                with await via_peer.recv() as msg:
                    got = recv_channel(msg)
                assert type(got.channel) is cls
                assert got.payload == b"structured"
                async with got.channel as ch:
                    await kept.send(b"direct")
                    assert (await ch.recv()).payload == b"direct"
                    # And a blocking end over a structured channel, rebuilt blocking.
                    a, b = pair()
                    with a:
                        await asend_channel(via, b)
                        with await via_peer.recv() as msg:
                            moved = recv_channel(msg).channel
                        with moved:
                            assert type(moved) is Channel
                            a.send(b"to the moved end")
                            assert moved.recv().payload == b"to the moved end"

    run_kind(sc_kind, main)


def _strike_as_the_send_lock_is_tried() -> list[bool]:
    """Raise KeyboardInterrupt (as a signal handler's error) at the end of the first C call
    `_claim` makes (in `fdchannel._guard._take`) to try *end*'s send lock: where CPython
    3.11 runs pending handlers."""
    armed = [True]

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if (
            armed[0]
            and event == "c_return"
            and frame.f_code.co_name == "_take"
            and getattr(arg, "__name__", "") in ("acquire", "extend")
        ):
            armed[0] = False
            raise KeyboardInterrupt("a signal handler's error")

    sys.setprofile(profile)
    return armed


@pytest.mark.parametrize("busy", [True, False])
def test_a_handler_error_as_the_end_is_claimed_releases_only_what_the_call_took(busy: bool) -> None:
    """Busy: another thread's send holds the end's lock, the try fails, and the error must not
    release that thread's lock (it did: the mark said held before the try).  Free: the lock
    the try took is let go, so the end stays usable."""
    via, peer = Channel.pair()
    end, partner = Channel.pair()
    held, done = threading.Event(), threading.Event()

    def other() -> None:
        with end._send_lock:  # as a send() in progress in another thread
            held.set()
            done.wait(TIMEOUT)

    thread = threading.Thread(target=other) if busy else None
    with via, peer, end, partner:
        try:
            if thread is not None:
                thread.start()
                assert held.wait(TIMEOUT)
            armed = _strike_as_the_send_lock_is_tried()
            try:
                with pytest.raises(KeyboardInterrupt):
                    send_channel(via, end, b"x")
            finally:
                sys.setprofile(None)
            assert not armed[0]  # it struck
            assert end._send_lock.locked() == busy  # the other thread's, still; or ours, let go
            assert not end._recv_lock.locked()
        finally:
            done.set()
            if thread is not None:
                thread.join(TIMEOUT)
        peer.settimeout(0)
        with pytest.raises(BlockingIOError):
            peer.recv()  # nothing was sent
        end.send(b"still mine")
        partner.settimeout(TIMEOUT)
        assert partner.recv().payload == b"still mine"
