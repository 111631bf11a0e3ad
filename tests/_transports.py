"""The transports the shared channel tests run against.

Each entry builds a connected pair of channels; a transport the machine
cannot run is skipped with the reason, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fdchannel import Channel
from fdchannel.transports import UnixRights

PairFactory = Callable[..., tuple[Channel, Channel]]


def _unix_pair(**kwargs: object) -> tuple[Channel, Channel]:
    return Channel.pair(transport=UnixRights(), **kwargs)  # type: ignore[arg-type]


#: pytest params for the `make_pair` fixture; other transports append here.
PAIR_FACTORIES = [pytest.param(_unix_pair, id="UnixRights")]
