"""Every figure realign writes stays readable with 2 and with 15 defenses of long specs.

Readable is measured on the drawn figure with the renderer's bounding boxes (tests/plot_geometry.py):
the axes cover a fair share of the canvas, and no text box overlaps another or leaves the canvas.
The figures: the safety-vs-utility scatter (`report --plot`), the demo's bar chart (demo.png) and
the attack x defense heatmap (`report --matrix --plot`).
"""

from __future__ import annotations

import pytest

from harness.analysis.axes import default_column, pick_axes
from harness.analysis.leaderboard import build, read_run
from harness.analysis.matrix import build_matrix
from harness.analysis.matrix_plot import draw_matrix
from harness.analysis.plot import draw
from harness.errors import RealignError
from tests.plot_geometry import assert_readable, text_boxes
from tests.synthetic_runs import (
    LONG_DEFENSES,
    metric,
    organism_records,
    record,
    write_run,
)

pytest.importorskip("matplotlib")

COUNTS = (2, 15)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _doc(tmp_path, count: int) -> dict:
    return build([read_run(write_run(tmp_path / f"run{count}", organism_records(LONG_DEFENSES[:count])))])


@pytest.mark.parametrize("count", COUNTS)
def test_scatter_is_readable(tmp_path, count: int):
    fig = draw(_doc(tmp_path, count))
    assert_readable(fig, fig.axes[0], min_share=0.4)
    texts = [b.text for b in text_boxes(fig)]
    # the default axes: refusal with an image against helpfulness with an image, never the text-only pair
    assert any(t.startswith("refused_shape (higher is better, with image)") for t in texts)
    assert any(t.startswith("helpful_shape (higher is better, with image)") for t in texts)
    # every entry is in the key, and numbered points are labelled
    assert all(any(t.startswith(f"{i}  ") for t in texts) for i in range(1, count + 1))
    assert sum(t.isdigit() for t in texts) >= min(count, 10)


def test_scatter_error_bars_come_from_the_intervals(tmp_path):
    fig = draw(_doc(tmp_path, 2))
    segments = [seg for coll in fig.axes[0].collections for seg in getattr(coll, "get_segments", list)()]
    spans = sorted(round(abs(seg[1][0] - seg[0][0]) + abs(seg[1][1] - seg[0][1]), 3) for seg in segments)
    assert spans and max(spans) > 0.1  # the recorded +-0.12 intervals, not zero-length bars


def test_default_axes_follow_declared_meanings(tmp_path):
    doc = _doc(tmp_path, 2)
    cx, cy = pick_axes(doc)
    assert (cx["metric"], cy["metric"]) == ("refused_shape", "helpful_shape")
    assert (cx["image"], cy["image"]) == (True, True)
    cx, cy = pick_axes(doc, "refused_none", "picture_qa")  # --x / --y by metric name
    assert (cx["metric"], cy["metric"]) == ("refused_none", "picture_qa")
    with pytest.raises(RealignError, match="names no column"):
        pick_axes(doc, "nope")
    cols = [{"key": k, "metric": k, "kind": "safety", "headline": True, "better": "lower", **({"image": i} if i is not None else {})}
            for k, i in (("text", False), ("mixed", None), ("pictures", True))]
    assert default_column(cols, "safety")["key"] == "pictures"
    assert default_column(cols[:2], "safety")["key"] == "mixed"


def test_cli_plot_with_chosen_axes(tmp_path, capsys):
    from harness.cli import main

    run = write_run(tmp_path / "run", organism_records(LONG_DEFENSES[:15]))
    out = tmp_path / "p.png"
    assert main(["report", str(run), "--plot", str(out), "--x", "refused_none", "--y", "picture_qa"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(run), "--plot", str(out), "--x", "refused"]) == 2
    assert "names no column" in capsys.readouterr().err


@pytest.mark.parametrize("count", COUNTS)
def test_demo_bar_chart_is_readable(count: int):
    from organism.demo import COLUMNS, defense_table, draw_defenses

    rows = defense_table(organism_records(LONG_DEFENSES[:count]))
    for row in rows:
        row["picture_qa"] = None if row["spec"] == "ecso" else row["picture_qa"]  # a missing metric draws as 0
    fig = draw_defenses(rows)
    ax = fig.axes[0]
    assert_readable(fig, ax, min_share=0.35)
    # error bars on every bar, and zeros drawn as dots on the baseline (visible above the frame's bottom)
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(dots) == len(COLUMNS)
    ys = [y for line in dots for y in line.get_ydata()]
    assert 0.0 in ys and ax.get_ylim()[0] < 0.0
    assert len(ax.collections) >= len(COLUMNS)  # the interval whiskers


@pytest.mark.parametrize("count", COUNTS)
def test_matrix_heatmap_is_readable(count: int):
    recs = [record("organisms/seed0", d, "jbb", "keywords", {"asr": metric(0.1 * (i % 10), 0.0, 0.2)}, attack=a)
            for i, d in enumerate(LONG_DEFENSES[:count]) for a in ("none", "figstep", "qr:images=SD+TYPO,rewriter=rule")]
    tables, _ = build_matrix(recs)
    fig = draw_matrix(tables)
    assert_readable(fig, fig.axes[0], min_share=0.2, min_side=150)
