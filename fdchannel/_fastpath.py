"""Which implementation of the hot paths a new `Channel` uses: compiled or pure Python.

The compiled module `fdchannel._speedups` is built by the package's own
setuptools build where a C compiler and the Python headers are present
(Linux only); everywhere else, and when the environment variable
``FDCHANNEL_PURE`` is set to anything but ``""`` or ``"0"`` at import, every
channel takes the pure-Python path.  Both paths behave the same; the
compiled one is faster.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["PURE_ENV", "compiled_available", "enabled", "forced", "why_pure"]

#: The environment variable that forces the pure-Python path.
PURE_ENV = "FDCHANNEL_PURE"


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return None, f"{PURE_ENV} is set"
    if sys.platform != "linux":
        return None, "the compiled path is built for Linux only"
    try:
        from . import _speedups  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:
        return None, f"fdchannel._speedups was not built ({exc})"
    module: ModuleType = _speedups
    return module, ""


_speedups, _why = _load()
_enabled = _speedups is not None


def compiled_available() -> bool:
    """True when the compiled module was built and may be used in this process."""
    return _speedups is not None


def enabled() -> bool:
    """True while new channels take the compiled path."""
    return _enabled


def why_pure() -> str:
    """Why the compiled path is not available (empty when it is)."""
    return _why


@contextmanager
def forced(compiled: bool) -> Iterator[None]:
    """In the block, new channels take the compiled path if *compiled* (and it is built), else the pure one.

    For the benchmark and the tests: they compare both paths in one process.
    """
    global _enabled
    saved = _enabled
    _enabled = compiled and _speedups is not None
    try:
        yield
    finally:
        _enabled = saved
