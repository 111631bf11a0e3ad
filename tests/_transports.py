"""The transports the shared channel tests run against.

Each entry builds a connected pair of channels; a transport the machine
cannot run is skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from fdchannel import Channel
from fdchannel.transports import PidfdGetfd, UnixRights

PairFactory = Callable[..., tuple[Channel, Channel]]


def _unix_pair(**kwargs: object) -> tuple[Channel, Channel]:
    return Channel.pair(transport=UnixRights(), **kwargs)  # type: ignore[arg-type]


#: pytest params for the `make_pair` fixture; other transports append here.
PAIR_FACTORIES = [pytest.param(_unix_pair, id="UnixRights")]


# -- PidfdGetfd: over a socketpair and over TCP on loopback ---------------------

#: Why PidfdGetfd cannot run here (old kernel, seccomp, no Python support).
PIDFD_UNAVAILABLE = PidfdGetfd.unavailable_reason()
needs_pidfd = pytest.mark.skipif(PIDFD_UNAVAILABLE is not None, reason=PIDFD_UNAVAILABLE or "")


def tcp_socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of blocking TCP sockets on 127.0.0.1, Nagle off."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=10)
        try:
            server, _ = listener.accept()
        except BaseException:
            client.close()
            raise
    for s in (client, server):
        s.settimeout(None)
        # Small frames and acknowledgements must not wait for delayed ACKs.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def _pidfd_pair(**kwargs: object) -> tuple[Channel, Channel]:
    return Channel.pair(transport=PidfdGetfd(), **kwargs)  # type: ignore[arg-type]


def _pidfd_tcp_pair(**kwargs: object) -> tuple[Channel, Channel]:
    x, y = tcp_socketpair()
    try:
        a = Channel(x, transport=PidfdGetfd(), **kwargs)  # type: ignore[arg-type]
    except BaseException:
        x.close()
        y.close()
        raise
    try:
        return a, Channel(y, transport=PidfdGetfd(), **kwargs)  # type: ignore[arg-type]
    except BaseException:
        a.close()
        y.close()
        raise


PAIR_FACTORIES += [
    pytest.param(_pidfd_pair, id="PidfdGetfd-unix", marks=needs_pidfd),
    pytest.param(_pidfd_tcp_pair, id="PidfdGetfd-tcp", marks=needs_pidfd),
]
