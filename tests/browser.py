"""Headless Chromium for the leaderboard page tests: a served site folder, DOM dumps, screenshots,
and layout facts measured in the browser itself.

Needs the Debian package `chromium` (apt-get install -y chromium). Without it the browser tests
skip on a developer machine and fail on CI (env CI set), where a silent skip would hide lost
coverage.

Layout facts come from a probe page served beside index.html: it loads the page in a same-origin
iframe as wide as the window, waits until it has rendered, then measures with the browser's own
boxes (getBoundingClientRect, Range.getClientRects, elementFromPoint) and writes what it found as
JSON into its DOM, which `--dump-dom` returns. The page itself carries no test code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest

from harness.analysis.leaderboard import build, write

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=15000"]
PROBE = Path(__file__).with_name("leaderboard_probe.html")


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    message = "headless browser test needs Chromium: apt-get install -y chromium (Debian package)"
    if os.environ.get("CI"):
        pytest.fail(message + " [CI is set, so this is a failure, not a skip]")
    pytest.skip(message)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@contextmanager
def serve(site: Path, runs: list, note: str | None) -> Iterator[str]:
    """The leaderboard of `runs` (page, JSON and the probe) on 127.0.0.1; yields the page's URL."""
    write(build(runs, note=note), site)
    shutil.copyfile(PROBE, site / "probe.html")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    finally:
        server.shutdown()
        server.server_close()


def chromium(url: str, tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def screenshot(url: str, tmp_path: Path, width: int, height: int, out: Path) -> Path:
    chromium(url, tmp_path, f"--window-size={width},{height}", f"--screenshot={out}")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return out


def layout_facts(page_url: str, tmp_path: Path, width: int, query: str = "") -> dict[str, Any]:
    """What the probe measured on index.html{query} in a window `width` pixels wide."""
    probe = page_url.rsplit("/", 1)[0] + "/probe.html" + (f"?page={quote(query)}" if query else "")
    dom = chromium(probe, tmp_path, f"--window-size={width},1200", "--dump-dom")
    found = re.search(r'<pre id="facts">(.*?)</pre>', dom, re.S)
    assert found, f"probe did not finish: {dom[-2000:]}"
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    return json.loads(text)
