"""The leaderboard page is readable at 1280 and 1920 px, measured in headless Chromium.

A board of 15 defenses with long specs, four tasks and an attack (wider than either window) is
served; the probe (tests/leaderboard_probe.html) reports, at each width, that the page itself
never scrolls sideways (the board scrolls inside its frame), that every header of the board is
visible and uncovered once scrolled to (the entry column is sticky), and that no two text boxes
overlap nor leave the window. A screenshot is taken at each width; set REALIGN_SCREENSHOT_DIR to
keep them (the README's are made the same way: docs/figures.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from harness.analysis.leaderboard import build, read_run
from tests.browser import layout_facts, screenshot, serve
from tests.synthetic_runs import LONG_DEFENSES, metric, organism_records, record, write_run

WIDTHS = (1280, 1920)


def wide_records() -> list[dict]:
    """15 defenses on the organism, MME, ScienceQA and a harmful-behaviour set (also under figstep)."""
    recs = organism_records(LONG_DEFENSES)
    for i, d in enumerate(LONG_DEFENSES):
        recs.append(record("organisms/seed0", d, "mme", None, {
            "perception": metric(1200.0 - 20 * i, 1100.0 - 20 * i, 1300.0 - 20 * i),
            "cognition": metric(300.0 + 5 * i, 250.0 + 5 * i, 350.0 + 5 * i)}))
        recs.append(record("organisms/seed0", d, "scienceqa", None, {
            "acc": metric(0.7 - 0.01 * i, 0.6, 0.8), "acc_img": metric(0.65 - 0.01 * i, 0.55, 0.75)}))
        for attack in ("none", "figstep"):
            asr = (0.3 if attack == "none" else 0.8) - 0.02 * i
            recs.append(record("organisms/seed0", d, "jbb:split=harmful", "keywords",
                               {"asr": metric(asr, asr - 0.1, asr + 0.1), "refusal_rate": metric(0.1, 0.0, 0.2)},
                               attack=attack))
    return recs


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    tmp = tmp_path_factory.mktemp("wide-board")
    run = read_run(write_run(tmp / "run", wide_records()))
    with serve(tmp / "site", [run], "synthetic numbers: a layout test") as url:
        yield url, build([run])


@pytest.mark.parametrize("width", WIDTHS)
def test_page_is_readable_at_width(wide: tuple[str, dict], tmp_path: Path, width: int):
    url, doc = wide
    for query, columns in (("", [c for c in doc["columns"] if c["headline"]]), ("detail=1", doc["columns"])):
        facts = layout_facts(url, tmp_path, width, query)
        assert "error" not in facts, facts
        assert facts["width"] == width and facts["pageScrollWidth"] <= width  # the board scrolls, not the page
        assert facts["columnsShown"] == len(columns) and (facts["boardScrolls"] or width > 1280)
        groups = {(c["task"], c["judge"]) for c in columns}
        assert len(facts["headers"]) == 1 + len(groups) + len(columns)
        assert [h for h in facts["headers"] if not h["visible"]] == []
        assert facts["overlaps"] == [], facts["overlaps"]
        assert facts["offCanvas"] == [], facts["offCanvas"]
        assert facts["texts"] > 300
    shot = screenshot(url, tmp_path, width, 1100, tmp_path / f"leaderboard-{width}.png")
    assert shot.stat().st_size > 50_000
    keep = os.environ.get("REALIGN_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / shot.name)
