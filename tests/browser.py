"""A headless Debian Chromium driven over the Chrome DevTools Protocol, for report tests.

No Playwright: one subprocess, one websocket (the `websockets` package Prefect already needs).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0")


class BrowserUnavailable(RuntimeError):
    """Chromium is not installed or did not start; tests skip with this message."""


def find_chromium() -> str:
    """Path of the chromium binary, or BrowserUnavailable naming what was looked for."""
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise BrowserUnavailable(f"no chromium binary found (looked for {', '.join(CHROMIUM_CANDIDATES)}); "
                             "run tests/install_chromium.sh")


class CDPSession:
    """Request/response over one page websocket; events are buffered in `events`."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        # proxy=None: the debugging port is local, never go through an HTTP(S)_PROXY.
        self.ws = connect(ws_url, proxy=None, max_size=None, open_timeout=10, compression=None)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 15) -> dict[str, Any]:
        """Call a CDP method and return its result; a protocol error raises RuntimeError."""
        self._next_id += 1
        call_id = self._next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_event(self, method: str, timeout: float = 15) -> dict[str, Any]:
        """Return the first buffered or incoming event named `method`."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method:
                    return event
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, await_promise: bool = False, timeout: float = 15) -> Any:
        """Evaluate JS in the page and return its JSON value; a thrown exception raises."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": await_promise}, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        errors = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return errors

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """Save a PNG of the page (the whole scrollable page when `full_page`)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", params, timeout=30)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.ws.close()


class Chromium:
    """A headless Chromium process with a throwaway profile; use as a context manager."""

    def __init__(self, width: int = 1400, height: int = 1000, start_timeout: float = 20) -> None:
        self.binary = find_chromium()
        self.width, self.height, self.start_timeout = width, height, start_timeout
        self.profile = Path(tempfile.mkdtemp(prefix="lora-sweep-chromium-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.page: CDPSession | None = None

    def __enter__(self) -> CDPSession:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def start(self) -> CDPSession:
        """Launch Chromium and attach to its page; BrowserUnavailable when it cannot start."""
        log = open(self.profile / "chromium.log", "wb")  # a file, so a chatty stderr never blocks
        self.process = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        try:
            self.page = CDPSession(self._page_ws_url(self._port()))
            for domain in ("Runtime", "Log", "Page"):
                self.page.send(f"{domain}.enable")
        except BaseException:
            self.stop()
            raise
        return self.page

    def _port(self) -> int:
        """The debugging port Chromium picked, read from DevToolsActivePort in the profile."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrowserUnavailable(f"chromium exited with {self.process.returncode}: {self._log_tail()}")
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.05)
        raise BrowserUnavailable(f"chromium gave no debugging port in {self.start_timeout}s: {self._log_tail()}")

    def _page_ws_url(self, port: int) -> str:
        """The websocket of the first page target."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                pages = [t for t in json.load(response) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise BrowserUnavailable("chromium opened no page target")

    def _log_tail(self) -> str:
        path = self.profile / "chromium.log"
        return path.read_text(errors="replace")[-1500:] if path.is_file() else "(no log)"

    def stop(self) -> None:
        """Close the websocket, end the browser process and delete the profile."""
        if self.page is not None:
            try:
                self.page.close()
            except Exception:  # the browser may already be gone; cleanup must go on
                pass
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.profile, ignore_errors=True)


def open_file(page: CDPSession, path: Path, timeout: float = 15) -> None:
    """Navigate to a local file and wait for its load event and every image to settle."""
    page.events = [e for e in page.events if e["method"] != "Page.loadEventFired"]
    page.send("Page.navigate", {"url": path.resolve().as_uri()})
    page.wait_event("Page.loadEventFired", timeout)
    broken_images(page)


def broken_images(page: CDPSession) -> list[str]:
    """Wait until every <img> has loaded or failed; return the src of each that shows nothing."""
    return page.evaluate(
        "Promise.all(Array.from(document.images).map(i => i.complete ? 0 :"
        " new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })))"
        ".then(() => Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.src))",
        await_promise=True)


def screenshot_dirs(tmp_path: Path) -> list[Path]:
    """tmp_path, plus $LORA_SWEEP_SCREENSHOT_DIR when set."""
    extra = os.environ.get("LORA_SWEEP_SCREENSHOT_DIR")
    return [tmp_path] + ([Path(extra)] if extra else [])


def wait_for(page: CDPSession, condition: str, timeout: float = 30) -> bool:
    """Poll a JS boolean expression in the page until it is true; False when `timeout` s pass first."""
    return bool(page.evaluate(
        f"new Promise(done => {{ const end = Date.now() + {int(timeout * 1000)}; const poll = () => "
        f"{{ let ok = false; try {{ ok = !!({condition}); }} catch (e) {{}} "
        f"if (ok || Date.now() > end) {{ done(ok); }} else {{ setTimeout(poll, 20); }} }}; poll(); }})",
        await_promise=True, timeout=timeout + 5))


GRID_READY = "document.getElementById('grids') && document.getElementById('grids').dataset.state === 'ready'"


def wait_grid(page: CDPSession, timeout: float = 30) -> None:
    """Wait until the report's image grid has read its data files and drawn, and its images have settled."""
    assert wait_for(page, GRID_READY, timeout), "the report's grid did not become ready"
    broken_images(page)


def page_session(width: int = 1400, height: int = 1000):
    """A headless Chromium page for a pytest fixture (`yield from page_session()`); skips, printing why,
    when Chromium is missing or cannot start."""
    import pytest

    try:
        browser = Chromium(width=width, height=height)
        session = browser.start()
    except BrowserUnavailable as error:
        print(f"browser test skipped: {error}")
        pytest.skip(str(error))
    try:
        yield session
    finally:
        browser.stop()
