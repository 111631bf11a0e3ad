"""Transports: how fds leave one process and enter another.

In-band: `UnixRights` (SCM_RIGHTS on AF_UNIX sockets, the POSIX default).
Duplication, over any stream socket: `PidfdGetfd` (Linux >= 5.6) and
`WinDuplicate` (Windows).  `Transport` is the interface a third party
implements; docs/transports.md describes it and both protocols.
"""

from __future__ import annotations

import sys

from ._base import Outgoing, Session, Transport
from ._pidfd import PidfdGetfd
from ._unix import UnixRights
from ._windows import WinDuplicate

__all__ = [
    "Outgoing",
    "PidfdGetfd",
    "Session",
    "Transport",
    "UnixRights",
    "WinDuplicate",
    "default_transport",
]


def default_transport() -> Transport:
    """Return the platform's default transport.

    Returns:
        `WinDuplicate` on Windows (which has no SCM_RIGHTS), `UnixRights`
            everywhere else.
    """
    if sys.platform == "win32":
        return WinDuplicate()
    return UnixRights()
