"""Safety vs utility scatter of a run (`realign report DIR --plot FILE.png`), Pareto front marked.

A defense is worth using only if no other defense is both safer and more useful; the Pareto
front shows those at a glance. Points carry their 95% intervals as error bars, because two
defenses whose intervals overlap are not ranked by the picture either. The columns come from the
same leaderboard document as the published page, so the plot and the page always agree.
matplotlib runs on its Agg backend: no display needed (CI, servers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import RealignError


@dataclass(frozen=True)
class Point:
    label: str
    model: str
    x: float
    y: float
    x_err: tuple[float, float]
    y_err: tuple[float, float]


def pick_axes(doc: dict[str, Any], x: str | None = None, y: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """x: the first headline safety column, y: the first headline utility column (or those named)."""
    cols = {c["key"]: c for c in doc["columns"]}
    for name, key in (("x", x), ("y", y)):
        if key is not None and key not in cols:
            raise RealignError(f"plot {name} column {key!r} not found; columns: {', '.join(cols)}")

    def first(kind: str) -> dict[str, Any] | None:
        return next((c for c in doc["columns"] if c["kind"] == kind and c["headline"] and c["better"]), None)

    cx = cols[x] if x else first("safety")
    cy = cols[y] if y else first("utility")
    if cx is None or cy is None:
        missing = "safety (e.g. asr of a judged task)" if cx is None else "utility (mme, scienceqa, benign refusal)"
        raise RealignError(f"cannot plot safety vs utility: the results hold no headline {missing} metric")
    return cx, cy


def points(doc: dict[str, Any], cx: dict[str, Any], cy: dict[str, Any]) -> list[Point]:
    out = []
    for e in doc["entries"]:
        mx, my = e["metrics"].get(cx["key"]), e["metrics"].get(cy["key"])
        if not mx or not my or mx["value"] is None or my["value"] is None:
            continue

        def err(m: dict[str, Any]) -> tuple[float, float]:
            low = m["low"] if m["low"] is not None else m["value"]
            high = m["high"] if m["high"] is not None else m["value"]
            return (m["value"] - low, high - m["value"])

        label = e["defense"] if e.get("attack", "none") == "none" else f"{e['defense']} vs {e['attack']}"
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


def axis_label(col: dict[str, Any]) -> str:
    judge = f", judge {col['judge']}" if col["judge"] else ""
    return f"{col['metric']} ({col['task']}{judge}) - {col['better']} is better"


def plot(doc: dict[str, Any], out: str | Path, x: str | None = None, y: str | None = None, title: str | None = None) -> Path:
    """Write the scatter to `out` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cx, cy = pick_axes(doc, x, y)
    pts = points(doc, cx, cy)
    if not pts:
        raise RealignError(f"no entry has both {cx['key']} and {cy['key']}: nothing to plot")
    front = pareto_front([(p.x, p.y) for p in pts], cx["better"], cy["better"])
    models = sorted({p.model for p in pts})
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for mi, model in enumerate(models):
        mine = [p for p in pts if p.model == model]
        ax.errorbar([p.x for p in mine], [p.y for p in mine],
                    xerr=[[p.x_err[0] for p in mine], [p.x_err[1] for p in mine]],
                    yerr=[[p.y_err[0] for p in mine], [p.y_err[1] for p in mine]],
                    fmt="o", color=colours(mi % 10), ecolor=colours(mi % 10), alpha=0.85, capsize=3,
                    label=model if len(model) <= 60 else "..." + model[-57:])
    for p in pts:
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    fp = sorted((pts[i] for i in front), key=lambda p: p.x)
    ax.plot([p.x for p in fp], [p.y for p in fp], "--", color="black", linewidth=1, zorder=1)
    ax.scatter([p.x for p in fp], [p.y for p in fp], s=160, facecolors="none", edgecolors="black",
               linewidths=1.5, zorder=3, label="Pareto front")
    for col, set_lim in ((cx, ax.set_xlim), (cy, ax.set_ylim)):
        if col["scale"] == 1.0:  # rates: show the whole 0-1 range so distances read honestly
            set_lim(-0.05, 1.05)
    ax.set_xlabel(axis_label(cx))
    ax.set_ylabel(axis_label(cy))
    ax.set_title(title or "Safety vs utility per defense (95% intervals)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """The scatter of one run directory's results."""
    from harness.analysis.leaderboard import build, read_run

    return plot(build([read_run(run_dir)]), out)
