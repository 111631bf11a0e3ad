"""A headless Chromium driven over the DevTools protocol, through a pipe.

``--remote-debugging-pipe`` makes Chromium read protocol messages from its
fd 3 and write its answers to its fd 4, each a JSON text ended by a NUL
byte: no port, no websocket library, nothing else to install.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

if sys.platform != "win32":  # the docs site test runs on Linux; Windows only imports this
    import fcntl

#: Where Debian's ``chromium`` package installs the browser.
CHROMIUM = "/usr/bin/chromium"

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


class BrowserError(RuntimeError):
    """The browser answered a command with an error, or not in time."""


class Browser:
    """One Chromium process with one page (tab), commands sent one at a time."""

    def __init__(self, executable: str, deadline: float) -> None:
        self._deadline = deadline
        self._profile = tempfile.mkdtemp(prefix="fdchannel-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        try:
            # Chromium wants the pipes as its fds 3 and 4, which Popen cannot
            # renumber: a Python trampoline moves them there, then becomes the
            # browser.  Above 4 first, so neither dup2 overwrites the other.
            theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (to_browser_r, from_browser_w)]
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        argv = [executable, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"]
        trampoline = (
            f"import os; os.dup2({theirs[0]}, 3); os.dup2({theirs[1]}, 4); os.execv({executable!r}, {argv!r})"
        )
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", trampoline],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=theirs,
            )
        except BaseException:
            os.close(self._to_browser)
            os.close(self._from_browser)
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._session = ""
        try:
            target = self.command("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    # -- the protocol ----------------------------------------------------------

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = self._deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError("the browser did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError(f"the browser exited (status {self._proc.poll()})")
            self._buffer += chunk
        text, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(text)
        return message

    def command(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page once attached) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data) :]
        while True:
            answer = self._read_message()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result
            if "method" in answer:
                self._events.append(answer)

    def wait_event(self, method: str) -> dict[str, Any]:
        """Wait for the page's next *method* event (events seen earlier count)."""
        while True:
            for i, event in enumerate(self._events):
                if event["method"] == method and event.get("sessionId") == self._session:
                    del self._events[: i + 1]
                    return event
            self._events.clear()
            answer = self._read_message()
            if "method" in answer:
                self._events.append(answer)

    # -- what the tests use ----------------------------------------------------

    def open(self, url: str, width: int, height: int) -> None:
        """Load *url* in a viewport *width* x *height* CSS px and wait for its load event."""
        self.command("Page.enable")
        self.command(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self._events.clear()
        self.command("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of *expression* in the page (awaited if it is a promise)."""
        result = self.command(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"the page's script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        """Stop the browser and remove its profile."""
        try:
            if self._proc.poll() is None:
                self._session = ""
                try:
                    self._next_id += 1
                    os.write(
                        self._to_browser,
                        json.dumps({"id": self._next_id, "method": "Browser.close"}).encode() + b"\0",
                    )
                    self._proc.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    self._proc.kill()
                    self._proc.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
