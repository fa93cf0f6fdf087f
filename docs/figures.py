"""Remake the README's "What you see" figures: `python docs/figures.py` from the repository root.

The README shows what a user gets, so its pictures are made by the same code paths a user runs,
not drawn by hand: the demo's chart (`realign demo`), `realign report --plot` on a run of 15
defenses (synthetic numbers from tests/synthetic_runs.py: no 15-defense run ships), and the
published leaderboard page (leaderboard/) in headless Chromium at 1280 and 1920 px. PNGs are
reduced to a 256-colour palette so the repository stays small. Needs matplotlib and, for the
page, Chromium (apt-get install -y chromium).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.cli import main  # noqa: E402
from tests.browser import _QuietHandler, screenshot  # noqa: E402
from tests.synthetic_runs import LONG_DEFENSES, organism_records, write_run  # noqa: E402

DOCS = ROOT / "docs"


def small_png(src: Path, dst: Path) -> Path:
    """`src` as a palette PNG at `dst` (a screenshot or a plot loses nothing visible)."""
    from PIL import Image

    Image.open(src).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    print(f"wrote {dst} ({dst.stat().st_size // 1024} KiB)")
    return dst


def demo(tmp: Path) -> None:
    assert main(["demo", "--out", str(tmp / "demo"), "--quiet"]) == 0
    small_png(tmp / "demo" / "demo.png", DOCS / "demo.png")


def report_plot(tmp: Path) -> None:
    run = write_run(tmp / "fifteen", organism_records(LONG_DEFENSES))
    assert main(["report", str(run), "--plot", str(tmp / "plot.png")]) == 0
    small_png(tmp / "plot.png", DOCS / "report-plot-15.png")


def leaderboard(tmp: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(ROOT / "leaderboard")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        for width, height in ((1280, 1250), (1920, 1650)):
            shot = screenshot(url, tmp, width, height, tmp / f"leaderboard-{width}.png")
            small_png(shot, DOCS / f"leaderboard-{width}.png")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for make in (report_plot, leaderboard, demo):
            if len(sys.argv) == 1 or make.__name__ in sys.argv[1:]:
                make(Path(tmp))
    shutil.rmtree(ROOT / "docs" / "__pycache__", ignore_errors=True)
