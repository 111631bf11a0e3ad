"""The complete examples in the README and the quickstart run as shown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.mark.parametrize(
    ("doc", "index", "expected"),
    [
        ("README.md", 0, "b'write here'"),
        ("docs/index.md", 0, "b'hello'"),
        pytest.param(
            "docs/shared-memory.md",
            0,
            "size=67108864>",
            marks=pytest.mark.skipif(sys.platform != "linux", reason="sealed memfds exist on Linux only"),
        ),
        pytest.param(
            "docs/channels-in-messages.md",
            0,
            "b'a channel for you' b'direct'",
            marks=pytest.mark.skipif(sys.platform == "win32", reason="channel ends move as AF_UNIX sockets"),
        ),
        pytest.param(
            "docs/quickstart.md",
            0,
            "b'hello'",
            marks=pytest.mark.skipif(
                sys.platform == "win32", reason="the example forks: Windows has no os.fork()"
            ),
        ),
    ],
)
def test_example_runs(doc: str, index: int, expected: str) -> None:
    code = python_blocks(ROOT / doc)[index]
    out = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(expected)
    assert "Warning" not in out.stderr


DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS)
def test_code_fences_pair_up(doc: str) -> None:
    # A stray fence turns the prose after it into code (and code into prose).
    opening = True
    for number, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            if opening:
                assert line.strip() != "```", f"{doc}:{number}: a fence opens with no language"
            opening = not opening
    assert opening, f"{doc}: a code fence is never closed"
