"""Headless Chromium driven over the DevTools protocol, for tests that open a page for real.

Only loopback: Chromium listens on 127.0.0.1 on a port it picks, we talk to it with the
`websockets` client, and every networking feature Chromium has on its own is turned off.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    """What happened while a page loaded: console errors and uncaught exceptions."""

    errors: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


class Page:
    """One tab: send DevTools commands, collect console output."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self.load = PageLoad()
        self._loaded = False

    def _note(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.load.messages.append(f"{params['type']}: {text}")
            if params["type"] in ("error", "assert"):
                self.load.errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.load.errors.append(f"exception: {details.get('text')} {details.get('exception')}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            self.load.messages.append(f"{entry['level']}: {entry['text']}")
            if entry["level"] == "error":
                self.load.errors.append(f"log: {entry['text']} {entry.get('url', '')}")
        elif method == "Page.loadEventFired":
            self._loaded = True

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._note(message)

    def wait_for_load(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._loaded:
            self._note(json.loads(self._socket.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def drain(self, seconds: float = 0.5) -> None:
        """Collect the events that arrive within `seconds` (late console messages)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._note(json.loads(self._socket.recv(timeout=left)))
            except TimeoutError:
                return

    def open(self, url: str, *, width: int = 1200, height: int = 900) -> None:
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self._loaded = False
        self.send("Page.navigate", url=url)
        self.wait_for_load()
        self.drain()

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, *, max_height: int | None = None) -> Path:
        """A PNG of the page (the whole page, or its top `max_height` pixels)."""
        width, height = self.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        if max_height is not None:
            height = min(height, max_height)
        shot = self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextmanager
def chromium_page(executable: str, profile: Path, *, timeout: float = 30.0) -> Iterator[Page]:
    """A headless Chromium with a fresh profile in `profile`, and one blank tab."""
    profile.mkdir(parents=True, exist_ok=True)
    # A port file left by an earlier browser on this profile would name a closed port.
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    log = (profile / "chromium.log").open("wb")
    process = subprocess.Popen(
        [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        port = _devtools_port(profile, process, timeout)
        page_socket = _page_socket(port, timeout)
        with connect(page_socket, max_size=64 * 2**20, open_timeout=timeout) as socket:
            yield Page(socket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _devtools_port(profile: Path, process: subprocess.Popen[bytes], timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"chromium exited with {process.returncode}: "
                + (profile / "chromium.log").read_text(errors="replace")[-2000:]
            )
        if marker.is_file():
            lines = marker.read_text().split()
            if lines:
                return int(lines[0])
        time.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")


def _page_socket(port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
                targets = json.load(answer)
        except OSError:  # not listening yet
            time.sleep(0.1)
            continue
        pages = [t for t in targets if t.get("type") == "page"]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        time.sleep(0.05)
    raise TimeoutError("chromium opened no page")
