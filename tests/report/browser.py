"""Headless Chromium for the report tests: load a page, read back what it rendered, take a screenshot.

No WebDriver: ``--dump-dom`` returns the DOM after the page settled (``--virtual-time-budget`` lets its
promises and timers run), where the report writes its own status (charts drawn, errors caught by its
error hook); ``--enable-logging=stderr`` prints every console message as an ``INFO:CONSOLE`` line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def chromium_binary() -> str | None:
    """The Chromium executable ($KEEL_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH)."""
    if os.environ.get("KEEL_CHROMIUM"):
        return os.environ["KEEL_CHROMIUM"]
    return next(
        (
            p
            for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
            if (p := shutil.which(name))
        ),
        None,
    )


def load(page: Path, profile: Path, *, fragment: str = "", budget_ms: int = 30_000, timeout: float = 180) -> dict:
    """Open ``page`` (with ``#fragment``); return its status ({charts, rendered, errors, view}), the console
    lines, the DOM and the wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        [
            chromium_binary(),
            *FLAGS,
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            f"--virtual-time-budget={budget_ms}",
            "--window-size=1400,1000",
            "--dump-dom",
            page.resolve().as_uri() + (f"#{fragment}" if fragment else ""),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    dom = proc.stdout
    match = re.search(r'<pre id="keel-status">([^<]*)</pre>', dom)
    text = match.group(1).replace("&quot;", '"').replace("&amp;", "&") if match else ""
    status = json.loads(text) if text else {}
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return {
        "status": status,
        "console": console,
        "dom": dom,
        "seconds": seconds,
        "returncode": proc.returncode,
        "stderr_tail": proc.stderr[-2000:],
    }


def screenshot(page: Path, png: Path, profile: Path, *, height: int = 3600, timeout: float = 180) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            chromium_binary(),
            *FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=30000",
            f"--window-size=1400,{height}",
            f"--screenshot={png.resolve()}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return png
