"""Telling a system call's own error from one a signal handler raised in the middle of a call.

CPython runs a Python-level signal handler in the main thread at the next
safe point of the bytecode: inside a system call that the signal
interrupted (``EINTR``), or right after a call that had already done its
work and returned.  An ``OSError`` the handler raises (``TimeoutError``
from a ``SIGALRM`` handler is a common timeout idiom) then surfaces inside
the channel's ``try`` exactly where the kernel's own ``OSError`` would, and
treating it as the kernel's (nothing sent, nothing read) would duplicate or
lose a message.  The traceback says which it is: a handler's error passes
through the handler's frame.
"""

from __future__ import annotations

from types import FrameType

__all__ = ["raised_in_signal_handler"]


def _in_package(frame: FrameType) -> bool:
    name: str = frame.f_globals.get("__name__", "")
    return name == "fdchannel" or name.startswith("fdchannel.")


def _called_as_handler(frame: FrameType, interrupted: FrameType) -> bool:
    """True if *frame* was called with *interrupted* as an argument: how CPython calls a signal handler.

    ``handler(signum, frame)`` gets the frame that was running when the
    handler was due; no other caller passes the frame it runs in.
    """
    code = frame.f_code
    nargs = code.co_argcount + code.co_kwonlyargcount
    if nargs < 2:
        return False
    local = frame.f_locals
    return any(local.get(name) is interrupted for name in code.co_varnames[:nargs])


def raised_in_signal_handler(exc: BaseException) -> bool:
    """True if *exc* came out of a Python signal handler that ran in the middle of this package's code.

    The traceback is walked from the frame that caught *exc* to where it was
    raised, looking for a frame outside the package that was called with
    the frame above it as an argument (``handler(signum, frame)``).  Frames
    of the package are skipped at the cost of a dict look-up, so the common
    case (an error raised by a system call, or by the package's own code)
    stays cheap.  A handler that rebinds its ``frame`` parameter before
    raising is not recognised.
    """
    tb = exc.__traceback__
    above: FrameType | None = None
    while tb is not None:
        frame = tb.tb_frame
        if above is not None and not _in_package(frame) and _called_as_handler(frame, above):
            return True
        above = frame
        tb = tb.tb_next
    return False
