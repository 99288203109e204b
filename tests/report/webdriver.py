"""Chromium driven through chromedriver's W3C WebDriver protocol (plain HTTP, no selenium): real key presses, a
viewport of any width, CDP emulation (forced colours, print) and printing to PDF.

`tests.report.browser` only loads a page and reads back its DOM; what a keyboard user or a printer does needs a
driven browser. Debian's ``chromium-driver`` (CI installs it next to ``chromium``) is found on PATH or in
$KEEL_CHROMEDRIVER.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.report.browser import chromium_binary

KEYS = {"tab": "\ue004", "enter": "\ue007", "shift": "\ue008"}


def chromedriver_binary() -> str | None:
    return os.environ.get("KEEL_CHROMEDRIVER") or shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Browser:
    """One headless Chromium session; use as a context manager (the driver process is always ended)."""

    def __init__(self, *, width: int = 1400, height: int = 1000) -> None:
        self.size = (width, height)
        port = _free_port()
        self._proc = subprocess.Popen(
            [chromedriver_binary(), f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._base = f"http://127.0.0.1:{port}"
        self._session = ""

    def __enter__(self) -> Browser:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self._base + "/status", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise
                time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        args.append(f"--window-size={self.size[0]},{self.size[1]}")
        options = {"binary": chromium_binary(), "args": args}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self._session = self._call("POST", "/session", caps)["sessionId"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._session:
                self._call("DELETE", f"/session/{self._session}")
        finally:
            self._proc.terminate()
            self._proc.wait(timeout=30)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self._base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=180) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.read().decode()[:1000]}") from None

    def _do(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self._session}{path}", body)

    def open(self, page: Path, *, timeout: float = 120) -> None:
        """Load ``page`` and wait until the report says every chart is drawn."""
        self._do("POST", "/url", {"url": page.resolve().as_uri()})
        deadline = time.monotonic() + timeout
        while not self.js("return !!(window.__keel && window.__keel.done)"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{page}: the report never finished drawing")
            time.sleep(0.2)

    def js(self, script: str, *args: Any) -> Any:
        return self._do("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, *args: Any, timeout: float = 30) -> Any:
        """Run ``script`` until it returns something truthy (returned), for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not (value := self.js(script, *args)):
            if time.monotonic() > deadline:
                raise TimeoutError(script)
            time.sleep(0.1)
        return value

    def js_async(self, script: str, *args: Any) -> Any:
        """Run ``script``; its last argument is the callback whose argument is returned."""
        return self._do("POST", "/execute/async", {"script": script, "args": list(args)})

    def cdp(self, command: str, params: dict[str, Any] | None = None) -> Any:
        """A Chrome DevTools Protocol command (``Emulation.setEmulatedMedia``, ``Page.printToPDF`` …)."""
        return self._do("POST", "/goog/cdp/execute", {"cmd": command, "params": params or {}})

    def press(self, *keys: str) -> None:
        """Press and release each key in turn (a name of `KEYS`, or a character)."""
        actions = []
        for key in keys:
            value = KEYS.get(key, key)
            actions += [{"type": "keyDown", "value": value}, {"type": "keyUp", "value": value}]
        self._do("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})

    def focused(self) -> dict[str, Any]:
        """The focused element: its tag, title (a toolbar button's), chart, the outline drawn around it, and whether
        it is inside the window."""
        return self.js(
            "var e = document.activeElement, s = getComputedStyle(e), c = e.closest('.chart'),"
            " r = e.getBoundingClientRect();"
            "return {tag: e.tagName, title: e.getAttribute('data-title'), chart: c && c.id,"
            " outline: s.outlineStyle, outline_px: parseFloat(s.outlineWidth),"
            " visible: r.width > 0 && r.left >= 0 && r.top >= 0 && r.bottom <= innerHeight};"
        )
