"""Small fd helpers shared by the channel and the transports."""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["close_all"]


def close_all(fds: Iterable[int]) -> None:
    """Close every fd in *fds*, ignoring ones already gone (EBADF)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
