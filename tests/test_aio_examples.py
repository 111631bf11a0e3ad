"""The asyncio example runs as a script, for real, on both loops, and succeeds."""

# The loop fixtures are imported from tests/_aio.py; test parameters naming
# them are not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import pytest

from ._aio import loop_kind  # noqa: F401 - fixture
from .test_examples import run_example


def test_aio_dispatcher(loop_kind: str) -> None:
    if loop_kind == "selector":
        pytest.skip("examples/aio_dispatcher.py offers no selector loop (--loop asyncio or uvloop only)")
    # Bounded: 24 clients on 127.0.0.1, then the script shuts down by itself.
    out = run_example("aio_dispatcher.py", "--workers", "3", "--demo", "24", "--loop", loop_kind)
    assert "demo: 24 clients echoed by 3 workers" in out
    served = [int(line.split(": ")[1].split()[0]) for line in out.splitlines() if line.startswith("worker ")]
    assert sum(served) == 24
    assert len(served) == 3
