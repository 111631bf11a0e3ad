"""Property: whatever mix of blocking, timed and non-blocking sends, of
payload sizes and fd counts, every message that send() took arrives exactly
once, whole, in order, with its fds; none that it refused arrives at all."""

from __future__ import annotations

import os
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdchannel import Channel, ChannelClosed

TIMEOUT = 10.0

steps = st.lists(
    st.tuples(
        st.sampled_from([None, 0.0, 0.0005, 0.005]),  # the sender's timeout for this send
        st.sampled_from([0, 1, 253, 254, 600]),  # fds
        st.sampled_from([0, 10, 5000, 200_000]),  # payload bytes
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_every_taken_message_arrives_once_in_order(plan: list[tuple[float | None, int, int]]) -> None:
    a, b = Channel.pair()
    r, w = os.pipe()
    got: list[tuple[bytes, int]] = []
    failure: list[BaseException] = []

    def receiver() -> None:
        b.settimeout(TIMEOUT)
        try:
            for msg in b:
                with msg:
                    got.append((bytes(msg.payload), len(msg.fds)))
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    sent: list[tuple[bytes, int]] = []
    try:
        for i, (timeout, nfds, size) in enumerate(plan):
            a.settimeout(timeout)
            payload = b"%d:" % i + bytes([i % 256]) * size
            if a.pending:
                try:
                    a.flush()
                except (BlockingIOError, TimeoutError):
                    pass
            try:
                a.send(payload, fds=[w] * nfds)
                sent.append((payload, nfds))
            except (BlockingIOError, TimeoutError) as exc:
                if exc.characters_written:  # type: ignore[union-attr]
                    sent.append((payload, nfds))  # taken: its rest is pending
        a.settimeout(TIMEOUT)
        a.flush()
        # A duplication transport's receiver pulls fds from the sender: a
        # sender that closes first withdraws them (FdsWithdrawn), so the
        # sender stays until everything it sent arrived.
        deadline = time.monotonic() + TIMEOUT
        while len(got) < len(sent) and not failure and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        a.close()
        t.join(TIMEOUT)
        b.close()
        os.close(r)
        os.close(w)
    assert not t.is_alive()
    assert not failure or isinstance(failure[0], ChannelClosed), failure
    assert [(len(p), n) for p, n in got] == [(len(p), n) for p, n in sent]
    assert got == sent
