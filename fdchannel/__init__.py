"""fdchannel: pass open file descriptors between processes as owned objects.

A `Channel` sends messages, each a payload of bytes with any number of fds;
the receiver gets each message whole, with its fds as `OwnedFd` objects that
close themselves when nobody takes them.
"""

from __future__ import annotations

from . import fdpass, shm
from ._budget import Budget
from ._channel import DEFAULT_MAX_FDS, DEFAULT_MAX_PAYLOAD, Channel
from ._errors import (
    BufferTooShort,
    ChannelBroken,
    ChannelClosed,
    FdChannelError,
    FdsWithdrawn,
    LimitExceeded,
    ProtocolError,
    SharedMemoryRefused,
    TruncatedControlData,
    UnverifiedSender,
)
from ._listener import Listener
from ._message import Message
from ._nested import (
    ReceivedChannel,
    asend_channel,
    asend_new_channel,
    recv_channel,
    send_channel,
    send_new_channel,
)
from ._ownedfd import OwnedFd
from ._peer import PeerCredentials
from ._process import spawn

__all__ = [
    "DEFAULT_MAX_FDS",
    "DEFAULT_MAX_PAYLOAD",
    "Budget",
    "BufferTooShort",
    "Channel",
    "ChannelBroken",
    "ChannelClosed",
    "FdChannelError",
    "FdsWithdrawn",
    "LimitExceeded",
    "Listener",
    "Message",
    "OwnedFd",
    "PeerCredentials",
    "ProtocolError",
    "ReceivedChannel",
    "SharedMemoryRefused",
    "TruncatedControlData",
    "UnverifiedSender",
    "asend_channel",
    "asend_new_channel",
    "fdpass",
    "recv_channel",
    "send_channel",
    "send_new_channel",
    "shm",
    "spawn",
]

__version__ = "0.1.0"
