"""leaderboard/index.html in headless Chromium over a local HTTP server: rows, sorting, escaping,
and a screenshot.

Needs the Debian package `chromium` (apt-get install -y chromium). Without it the browser tests
skip on a developer machine and fail on CI (env CI set), where a silent skip would hide lost
coverage. Set REALIGN_SCREENSHOT_DIR to keep the screenshot (e.g. as a CI artifact).
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import os
import re
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from harness.analysis.leaderboard import build, read_run, write
from tests.synthetic_runs import metric, record, write_run

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "harness" / "web" / "index.html"  # package data: a link to leaderboard/index.html
EVIL_MODEL = '<img src=x onerror="document.title=\'pwned\'">evil'
EVIL_DEFENSE = "<b>bold</b>&amp;"
ASR_KEY = "demo|keywords|asr"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=10000"]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    message = "headless browser test needs Chromium: apt-get install -y chromium (Debian package)"
    if os.environ.get("CI"):
        pytest.fail(message + " [CI is set, so this is a failure, not a skip]")
    pytest.skip(message)


def test_csp_hash_matches_the_inline_script():
    """The page allows only its own script (by hash), so even an escaping bug could not run code.
    After editing the script, put the hash printed here into the Content-Security-Policy meta tag."""
    text = PAGE.read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    assert f"'sha256-{digest}'" in text, f"update the CSP hash in leaderboard/index.html to sha256-{digest}"
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script
    # no CDN or other outside resource: the only URL is the SVG namespace name
    assert set(re.findall(r"https?://[^\"' )]+", text)) == {"http://www.w3.org/2000/svg"}


def _demo_record(model: str, defense: str, asr: float, refusal: float, attack: str | None = None) -> dict:
    return record(model, defense, "demo", "keywords", {
        "asr": metric(asr, asr - 0.05, asr + 0.05, 24), "asr/shape": metric(asr, 0.0, 1.0, 12),
        "benign_refusal/none": metric(refusal, max(refusal - 0.1, 0.0), refusal + 0.1, 12)}, attack=attack)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[str]:
    """A leaderboard folder (page + three entries, one with HTML in its names) on 127.0.0.1."""
    runs = []
    for i, (model, defense, asr, refusal) in enumerate((
        ("model-b", "none", 0.62, 0.05),
        (EVIL_MODEL, EVIL_DEFENSE, 0.35, 0.50),
        ("model-a", "adashield", 0.10, 0.45),
    )):
        runs.append(write_run(tmp_path / f"run{i}", [_demo_record(model, defense, asr, refusal)]))
    yield from _serve(tmp_path / "site", [read_run(r) for r in runs], "test <i>note</i>")


@pytest.fixture()
def served_attacks(tmp_path: Path) -> Iterator[str]:
    """Two models under attacks none and figstep, each with defenses none and adashield."""
    recs = [_demo_record(m, d, asr, 0.1, attack=a) for m in ("model-a", "model-b")
            for a, d, asr in (("none", "none", 0.5), ("none", "adashield", 0.2), ("figstep", "none", 0.9),
                              ("figstep", "adashield", 0.6))]
    yield from _serve(tmp_path / "site-attacks", [read_run(write_run(tmp_path / "run-attacks", recs))], None)


def _serve(site: Path, runs: list, note: str | None) -> Iterator[str]:
    write(build(runs, note=note), site)
    assert (site / "index.html").read_bytes() == PAGE.read_bytes()
    handler = partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def _chromium(url: str, tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


class _DomReader(html.parser.HTMLParser):
    """Collects start tags and, for the #board table body, the rows' data-model / data-defense."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.rows: list[tuple[str, str]] = []
        self.body_attrs: dict[str, str] = {}
        self._in_board = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "body":
            self.body_attrs = a
        if tag == "table":
            self._in_board = a.get("id") == "board"
        if tag == "tr" and self._in_board and "data-model" in a:
            self.rows.append((a["data-model"], a["data-defense"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_board = False


def _dump(url: str, tmp_path: Path) -> tuple[_DomReader, str]:
    dom = _chromium(url, tmp_path, "--dump-dom")
    reader = _DomReader()
    reader.feed(dom)
    assert reader.body_attrs.get("data-ready") == "true", f"page did not render: {dom[-3000:]}"
    return reader, dom


def test_rows_sorting_escaping_and_screenshot(served: str, tmp_path: Path):
    # default order: by model name
    page, dom = _dump(served, tmp_path)
    assert [m for m, _ in page.rows] == [EVIL_MODEL, "model-a", "model-b"]
    assert len(page.rows) == 3

    # sorted by ASR through the query string, both directions
    asc, _ = _dump(f"{served}?sort={ASR_KEY}&dir=asc", tmp_path)
    assert [d for _, d in asc.rows] == ["adashield", EVIL_DEFENSE, "none"]
    desc, _ = _dump(f"{served}?sort={ASR_KEY}&dir=desc", tmp_path)
    assert [d for _, d in desc.rows] == ["none", EVIL_DEFENSE, "adashield"]

    # HTML in names is text: no element was created, the script in it never ran
    assert "img" not in page.tags and "b" not in page.tags and "i" not in page.tags
    assert "<title>realign leaderboard</title>" in dom  # the injected onerror never set it
    assert "&lt;img src=x onerror=" in dom and "&lt;b&gt;bold&lt;/b&gt;&amp;amp;" in dom
    assert "test &lt;i&gt;note&lt;/i&gt;" in dom
    # Pareto front of (asr, benign refusal), both lower-better: (0.10, 0.45) dominates (0.35, 0.50)
    assert dom.count("\u2605") == 2 + 1  # two rows on the front + the legend line
    assert re.search(r'data-defense="adashield">(?:(?!</tr>).)*\u2605', dom, re.S)
    assert not re.search(r'data-defense="none">(?:(?!</tr>).)*<td class="front"></td>', dom, re.S)

    shot = tmp_path / "leaderboard.png"
    _chromium(served, tmp_path, "--window-size=1280,1300", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = os.environ.get("REALIGN_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "leaderboard.png")


def test_the_package_ships_the_published_page():
    """harness/web/index.html (package data) links to leaderboard/index.html (what the repository
    publishes), so there is one page; a wheel carries the file behind the link."""
    assert PAGE.is_file() and PAGE.resolve() == (REPO / "leaderboard" / "index.html").resolve()


def test_attack_matrix_per_model(served: str, served_attacks: str, tmp_path: Path):
    """With more than one attack the board gains an attack column and a matrix per model (attacks
    down, defenses across); without attacks the matrix section stays hidden."""
    page, dom = _dump(served_attacks, tmp_path)
    assert len(page.rows) == 8 and 'data-attack="figstep"' in dom
    assert re.search(r'<section id="matrix-section">', dom)  # shown: no `hidden` attribute
    tables = re.findall(r'<table class="matrix" data-model="([^"]+)" data-column="([^"]+)">(.*?)</table>', dom, re.S)
    assert [(m, c) for m, c, _ in tables] == [("model-a", ASR_KEY), ("model-b", ASR_KEY)]
    body = tables[0][2]
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
    assert [re.search(r"<th>(.*?)</th>", r).group(1) for r in rows] == ["attack \\ defense", "none", "figstep"]
    assert re.findall(r"<th>([^<]*)</th>", rows[0]) == ["attack \\ defense", "none", "adashield"]
    values = [re.findall(r'<span class="v">([^<]*)</span>', r) for r in rows[1:]]
    assert values == [["0.500", "0.200"], ["0.900", "0.600"]]
    _, plain_dom = _dump(served, tmp_path)
    assert '<section id="matrix-section" hidden="">' in plain_dom and 'class="matrix"' not in plain_dom
