"""Heatmap of the attack x defense matrix (`realign report DIR --matrix --plot FILE.png`).

One panel per (model, task, judge), attacks down and defenses across like the printed table.
Colour runs from safe (green) to unsafe (red) whichever direction the metric is better in, over
the metric's whole scale (0-1 for rates), so two panels with the same colour mean the same number.
Every cell is annotated with its value and 95% interval, because a colour alone hides that two
neighbouring cells may not differ at all. Long specs (`adashield:placement=append`) are wrapped
rather than cut. matplotlib runs on its Agg backend: no display needed.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from harness.analysis.matrix import MatrixTable
from harness.analysis.plot_text import wrap
from harness.errors import RealignError

LABEL_WIDTH = 16  # characters per line of a row or column label
TITLE_WIDTH = 70


def _value(cell: dict | None) -> float:
    if not cell or cell.get("value") is None:
        return math.nan
    return float(cell["value"])


def _annotation(cell: dict | None, scale: float) -> str:
    if not cell or cell.get("value") is None:
        return "n/a"
    digits = "{:.2f}" if scale == 1.0 else "{:.0f}"
    text = digits.format(cell["value"])
    if cell.get("low") is not None and cell.get("high") is not None:
        text += f"\n[{digits.format(cell['low'])}, {digits.format(cell['high'])}]"
    return text


def draw_matrix(tables: list[MatrixTable]) -> Any:
    """The heatmaps of `tables` as a matplotlib Figure (the caller saves or closes it)."""
    if not tables:
        raise RealignError("no headline safety metric in these results: no attack x defense matrix to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = max(len(t.defenses) for t in tables)
    heights = [max(2.6, 0.75 * len(t.attacks) + 2.0) for t in tables]
    fig, axes = plt.subplots(len(tables), 1, figsize=(max(6.5, 1.7 * cols + 3.5), sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, t in zip(axes[:, 0], tables):
        grid = np.array([[_value(t.cell(a, d)) for d in t.defenses] for a in t.attacks], dtype=float)
        cmap = plt.get_cmap("RdYlGn_r" if t.meaning.better == "lower" else "RdYlGn").with_extremes(bad="#d9d9d9")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=t.meaning.scale, aspect="auto")
        for i, attack in enumerate(t.attacks):
            for j, defense in enumerate(t.defenses):
                value = grid[i, j]
                rgba = cmap(value / t.meaning.scale) if not math.isnan(value) else (0.85, 0.85, 0.85, 1.0)
                dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                ax.text(j, i, _annotation(t.cell(attack, defense), t.meaning.scale), ha="center", va="center",
                        fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(t.defenses)), [wrap(d) for d in t.defenses], fontsize=8)
        ax.set_yticks(range(len(t.attacks)), [wrap(a) for a in t.attacks], fontsize=8)
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.set_xlabel("defense", fontsize=9)
        ax.set_ylabel("attack", fontsize=9)
        better = f"{t.meaning.better} is better" if t.meaning.better else "not ranked"
        title = f"{t.model} | {t.task} | judge {t.judge or '-'}: {t.metric} ({better}), 95% intervals"
        ax.set_title(textwrap.fill(title, TITLE_WIDTH), fontsize=9, pad=12)
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def plot_matrix(tables: list[MatrixTable], out: str | Path) -> Path:
    """Write the heatmaps of `tables` to `out` (PNG); returns the path."""
    import matplotlib.pyplot as plt

    fig = draw_matrix(tables)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
