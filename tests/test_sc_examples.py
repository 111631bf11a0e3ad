"""The trio and anyio examples run as scripts, for real, and succeed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ._structured import missing
from .test_docs_examples import ROOT, python_blocks
from .test_examples import run_example

needs_af_unix = pytest.mark.skipif(
    sys.platform == "win32", reason="the broker serves an AF_UNIX socket, which Python on Windows lacks"
)


@needs_af_unix
@pytest.mark.skipif(missing("trio") is not None, reason=missing("trio") or "")
def test_trio_file_broker() -> None:
    out = run_example("trio_file_broker.py", "--clients", "4")
    assert "demo: 4/4 clients read their file through the broker, 2 refused" in out
    assert "error: only plain names in the shared directory" in out


@pytest.mark.parametrize("kind", ["anyio-asyncio", "anyio-trio"])
def test_anyio_pipe_workers(kind: str) -> None:
    reason = missing(kind)
    if reason is not None:
        pytest.skip(reason)
    backend = kind.partition("-")[2]
    out = run_example("anyio_pipe_workers.py", "--workers", "3", "--jobs", "12", "--backend", backend)
    assert f"demo: 12/12 jobs answered by 3 workers on anyio's {backend} backend" in out
    assert "cancelled send: characters_written=0 (not taken)" in out


@pytest.mark.parametrize(("index", "kind"), [(0, "trio"), (1, "anyio-asyncio")])
def test_the_docs_page_examples_run_as_shown(index: int, kind: str) -> None:
    reason = missing(kind)
    if reason is not None:
        pytest.skip(reason)
    code = python_blocks(ROOT / "docs" / "structured-concurrency.md")[index]
    out = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "b'hello'"
    assert "Warning" not in out.stderr
