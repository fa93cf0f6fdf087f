"""leaderboard/index.html in headless Chromium over a local HTTP server: rows, sorting, escaping,
the attack matrix. Layout at 1280 and 1920 px, with screenshots: tests/test_leaderboard_layout.py.
Chromium and the server: tests/browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import re
from pathlib import Path
from typing import Iterator

import pytest

from harness.analysis.leaderboard import read_run
from tests.browser import chromium, serve
from tests.synthetic_runs import metric, record, write_run

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "harness" / "web" / "index.html"  # package data: a link to leaderboard/index.html
EVIL_MODEL = '<img src=x onerror="document.title=\'pwned\'">evil'
EVIL_DEFENSE = "<b>bold</b>&amp;"
ASR_KEY = "demo|keywords|asr"


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
    with serve(site, runs, note) as url:
        assert (site / "index.html").read_bytes() == PAGE.read_bytes()
        yield url


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
    dom = chromium(url, tmp_path, "--dump-dom")
    reader = _DomReader()
    reader.feed(dom)
    assert reader.body_attrs.get("data-ready") == "true", f"page did not render: {dom[-3000:]}"
    return reader, dom


def test_rows_sorting_and_escaping(served: str, tmp_path: Path):
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
    # Pareto front of (asr, benign refusal), both lower-better: (0.10, 0.45) dominates (0.35, 0.50);
    # a front entry carries a star in its (sticky) entry cell
    starred = re.findall(r'<tr data-model="[^"]*" data-attack="[^"]*" data-defense="([^"]*)">(?:(?!</tr>).)*?'
                         r'class="front"', dom, re.S)
    assert sorted(starred) == ["adashield", "none"]


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
