"""A broker introduces two clients, then gets out of the way.

The broker starts two client processes with `fdchannel.spawn` (each gets a
channel to the broker), makes a new channel pair and hands one end to each
client with `fdchannel.send_channel`.  It then closes its channels to the
clients and plays no further part: the clients talk directly over the
channel they were given.  "alice" sends "bob" a pipe's write end over it and
bob writes his answer into the pipe; alice prints what she read.

Run it: ``python examples/broker.py``.  It prints each step and exits 0 when
both clients finished their conversation after the broker let go.
"""

from __future__ import annotations

import os
import sys

import fdchannel

TIMEOUT = 30.0


def say(line: str) -> None:
    """One line in one write: three processes share stdout.

    print() may write the text and its newline apart, and the lines of two
    processes then run together.
    """
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def client(name: str) -> int:
    with fdchannel.Channel.from_environ() as broker:
        broker.settimeout(TIMEOUT)
        with broker.recv() as msg:
            introduced = fdchannel.recv_channel(msg)
        other = introduced.payload.decode()
        # From here on the broker is not needed: wait until it has gone.
        try:
            broker.recv()
        except fdchannel.ChannelClosed:
            say(
                f"{name}: the broker closed its channel; "
                f"talking to {other} directly"
            )
    with introduced.channel as peer:
        peer.settimeout(TIMEOUT)
        if name == "alice":
            r, w = os.pipe()
            with open(r, "rb") as answers:
                peer.send(b"write your answer into this pipe", [w])
                os.close(w)
                answer = answers.read().decode()
            say(f"alice: read from the pipe bob got from her: {answer!r}")
            return 0 if answer == "hello alice, from bob" else 1
        with peer.recv() as request:
            say(f"bob: alice says {request.payload.decode()!r}")
            with request.fds[0].open("wb") as pipe:
                pipe.write(b"hello alice, from bob")
        return 0


def broker() -> int:
    here = os.path.abspath(__file__)
    procs = []
    channels = []
    try:
        for name in ("alice", "bob"):
            argv = [sys.executable, here, "--client", name]
            proc, channel = fdchannel.spawn(argv)
            channel.settimeout(TIMEOUT)
            procs.append(proc)
            channels.append(channel)
        to_alice, to_bob = channels
        # Each client gets one end of a new pair; the broker keeps neither.
        alice_end, bob_end = fdchannel.Channel.pair()
        fdchannel.send_channel(to_alice, alice_end, b"bob")
        fdchannel.send_channel(to_bob, bob_end, b"alice")
        gone = alice_end.closed and bob_end.closed
        say(f"broker: introduced alice and bob (its own ends closed: {gone})")
    finally:
        for channel in channels:
            channel.close()
    say("broker: closed its channels to both clients")
    codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
    say(f"broker: clients exited with {codes}")
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        sys.exit(client(sys.argv[2]))
    sys.exit(broker())
