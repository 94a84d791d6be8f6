"""Headless Chromium driven over the DevTools protocol through a pipe: no port, no network, no extra package.

Chromium reads commands from fd 3 and writes answers and events to fd 4
(`--remote-debugging-pipe`), each a JSON message ended by a NUL byte. `Browser.open`
loads a URL in a fresh tab and returns a `Page` that records console messages,
uncaught exceptions, log errors and JavaScript dialogs (an `alert()` that ran).
Every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser")
WAIT_S = 30.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
    "--remote-debugging-pipe",
    "--window-size=1280,900",
)


def find_chromium() -> str:
    """The Chromium executable; AssertionError (a failed test, never a skip) when it is not installed."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("chromium is not installed: `apt-get install chromium` (.ci/run installs it)")


@dataclass
class Page:
    """One tab: what it logged, and commands to evaluate script and take screenshots."""

    browser: Browser
    session: str
    frame_id: str
    console: list[dict[str, Any]] = field(default_factory=list)
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    log_errors: list[dict[str, Any]] = field(default_factory=list)
    dialogs: list[dict[str, Any]] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)  # sessions of out-of-process iframes (sandboxed ones)

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries, as text."""
        found = [json.dumps(entry.get("args", [])) for entry in self.console if entry.get("type") == "error"]
        found += [entry.get("exceptionDetails", {}).get("text", "exception") for entry in self.exceptions]
        found += [entry.get("entry", {}).get("text", "log error") for entry in self.log_errors]
        return found

    def evaluate(self, expression: str, *, context_id: int | None = None) -> Any:
        """The value of a JavaScript expression in the page (or in an execution context)."""
        params: dict[str, Any] = {"expression": expression, "returnByValue": True}
        if context_id is not None:
            params["contextId"] = context_id
        result = self.browser.call("Runtime.evaluate", params, session=self.session)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def evaluate_in_child_frame(self, expression: str) -> Any:
        """Evaluate in the page's first iframe, in a world of its own (its scripts may be disabled)."""
        session = self.frames[0] if self.frames else self.session
        tree = self.browser.call("Page.getFrameTree", session=session)["frameTree"]
        frame = tree if self.frames else (tree.get("childFrames") or [None])[0]
        assert frame is not None, "the page has no iframe"
        world = self.browser.call(
            "Page.createIsolatedWorld",
            {"frameId": frame["frame"]["id"], "worldName": "probe"},
            session=session,
        )
        params = {"expression": expression, "returnByValue": True, "contextId": world["executionContextId"]}
        result = self.browser.call("Runtime.evaluate", params, session=session)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw in the iframe: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> bytes:
        """A PNG of the viewport, written to `path`."""
        data = base64.b64decode(
            self.browser.call("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        )
        path.write_bytes(data)
        return data

    def settle(self) -> None:
        """Take in the events the page produced so far (a round trip through the browser)."""
        self.evaluate("1")


class Browser:
    """A headless Chromium process and its DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        command = [find_chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        # The pipe must be fds 3 and 4 in the browser: bash (dash cannot name fds above 9) puts
        # them there, then becomes Chromium.
        script = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}'
        self.log = profile.parent / "chromium.log"  # Chromium's own messages, for a failing test
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                ["/bin/bash", "-c", script, *command],
                pass_fds=(to_browser_read, from_browser_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._pages: dict[str, Page] = {}

    def close(self) -> None:
        """Ask Chromium to quit, and make sure it did."""
        with contextlib.suppress(AssertionError, OSError):  # it may quit before it answers
            self.call("Browser.close")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)

    def open(self, url: str) -> Page:
        """A new tab showing `url`, loaded, with console and dialog events recorded from the start."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, frame_id=target)
        self._pages[session] = page
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=session)
        # Sandboxed iframes run in their own process: attach to them too, to see what they log.
        auto = {"autoAttach": True, "waitForDebuggerOnStart": False, "flatten": True}
        self.call("Target.setAutoAttach", auto, session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        self._wait_for(lambda message: message.get("method") == "Page.loadEventFired", session)
        page.settle()
        return page

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> Any:
        """Send one command and return its result (events that arrive meanwhile are recorded)."""
        self._next_id += 1
        number = self._next_id
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        answer = self._wait_for(lambda reply: reply.get("id") == number, session)
        if "error" in answer:
            raise AssertionError(f"{method} failed: {answer['error']}")
        return answer.get("result", {})

    def _wait_for(self, wanted: Any, session: str | None) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while True:
            for message in self._messages(deadline):
                self._record(message)
                if wanted(message) and message.get("sessionId") == session:
                    return message

    def _messages(self, deadline: float) -> Iterator[dict[str, Any]]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self._process.poll() is not None:
                raise AssertionError("chromium did not answer in time (or exited)")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise AssertionError("chromium closed its DevTools pipe")
                self._buffer += chunk
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            yield json.loads(raw)

    def _record(self, message: dict[str, Any]) -> None:
        page = self._pages.get(message.get("sessionId", ""))
        method = message.get("method")
        if page is None or method is None:
            return
        params = message.get("params", {})
        if method == "Target.attachedToTarget":
            child = params["sessionId"]
            self._pages[child] = page
            page.frames.append(child)
            for domain in ("Page", "Runtime", "Log"):
                self._send_blind(f"{domain}.enable", {}, child)
        elif method == "Runtime.consoleAPICalled":
            page.console.append(params)
        elif method == "Runtime.exceptionThrown":
            page.exceptions.append(params)
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            page.log_errors.append(params)
        elif method == "Page.javascriptDialogOpening":
            page.dialogs.append(params)
            # Dismiss it, or the page would hang; the test fails on the record.
            self._send_blind("Page.handleJavaScriptDialog", {"accept": False}, message["sessionId"])

    def _send_blind(self, method: str, params: dict[str, Any], session: str) -> None:
        """A command whose answer nobody waits for (sent while reading other messages)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params, "sessionId": session}
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")


@contextmanager
def open_browser(profile: Path) -> Iterator[Browser]:
    """A headless Chromium for the duration of the block."""
    browser = Browser(profile)
    try:
        yield browser
    finally:
        browser.close()
