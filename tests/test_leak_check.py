"""The fd-leak check of conftest.py sees what it must, on this platform.

Each test opens something, asks the detector (not the fixture: no test here
leaks) whether it is new, closes it, and asks again.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

from .conftest import new_fds, open_fds


def test_a_pipe_left_open_is_seen() -> None:
    before = open_fds()
    r, w = os.pipe()
    try:
        leaked = new_fds(before)
    finally:
        os.close(r)
        os.close(w)
    if sys.platform == "win32":
        assert {f"fd {r}", f"fd {w}"} <= set(leaked), leaked
    else:
        assert {r, w} <= set(leaked), leaked
    assert new_fds(before) == {}


@pytest.mark.parametrize(
    "make", [socket.socketpair, lambda: (socket.socket(), socket.socket())], ids=["pair", "fresh"]
)
def test_a_socket_left_open_is_seen(make: object) -> None:
    before = open_fds()
    a, b = make()  # type: ignore[operator]
    with a, b:
        leaked = new_fds(before)
        numbers = {a.fileno(), b.fileno()}
    # On Windows a SOCKET is no CRT fd: it is listed by its handle value.
    expected = {f"SOCKET {n}" for n in numbers} if sys.platform == "win32" else numbers
    assert expected <= set(leaked), leaked
    assert new_fds(before) == {}


def test_a_reused_number_pointing_elsewhere_is_seen() -> None:
    if sys.platform == "win32":
        pytest.skip("Windows lists CRT fds by number and kind only (pytest's capture dup2()s onto 1 and 2)")
    r, w = os.pipe()
    os.close(w)
    before = open_fds()
    try:
        with open(os.devnull, "rb") as f:  # likely takes w's number; whatever it takes is new
            assert f.fileno() in new_fds(before)
    finally:
        os.close(r)


@pytest.mark.skipif(sys.platform != "win32", reason="the SOCKET scan exists on Windows only")
def test_sockets_with_high_handle_values_are_found() -> None:
    from .conftest import SOCKET_SCAN_MIN, open_sockets

    # Enough handles (each CRT fd holds one) to push new SOCKETs past the minimum scan.
    pipes = [os.pipe() for _ in range(SOCKET_SCAN_MIN // 4 // 2 + 64)]
    try:
        a, b = socket.socketpair()
        with a, b:
            assert max(a.fileno(), b.fileno()) >= SOCKET_SCAN_MIN
            assert {a.fileno(), b.fileno()} <= set(open_sockets())
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
