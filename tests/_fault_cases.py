"""What `test_out_of_memory` and `test_interrupt_points` share: the cases, and a run of `_faults.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fdchannel import _fastpath

HELPER = Path(__file__).with_name("_faults.py")

PATHS = [
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(
            not _fastpath.compiled_available(), reason=f"not built here: {_fastpath.why_pure()}"
        ),
    ),
    "pure",
]
SCENARIOS = [
    "recv",
    "recv_group",
    "recv_big",
    "recv_into",
    "recv_shm",
    "recv_refused",
    "send",
    "send_many",
    "send_buffer",
    "send_many_buffer",
    "send_shm",
    "aio_recv",
    "aio_send",
    "aio_send_buffer",
    "fds",
    "close",
    "close_one",
    "close_many",
    "open",
    "send_channel",
    "send_channel_aio",
    "channel_close",
]
#: The trio and anyio channels' calls (signals modes only: an allocation that
#: fails inside those libraries' own code is theirs to survive).
STRUCTURED = ["trio_recv", "trio_send", "anyio_recv", "anyio_send"]


def sweep(
    path: str, scenario: str, count: int, width: int, mode: str, pure_only: bool = False
) -> dict[str, Any]:
    """`_faults.py` run in a child for *count* values of k: its result, checked as every case needs.

    *pure_only*: the child runs with ``FDCHANNEL_PURE=1``, so no class has a
    compiled method (`Message.close` is then Python too, as off Linux).
    """
    env = {**os.environ, "FDCHANNEL_PURE": "1"} if pure_only else None
    out = subprocess.run(
        [sys.executable, str(HELPER), path, scenario, str(count), str(width), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    assert result["broken"] == []
    assert result["failed"] + result["succeeded"] == count
    assert result["last_failed"] < count - 30  # every point of the call reached
    if scenario.startswith("close") and not pure_only and _fastpath.compiled_available():
        assert result["failed"] == 0  # the compiled close allocates nothing and runs no handler point
    else:
        assert result["failed"] > 0  # the injection reached the call
    return result
