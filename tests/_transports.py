"""The transports the shared channel tests run against.

Each entry builds a connected pair of channels; a transport the machine
cannot run is skipped with the reason, never silently dropped.  On Windows
the list also holds WinDuplicate's pairs (its real Win32 adapter runs only
there; elsewhere test_transport_windows_sim.py drives it simulated).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

import pytest

from fdchannel import Channel
from fdchannel.transports import PidfdGetfd, UnixRights, WinDuplicate

PairFactory = Callable[..., tuple[Channel, Channel]]

#: For what needs AF_UNIX sockets and SCM_RIGHTS (UnixRights, raw AF_UNIX peers).
needs_unix_rights = pytest.mark.skipif(
    sys.platform == "win32", reason="UnixRights needs AF_UNIX sockets with SCM_RIGHTS, which Windows lacks"
)


def _unix_pair(**kwargs: object) -> tuple[Channel, Channel]:
    return Channel.pair(transport=UnixRights(), **kwargs)  # type: ignore[arg-type]


def _unix_acked_pair(**kwargs: object) -> tuple[Channel, Channel]:
    # A window of 4 fds, so the shared suite also runs the waits for
    # acknowledgements (the default is 64).
    return Channel.pair(transport=UnixRights(acknowledge=True, window=4), **kwargs)  # type: ignore[arg-type]


def _unix_plain_pair(**kwargs: object) -> tuple[Channel, Channel]:
    return Channel.pair(transport=UnixRights(acknowledge=False), **kwargs)  # type: ignore[arg-type]


#: pytest params for the `make_pair` fixture; other transports append here.
#: UnixRights runs in both modes: the platform's default, and the other one.
PAIR_FACTORIES = [
    pytest.param(_unix_pair, id="UnixRights", marks=needs_unix_rights),
    pytest.param(
        _unix_plain_pair if UnixRights().acknowledge else _unix_acked_pair,
        id="UnixRights-plain" if UnixRights().acknowledge else "UnixRights-acked",
        marks=needs_unix_rights,
    ),
]


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


def _channels_over(
    x: socket.socket, y: socket.socket, make: Callable[[], object], **kwargs: object
) -> tuple[Channel, Channel]:
    """Channels over the connected sockets *x* and *y*, each with a transport from *make*."""
    try:
        a = Channel(x, transport=make(), **kwargs)  # type: ignore[arg-type]
    except BaseException:
        x.close()
        y.close()
        raise
    try:
        return a, Channel(y, transport=make(), **kwargs)  # type: ignore[arg-type]
    except BaseException:
        a.close()
        y.close()
        raise


def _pidfd_tcp_pair(**kwargs: object) -> tuple[Channel, Channel]:
    return _channels_over(*tcp_socketpair(), PidfdGetfd, **kwargs)


PAIR_FACTORIES += [
    pytest.param(_pidfd_pair, id="PidfdGetfd-unix", marks=needs_pidfd),
    pytest.param(_pidfd_tcp_pair, id="PidfdGetfd-tcp", marks=needs_pidfd),
]


# -- WinDuplicate (Windows only): over socket.socketpair() and over TCP ---------


def _windup_pair(**kwargs: object) -> tuple[Channel, Channel]:
    # Windows' socketpair() is a loopback TCP pair made by the socket module.
    return Channel.pair(transport=WinDuplicate(), **kwargs)  # type: ignore[arg-type]


def _windup_tcp_pair(**kwargs: object) -> tuple[Channel, Channel]:
    return _channels_over(*tcp_socketpair(), WinDuplicate, **kwargs)


if sys.platform == "win32":
    PAIR_FACTORIES += [
        pytest.param(_windup_pair, id="WinDuplicate"),
        pytest.param(_windup_tcp_pair, id="WinDuplicate-tcp"),
    ]
