"""A first end-to-end check: one message with fds between two processes."""

from __future__ import annotations

import os

from fdchannel import Channel

from ._proc import run_child


def test_pipe_crosses_fork() -> None:
    parent, child = Channel.pair()
    r, w = os.pipe()

    def body() -> None:
        parent.close()
        child.settimeout(10)
        with child.recv() as msg:
            assert msg.payload == b"here"
            os.write(msg.fds[0].fileno(), b"from child")

    try:
        parent.send(b"here", fds=[w])
        os.close(w)
        run_child(body)
        assert os.read(r, 100) == b"from child"
    finally:
        os.close(r)
        parent.close()
        child.close()
