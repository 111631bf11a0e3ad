"""On Windows the upgrade and systemd modules import, and refuse with a clear error."""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "win32", reason="Windows only: POSIX systems have socket activation and upgrades"
)


def test_listen_fds_refuses() -> None:
    from fdchannel.systemd import listen_fds

    with pytest.raises(OSError, match="POSIX"):
        listen_fds()


def test_notify_without_a_manager_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from fdchannel import systemd

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False


def test_notify_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    from fdchannel import systemd

    monkeypatch.setenv("NOTIFY_SOCKET", "/run/notify")
    with pytest.raises(OSError, match="AF_UNIX"):
        systemd.ready()


def test_upgrader_refuses() -> None:
    from fdchannel.upgrade import Upgrader

    with pytest.raises(OSError, match="POSIX"):
        Upgrader()
