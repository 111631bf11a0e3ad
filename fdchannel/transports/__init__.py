"""Transports: how fds leave one process and enter another.

`UnixRights` (SCM_RIGHTS, the POSIX default) is the only one so far.
"""

from __future__ import annotations

from ._base import Outgoing, Session, Transport
from ._unix import UnixRights

__all__ = ["Outgoing", "Session", "Transport", "UnixRights", "default_transport"]


def default_transport() -> Transport:
    """Return the platform's default transport: `UnixRights` on POSIX."""
    return UnixRights()
