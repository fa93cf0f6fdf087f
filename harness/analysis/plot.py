"""Safety vs utility scatter of a run (`realign report DIR --plot FILE.png`), Pareto front marked.

A defense is worth using only if no other defense is both safer and more useful; the Pareto
front shows those at a glance. Points carry their 95% intervals as error bars, because two
defenses whose intervals overlap are not ranked by the picture either. The columns come from the
same leaderboard document as the published page, so the plot and the page always agree, and the
default axes follow the metrics' declared meanings (harness.analysis.axes).

Legible at its saved size for 2 to 15 and more entries: each point is a numbered, coloured
marker, the full specs are in a key beside the axes (harness.analysis.plot_text), and the figure
grows with the key instead of squeezing the axes. matplotlib runs on its Agg backend: no display
needed (CI, servers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.analysis.axes import axis_title, pick_axes
from harness.analysis.plot_text import key_label, place_numbers, style, wrap
from harness.errors import RealignError

DPI = 120


@dataclass(frozen=True)
class Point:
    label: str
    model: str
    x: float
    y: float
    x_err: tuple[float, float]
    y_err: tuple[float, float]


def short_model(model: str) -> str:
    """The last part of a model spec's path or hub id: enough to tell models apart in a key."""
    return model.rstrip("/").rsplit("/", 1)[-1] or model


def points(doc: dict[str, Any], cx: dict[str, Any], cy: dict[str, Any]) -> list[Point]:
    several_models = len({e["model"] for e in doc["entries"]}) > 1
    out = []
    baseline_first = sorted(doc["entries"], key=lambda e: (e["model"], e.get("attack", "none") != "none",
                                                            e.get("attack", "none"), e["defense"] != "none"))
    for e in baseline_first:  # stable: the document's order otherwise
        mx, my = e["metrics"].get(cx["key"]), e["metrics"].get(cy["key"])
        if not mx or not my or mx["value"] is None or my["value"] is None:
            continue

        def err(m: dict[str, Any]) -> tuple[float, float]:
            low = m["low"] if m["low"] is not None else m["value"]
            high = m["high"] if m["high"] is not None else m["value"]
            return (max(m["value"] - low, 0.0), max(high - m["value"], 0.0))

        label = e["defense"] if e.get("attack", "none") == "none" else f"{e['defense']} vs {e['attack']}"
        if several_models:
            label = f"{short_model(e['model'])}: {label}"
        out.append(Point(label, e["model"], mx["value"], my["value"], err(mx), err(my)))
    return out


def pareto_front(pts: list[tuple[float, float]], x_better: str, y_better: str) -> list[int]:
    """Indices of points no other point dominates (at least as good on both, better on one)."""
    sx = 1.0 if x_better == "higher" else -1.0
    sy = 1.0 if y_better == "higher" else -1.0
    goods = [(sx * x, sy * y) for x, y in pts]
    front = []
    for i, (xi, yi) in enumerate(goods):
        dominated = any(xj >= xi and yj >= yi and (xj > xi or yj > yi) for j, (xj, yj) in enumerate(goods) if j != i)
        if not dominated:
            front.append(i)
    return front


def axis_label(col: dict[str, Any], width: int) -> str:
    head, source = axis_title(col)
    return head + "\n" + wrap(source, width)


def _limits(col: dict[str, Any], values: list[float], errs: list[tuple[float, float]]) -> tuple[float, float]:
    """Rates: the whole 0-1 range, so distances read honestly and a zero sits visibly inside the
    frame; points: the data with their intervals and a margin."""
    if col["scale"] == 1.0:
        return -0.05, 1.05
    lo = min(v - e[0] for v, e in zip(values, errs))
    hi = max(v + e[1] for v, e in zip(values, errs))
    pad = (hi - lo) * 0.08 or 1.0
    return lo - pad, hi + pad


def draw(doc: dict[str, Any], x: str | None = None, y: str | None = None, title: str | None = None) -> Any:
    """The scatter as a matplotlib Figure (layout final, numbers placed); the caller saves or closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cx, cy = pick_axes(doc, x, y)
    pts = points(doc, cx, cy)
    if not pts:
        raise RealignError(f"no entry has both {cx['key']} and {cy['key']}: nothing to plot")
    front = pareto_front([(p.x, p.y) for p in pts], cx["better"], cy["better"])
    keys = [key_label(f"{i + 1}  {p.label}") for i, p in enumerate(pts)]
    key_lines = sum(k.count("\n") + 1 for k in keys) + 2
    fig = plt.figure(figsize=(11.0, max(6.0, 1.3 + 0.2 * key_lines + 0.05 * len(keys))), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    handles = []
    for i, p in enumerate(pts):
        colour, marker = style(i)
        ax.errorbar([p.x], [p.y], xerr=[[p.x_err[0]], [p.x_err[1]]], yerr=[[p.y_err[0]], [p.y_err[1]]],
                    fmt=marker, color=colour, ecolor=colour, alpha=0.9, capsize=3, markersize=7,
                    markeredgecolor="black", markeredgewidth=0.5, zorder=3, clip_on=False)
        handles.append(Line2D([], [], linestyle="none", marker=marker, color=colour, markeredgecolor="black",
                              markeredgewidth=0.5, markersize=7))
    fp = sorted((pts[i] for i in front), key=lambda p: p.x)
    ax.plot([p.x for p in fp], [p.y for p in fp], "--", color="black", linewidth=1, zorder=2)
    ax.scatter([p.x for p in fp], [p.y for p in fp], s=220, facecolors="none", edgecolors="black",
               linewidths=1.3, zorder=4, clip_on=False)
    handles.append(Line2D([], [], linestyle="--", marker="o", markersize=11, markerfacecolor="none",
                          color="black", linewidth=1))
    ax.set_xlim(*_limits(cx, [p.x for p in pts], [p.x_err for p in pts]))
    ax.set_ylim(*_limits(cy, [p.y for p in pts], [p.y_err for p in pts]))
    ax.set_xlabel(axis_label(cx, 70), fontsize=9)
    ax.set_ylabel(axis_label(cy, 48), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    models = sorted({p.model for p in pts})
    heading = title or "Safety vs utility per defense (95% intervals)" + (f": {models[0]}" if len(models) == 1 else "")
    ax.set_title(wrap(heading, 80), fontsize=10)
    fig.legend(handles, [*keys, "Pareto front"], loc="outside right upper", fontsize=8, frameon=False,
               title="key", title_fontsize=8, alignment="left", handletextpad=0.4, labelspacing=0.6)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: the numbers are placed in display coordinates
    place_numbers(ax, [(p.x, p.y) for p in pts], [str(i + 1) for i in range(len(pts))], rings=[(p.x, p.y) for p in fp])
    return fig


def plot(doc: dict[str, Any], out: str | Path, x: str | None = None, y: str | None = None, title: str | None = None) -> Path:
    """Write the scatter to `out` (PNG); returns the path."""
    import matplotlib.pyplot as plt

    fig = draw(doc, x, y, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path, x: str | None = None, y: str | None = None) -> Path:
    """The scatter of one run directory's results."""
    from harness.analysis.leaderboard import build, read_run

    return plot(build([read_run(run_dir)]), out, x, y)
