"""`python -m fdchannel demo` runs as the README promises, its story in causal order."""

from __future__ import annotations

import re
import subprocess
import sys

#: The transcript's lines, in the order the events happen: each one's cause
#: comes before it (the child cannot read before the parent sent, the parent
#: cannot read the pipe before the child wrote into it, ...).
STORY = [
    ("parent", "sending 3 fds"),
    ("child", "received 3 fds"),
    ("child", "read from the file: 'a line written by the parent before the fd left'"),
    ("child", "wrote into the pipe"),
    ("child", "listening socket: family=AF_INET type=SOCK_STREAM"),
    ("parent", "read from the pipe: 'hello through the pipe, from the child'"),
    ("child", "accepted a connection from 127.0.0.1, got 'hello over TCP'"),
    ("parent", "the child answered 'HELLO OVER TCP'"),
    ("parent", "child reports: file read, pipe written, one TCP connection served"),
    ("parent", "child exited with status 0"),
]


def run_demo() -> list[tuple[str, int, str]]:
    out = subprocess.run(
        [sys.executable, "-m", "fdchannel", "demo"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    lines = []
    for line in out.splitlines():
        match = re.fullmatch(r"\[(parent|child) (\d+)\] (.*)", line)
        assert match, f"not a transcript line: {line!r}"
        lines.append((match[1], int(match[2]), match[3]))
    return lines


def test_demo_tells_its_story_in_causal_order() -> None:
    # Before the story was ordered, the parent's pipe line came first in most
    # runs: three runs in a row all in order are no accident.
    for _ in range(3):
        lines = run_demo()
        assert len(lines) == len(STORY), lines
        for (who, _pid, text), (expected_who, expected_text) in zip(lines, STORY, strict=True):
            assert who == expected_who, f"expected the {expected_who}'s {expected_text!r}, got {lines}"
            assert expected_text in text, f"expected {expected_text!r}, got {lines}"
        parents = {pid for who, pid, _ in lines if who == "parent"}
        children = {pid for who, pid, _ in lines if who == "child"}
        assert len(parents) == len(children) == 1
        assert parents != children


def test_fd_numbers_differ_between_the_processes() -> None:
    lines = run_demo()
    sent = next(text for who, _, text in lines if text.startswith("sending 3 fds"))
    parent_fds = [int(n) for n in re.findall(r"\(fd (\d+)\)", sent)]
    received = next(text for _, _, text in lines if text.startswith("received 3 fds"))
    match = re.search(
        r"here they are fds \[(\d+), (\d+), (\d+)\], in the parent fds \[(\d+), (\d+), (\d+)\]", received
    )
    assert match, received
    child_fds, told_fds = [int(n) for n in match.groups()[:3]], [int(n) for n in match.groups()[3:]]
    assert told_fds == parent_fds
    # The same open files (the child compared device and inode) ...
    assert "the same open files" in received
    # ... under other numbers: an fd number means something in one process only.
    assert all(mine != theirs for mine, theirs in zip(child_fds, parent_fds, strict=True)), received


def test_usage() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fdchannel"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert "usage" in proc.stderr
