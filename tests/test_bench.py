"""`python -m fdchannel bench` runs end to end (tiny counts; no timing is checked here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the benchmark needs AF_UNIX and fork")


def test_bench_runs_every_workload_and_prints_the_tables() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fdchannel", "bench", "--rounds", "2", "--scale", "0.005", "--no-chart"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    titles = ("one process send+recv+close", "two processes streaming", "fds per message", "messages at once")
    for title in titles:
        assert title in out.stdout
    assert "64 MiB payload" in out.stdout
    assert "| fdchannel-pure |" in out.stdout
    assert "vs stdlib" in out.stdout
    # The floor of any Python API (built on the fly): measured, or said why not.
    assert "vs python-floor" in out.stdout
    assert "| python-floor |" in out.stdout or "python-floor: skipped" in out.stdout
    # Progress goes to stderr while it runs.
    assert "round 2/2" in out.stderr


def test_bench_chart_or_a_clear_message(tmp_path: os.PathLike[str]) -> None:
    chart = os.path.join(tmp_path, "bench.svg")
    argv = ["--rounds", "1", "--scale", "0.005", "--only", "local1", "--chart", chart]
    out = subprocess.run(
        [sys.executable, "-m", "fdchannel", "bench", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no chart: matplotlib is not installed" in out.stdout
    else:
        assert f"chart written to {chart}" in out.stdout
        with open(chart) as f:
            assert "<svg" in f.read()


def test_bench_refuses_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fdchannel", "bench", "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "--rounds must be at least 1" in out.stderr
