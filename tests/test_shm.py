"""Sealed shared-memory payloads (fdchannel.shm): real memfds, real processes, hostile peers."""

from __future__ import annotations

import sys

import pytest

if sys.platform != "linux":
    pytest.skip(
        "sealed shared memory needs Linux memfd_create and file seals (the fallback is tested in "
        "test_shm_portable.py)",
        allow_module_level=True,
    )

# Linux only from here on (fcntl and resource do not exist on Windows).
import asyncio
import errno
import fcntl
import hashlib
import mmap
import os
import resource
from collections.abc import Callable

import fdchannel
from fdchannel import Channel, ProtocolError, shm
from fdchannel._codec import FLAG_CONTROL, FLAG_GROUP, FLAG_SHARED, Decoder, pack_header
from fdchannel.aio import AsyncChannel
from fdchannel.shm import SealedMemory, SharedMemoryRefused

from ._proc import fork_child, wait_child
from ._structured import channel_class, run_kind, sc_kind  # noqa: F401 - sc_kind is a fixture
from ._transports import PairFactory

TIMEOUT = 30.0
MiB = 1 << 20
ALL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
#: Linux 5.1+; Python 3.11 does not name it.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)


def fork_pair() -> tuple[Channel, Channel]:
    a, b = Channel.pair(max_payload=1 << 30)
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return a, b


def in_child(keep: Channel, body: Callable[[Channel], object]) -> int:
    """Fork; the child keeps *keep* (closing the other end) and runs ``body(keep)``."""

    def run() -> None:
        keep.close_other()
        with keep:
            body(keep)

    pid = fork_child(run)
    keep.close()  # the child's now
    return pid


def status(key: str) -> int:
    """A size from /proc/self/status (VmSize, VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/self/status")


def vm_size() -> int:
    """This process's address-space size in bytes."""
    return status("VmSize")


def reset_peak_rss() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS; return that."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


def unsealed_memfd(data: bytes, seals: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


# -- the round trip -----------------------------------------------------------


def test_a_sealed_payload_arrives_read_only_with_the_other_fds(make_pair: PairFactory) -> None:
    a, b = make_pair()
    data = os.urandom(100_000)
    r, w = os.pipe()
    try:
        with SealedMemory.copy(data) as mem:
            a.send(mem, [r])
        with b.recv() as msg:
            assert msg.shared is not None
            assert msg.shared.size == len(data)
            assert len(msg.fds) == 1  # the pipe; the memfd is msg.shared, not an fd of the message
            view = msg.payload
            assert isinstance(view, memoryview)
            assert view.readonly
            assert view == data
            with pytest.raises(TypeError):
                view[0] = 0  # type: ignore[index]
            os.write(w, b"x")
            assert os.read(msg.fds[0].fileno(), 1) == b"x"
        # The view outlives the message's fds.
        assert bytes(view[:16]) == data[:16]
        del view
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_plain_messages_still_arrive_as_bytes() -> None:
    a, b = fork_pair()
    with a, b:
        a.send(b"plain")
        with b.recv() as msg:
            assert msg.shared is None
            assert msg.payload == b"plain"


def test_an_empty_and_a_built_payload() -> None:
    a, b = fork_pair()
    with a, b:
        with SealedMemory.copy(b"") as empty:
            a.send(empty)

        def fill(view: memoryview) -> None:
            view[:] = b"ab" * (view.nbytes // 2)

        with SealedMemory.build(4 * MiB, fill) as built:
            a.send(built)
            a.send(built)  # immutable: the same memory can go again, anywhere
        with b.recv() as first:
            assert first.shared is not None
            assert first.shared.size == 0
            assert first.payload == b""
        for _ in range(2):
            with b.recv() as msg:
                assert msg.payload == b"ab" * (2 * MiB)


def test_build_refuses_a_fill_that_keeps_a_view_and_leaks_nothing() -> None:
    kept: list[memoryview] = []
    with pytest.raises(BufferError, match="kept a view"):
        SealedMemory.build(4096, lambda view: kept.append(view[1:]))
    kept.clear()
    with pytest.raises(ZeroDivisionError):
        SealedMemory.build(4096, lambda view: 1 / 0)


def test_a_closed_sealed_memory_is_refused_before_anything_is_sent() -> None:
    a, b = fork_pair()
    with a, b:
        mem = SealedMemory.copy(b"gone")
        mem.close()
        with pytest.raises(ValueError, match="closed"):
            a.send(mem)
        a.send(b"next")
        assert b.recv().payload == b"next"


def test_sealed_memory_cannot_be_pickled_or_made_directly() -> None:
    import pickle

    with pytest.raises(TypeError, match="copy"):
        SealedMemory()
    with SealedMemory.copy(b"x") as mem, pytest.raises(TypeError, match="pickled"):
        pickle.dumps(mem)


# -- the sender cannot change what it sent -------------------------------------------


def test_a_sender_cannot_shrink_grow_or_write_the_memfd_after_sending() -> None:
    a, b = fork_pair()
    data = b"\x5a" * (1 * MiB)
    r, w = os.pipe()

    def sender(ch: Channel) -> None:
        os.close(r)
        with SealedMemory.copy(data) as mem:
            ch.send(mem)
            fd = mem.fileno()
            attempts: dict[str, Callable[[], object]] = {
                "shrink": lambda: os.ftruncate(fd, 4096),
                "grow": lambda: os.ftruncate(fd, 2 * MiB),
                "write": lambda: os.pwrite(fd, b"changed", 0),
                "append": lambda: os.write(fd, b"more"),
                "map writable": lambda: mmap.mmap(fd, MiB, mmap.MAP_SHARED, mmap.PROT_WRITE),
                "unseal": lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE),
            }
            report = []
            for name, attempt in attempts.items():
                try:
                    attempt()
                except OSError as exc:
                    report.append(f"{name}:{errno.errorcode[exc.errno or 0]}")
                else:
                    report.append(f"{name}:ALLOWED")
            # A writable *private* mapping is allowed but copies on write:
            # the receiver's pages do not change.
            private = mmap.mmap(fd, MiB, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            private[:7] = b"changed"
            private.close()
            os.write(w, ",".join(report).encode())
        os.close(w)

    pid = in_child(a, sender)
    os.close(w)
    try:
        with b.recv() as msg:
            report = os.read(r, 4096).decode().split(",")
            assert wait_child(pid) == 0
            assert report == [
                "shrink:EPERM",
                "grow:EPERM",
                "write:EPERM",
                "append:EPERM",
                "map writable:EPERM",
                "unseal:EPERM",
            ]
            assert hashlib.sha256(msg.payload).digest() == hashlib.sha256(data).digest()
    finally:
        os.close(r)
        b.close()


# -- a hostile peer -------------------------------------------------------------


@pytest.mark.parametrize(
    ("seals", "declared", "why"),
    [
        (0, None, "missing F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_SEAL"),
        (ALL_SEALS & ~fcntl.F_SEAL_SHRINK, None, "missing F_SEAL_SHRINK"),
        (ALL_SEALS & ~fcntl.F_SEAL_GROW, None, "missing F_SEAL_GROW"),
        (ALL_SEALS & ~fcntl.F_SEAL_WRITE, None, "missing F_SEAL_WRITE"),
        (ALL_SEALS & ~fcntl.F_SEAL_SEAL, None, "missing F_SEAL_SEAL"),
        (
            ALL_SEALS & ~fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE,
            None,
            "missing F_SEAL_WRITE",
        ),
        (ALL_SEALS, 8192, "holds 4096 bytes but the message declared 8192"),
        ("file", None, "not a memfd"),
        ("pipe", None, "not a memfd"),
    ],
)
def test_a_payload_that_fails_the_checks_is_refused_and_closed(
    tmp_path: os.PathLike[str], seals: int | str, declared: int | None, why: str
) -> None:
    a, b = fork_pair()
    probe_r, probe_w = os.pipe()

    def hostile(ch: Channel) -> None:
        os.close(probe_r)
        if seals == "file":
            fd = os.open(os.path.join(tmp_path, "plain"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
            os.write(fd, b"p" * 4096)
        elif seals == "pipe":
            fd, other = os.pipe()
            os.close(other)
        else:
            assert isinstance(seals, int)
            fd = unsealed_memfd(b"h" * 4096, seals)
        # The library itself is the hostile peer: it trusts the sender's word.
        fake = SealedMemory._own(fd, 4096 if declared is None else declared)
        with fake:
            ch.send(fake, [probe_w])  # the probe tells whether the receiver closed every fd
        os.close(probe_w)
        ch.send(b"after")

    pid = in_child(a, hostile)
    os.close(probe_w)
    try:
        with pytest.raises(SharedMemoryRefused, match=why):
            b.recv()
        # Every fd of the refused message is closed: the probe's last write end is gone.
        assert wait_child(pid) == 0
        assert os.read(probe_r, 1) == b""
        # The stream was well formed: the channel goes on.
        with b.recv() as msg:
            assert msg.payload == b"after"
    finally:
        os.close(probe_r)
        b.close()


def test_a_memfd_a_hostile_peer_unseals_cannot_be_resealed_for_us() -> None:
    """F_SEAL_SEAL missing means more seals can come later, but none can go: still refused."""
    a, b = fork_pair()
    with a, b:
        fd = unsealed_memfd(b"z" * 10, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        with SealedMemory._own(fd, 10) as fake:
            a.send(fake)
        with pytest.raises(SharedMemoryRefused, match="F_SEAL_SEAL"):
            b.recv()


@pytest.mark.parametrize(
    ("flags", "nfds", "payload", "match"),
    [
        (FLAG_SHARED, 0, b"\0" * 8, "malformed shared-memory frame"),
        (FLAG_SHARED, 1, b"\0" * 7, "malformed shared-memory frame"),
        (FLAG_SHARED, 1, b"\0" * 16, "malformed shared-memory frame"),
        (FLAG_SHARED | FLAG_CONTROL, 0, b"\0" * 8, "malformed control frame"),
        (8, 0, b"", "unknown frame flags 0x8"),
        # send_many's group flag (bit 2) is never set on a shared frame.
        (FLAG_SHARED | FLAG_GROUP, 1, b"\0" * 8, "never part of a group"),
    ],
)
def test_malformed_shared_frames_are_protocol_errors(
    flags: int, nfds: int, payload: bytes, match: str
) -> None:
    decoder = Decoder(wire_id=0, in_band=True, max_payload=1 << 20, max_fds=10, max_aux=0)
    frame = pack_header(0, nfds, 0, len(payload), flags=flags) + payload
    decoder.get_buffer()[: len(frame)] = frame
    decoder.buffer_updated(len(frame))
    with pytest.raises(ProtocolError, match=match):
        decoder.next_frame()


def test_old_frames_decode_as_before_and_shared_ones_are_marked() -> None:
    decoder = Decoder(wire_id=0, in_band=True, max_payload=1 << 20, max_fds=10, max_aux=0)
    # A shared frame declaring 1 fd, with its size as the payload.
    shared = pack_header(0, 1, 0, 8, flags=FLAG_SHARED) + (5).to_bytes(8, "little")
    stream = pack_header(0, 0, 0, 3) + b"old" + shared
    decoder.get_buffer()[: len(stream)] = stream
    r, w = os.pipe()
    os.close(w)
    decoder.buffer_updated(len(stream), [r])
    old = decoder.next_frame()
    new = decoder.next_frame()
    assert old is not None
    assert new is not None
    assert (old.shared, old.payload) == (False, b"old")
    assert (new.shared, new.nfds, new.fds) == (True, 1, [r])
    os.close(r)


# -- memory: the receiver's address space, forwarding unmapped ---------------------


def test_a_large_payload_maps_under_an_address_space_limit_in_band_bytes_exceed() -> None:
    """256 MiB under RLIMIT_AS = what the process uses + 256 MiB + 48 MiB.

    The mapping needs exactly the file's size; the in-band receive of the
    same payload under the same limit needs a buffer of that size *and* the
    copy the application makes of it, and fails.
    """
    size = 256 * MiB
    data_digest = hashlib.sha256(b"\xa7" * size).digest()
    a, b = fork_pair()
    done_r, done_w = os.pipe()

    def receiver(ch: Channel) -> None:
        os.close(done_r)
        limit = vm_size() + size + 48 * MiB
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        with ch.recv() as msg:
            assert msg.shared is not None
            assert msg.shared.size == size
            assert hashlib.sha256(msg.payload).digest() == data_digest
        # Without a mapping left, one more mapping of the same size fits again.
        with ch.recv() as msg:
            assert hashlib.sha256(msg.payload).digest() == data_digest
        # In band, the same bytes need the receive buffer and a copy (bytes()):
        # over the limit, where the sealed payload was not.
        try:
            with ch.recv() as msg:
                bytes(msg.payload)
        except MemoryError:
            os.write(done_w, b"in-band: MemoryError")
        else:
            os.write(done_w, b"in-band: fit")
        os.close(done_w)

    pid = in_child(b, receiver)
    os.close(done_w)
    try:
        payload = b"\xa7" * size
        with SealedMemory.copy(payload) as mem:
            a.send(mem)
            a.send(mem)
        try:
            a.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the receiver gave up on it
        assert wait_child(pid, 120) == 0
        assert os.read(done_r, 100) == b"in-band: MemoryError"
    finally:
        os.close(done_r)
        a.close()


def assert_mapping_fails(msg: fdchannel.Message) -> None:
    try:
        msg.payload  # noqa: B018 - the access maps
    except OSError as exc:
        assert exc.errno == errno.ENOMEM
    else:
        raise AssertionError("the mapping fit under the address-space limit")


def test_a_forwarder_under_a_tight_limit_relays_a_payload_without_mapping_it() -> None:
    """A → forwarder → C: the forwarder's address space stays 32 MiB above what it had."""
    size = 128 * MiB
    a, fwd_in = fork_pair()
    fwd_out, c = fork_pair()
    report_r, report_w = os.pipe()

    def forwarder() -> None:
        a.close()
        c.close()
        os.close(report_r)
        limit = vm_size() + 32 * MiB
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        with fwd_in, fwd_out:
            start = reset_peak_rss()
            with fwd_in.recv() as msg:
                assert msg.shared is not None
                fwd_out.send(msg.shared)  # the fd, unmapped
                grew = status("VmHWM") - start
                # Mapping it here would exceed the limit: a clear error, nothing lost.
                assert_mapping_fails(msg)
            # The same payload in band cannot even be received here.
            try:
                fwd_in.recv()
            except MemoryError:
                os.write(report_w, f"MemoryError {grew}".encode())
        os.close(report_w)

    pid = fork_child(forwarder)
    fwd_in.close()
    fwd_out.close()
    os.close(report_w)
    try:
        payload = os.urandom(1 * MiB) * 128
        with SealedMemory.copy(payload) as mem:
            a.send(mem)
        with c.recv() as msg:
            assert msg.shared is not None
            assert msg.shared.size == size
            assert hashlib.sha256(msg.payload).digest() == hashlib.sha256(payload).digest()
        try:
            a.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert wait_child(pid, 120) == 0
        word, grew = os.read(report_r, 100).split()
        assert word == b"MemoryError"
        # The forwarder's peak RSS hardly moved: it never touched the payload's pages.
        assert int(grew) < 4 * MiB
    finally:
        os.close(report_r)
        a.close()
        c.close()


# -- the threshold mode ------------------------------------------------------------


def test_share_above_sends_large_payloads_as_sealed_memory_and_small_in_band() -> None:
    a, b = fork_pair()
    with a, b:
        shm.share_above(a, 64 * 1024)
        big = os.urandom(200_000)

        def child(ch: Channel) -> None:
            with ch.recv() as small, ch.recv() as large, ch.recv() as exact:
                assert small.shared is None
                assert small.payload == b"small"
                assert large.shared is not None
                assert large.payload == big
                assert exact.shared is None
                assert len(exact.payload) == 64 * 1024
            ch.send(b"ok")

        pid = in_child(b, child)
        b.close()
        a.send(b"small")
        a.send(big)
        a.send(bytearray(64 * 1024))  # at the threshold: in band
        assert a.recv().payload == b"ok"
        assert wait_child(pid) == 0


def test_share_above_falls_back_to_in_band_where_sealed_memory_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fdchannel._shared

    monkeypatch.setattr(fdchannel._shared, "available", lambda: False)
    a, b = fork_pair()
    with a, b:
        shm.share_above(a, 10)
        a.send(b"x" * 100)
        with b.recv() as msg:
            assert msg.shared is None
            assert msg.payload == b"x" * 100


def test_share_above_checks_its_arguments() -> None:
    a, b = fork_pair()
    with a, b:
        with pytest.raises(ValueError, match="non-negative"):
            shm.share_above(a, -1)
        with pytest.raises(TypeError, match="Channel"):
            shm.share_above(object(), 10)  # type: ignore[arg-type]
        shm.share_above(a, 0)
        a.send(b"1")
        with b.recv() as msg:
            assert msg.shared is not None
        shm.share_above(a, None)
        a.send(b"2")
        with b.recv() as msg:
            assert msg.shared is None


def test_async_channels_send_and_receive_sealed_memory() -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        async with a, b:
            with SealedMemory.copy(b"async" * 1000) as mem:
                await a.send(mem)
            with await b.recv() as msg:
                assert msg.shared is not None
                assert msg.payload == b"async" * 1000
            shm.share_above(a, 100)
            await a.send(b"y" * 1000)
            with await b.recv() as msg:
                assert msg.shared is not None
                assert msg.payload == b"y" * 1000

    asyncio.run(main())


def test_from_channel_keeps_the_threshold() -> None:
    a, b = fork_pair()
    shm.share_above(a, 100)
    moved = AsyncChannel.from_channel(a)

    async def main() -> None:
        await moved.send(b"z" * 1000)

    try:
        asyncio.run(main())
        with b.recv() as msg:
            assert msg.shared is not None
    finally:
        moved.close()
        b.close()


def test_the_public_names() -> None:
    assert shm.available()
    assert fdchannel.SharedMemoryRefused is SharedMemoryRefused
    assert issubclass(SharedMemoryRefused, fdchannel.FdChannelError)


def test_trio_and_anyio_channels_send_and_receive_sealed_memory(sc_kind: str) -> None:  # noqa: F811
    cls = channel_class(sc_kind)

    async def main() -> None:
        a, b = cls.pair()
        async with a, b:
            with SealedMemory.copy(b"structured" * 100) as mem:
                await a.send(mem)
            with await b.recv() as msg:
                assert msg.shared is not None
                assert msg.payload == b"structured" * 100
            shm.share_above(a, 100)
            await a.send(b"s" * 1000)
            with await b.recv() as msg:
                assert msg.shared is not None
                assert msg.payload == b"s" * 1000

    run_kind(sc_kind, main)


# -- with send_many, recv_into and the compiled path (#13) ----------------------------


def test_the_group_and_shared_flags_are_distinct_bits() -> None:
    assert (FLAG_CONTROL, FLAG_SHARED, FLAG_GROUP) == (1, 2, 4)


def test_send_many_sends_sealed_memory_on_its_own_between_groups() -> None:
    a, b = Channel.pair()
    data = os.urandom(100_000)
    r, w = os.pipe()
    try:
        with SealedMemory.copy(data) as mem:
            a.send_many([(b"one", [r]), (b"two", [w]), (mem, [r]), (b"four", [w, r])])
        with b.recv() as one, b.recv() as two, b.recv() as three, b.recv() as four:
            assert (one.payload, len(one.fds), one.shared) == (b"one", 1, None)
            assert (two.payload, len(two.fds), two.shared) == (b"two", 1, None)
            assert three.shared is not None
            assert three.payload == data
            assert len(three.fds) == 1
            assert (four.payload, len(four.fds), four.shared) == (b"four", 2, None)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_send_many_honours_share_above() -> None:
    a, b = Channel.pair()
    with a, b:
        shm.share_above(a, 64 * 1024)
        big = os.urandom(200_000)
        a.send_many([(b"small", []), (big, []), (b"after", [])])
        with b.recv() as small, b.recv() as large, b.recv() as after:
            assert small.shared is None
            assert large.shared is not None
            assert large.payload == big
            assert after.payload == b"after"


def test_a_channel_with_share_above_sends_through_the_python_path() -> None:
    """The compiled send would put the payload in band: it hands such a channel over."""
    a, b = Channel.pair()
    with a, b:
        shm.share_above(a, 1024)
        a.send(bytes(4096))
        with b.recv() as msg:
            assert msg.shared is not None
            assert msg.payload == bytes(4096)


def test_recv_into_copies_a_sealed_payload_out_and_lets_the_memory_go() -> None:
    a, b = Channel.pair()
    data = os.urandom(100_000)
    r, w = os.pipe()
    try:
        with SealedMemory.copy(data) as mem:
            a.send(mem, [r])
        buf = bytearray(200_000)
        n, fds = b.recv_into(buf)
        assert n == len(data)
        assert buf[:n] == data
        assert len(fds) == 1  # the pipe: the memfd was closed (the leak check sees it)
        for fd in fds:
            fd.close()
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


class _OwnSealed(SealedMemory):
    """An application's own subclass (a name of its own, a helper method)."""

    __slots__ = ()

    def text(self) -> str:
        with self.view() as view:
            return bytes(view).decode()


@pytest.mark.parametrize("compiled", [True, False])
def test_send_many_takes_a_sealed_memory_subclass_in_order(compiled: bool) -> None:
    """A subclass goes alone, as SealedMemory does (it went into a group as if it were bytes: TypeError)."""
    from fdchannel import _fastpath

    with _fastpath.forced(compiled):
        a, b = Channel.pair()
    with a, b, _OwnSealed.copy(b"shared bytes") as mem, open(os.devnull) as f:
        assert mem.text() == "shared bytes"
        b.settimeout(10)
        a.send_many([(b"one", [f]), (mem, [f]), (b"two", [])])
        got = [b.recv() for _ in range(3)]
        try:
            assert [m.payload if m.shared is None else None for m in got] == [b"one", None, b"two"]
            shared = got[1].shared
            assert shared is not None
            with shared.view() as view:
                assert bytes(view) == b"shared bytes"
            assert [len(m.fds) for m in got] == [1, 1, 0]
        finally:
            for m in got:
                m.close()
