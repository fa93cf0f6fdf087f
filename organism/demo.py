"""`realign demo`: the shipped model organism, its safety degradation, and what each defense recovers.

The organism (the `organism` package, organisms/seed0) is a tiny LLaVA trained by this project that
refuses harmful requests as text and loses much of that refusal once a picture is attached,
engineered on purpose so that a defense's effect is visible in seconds on a CPU. The demo runs
the undefended model and every defense on a slice of the `organism` task (one held-out
template: 30 harmful and 60 benign requests, as text and with a shape picture, plus picture
questions), prints one row per defense and writes a bar chart. It is a demonstration on a toy
model, not a benchmark result about real VLMs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harness.runner import run
from harness.schema import RunConfig
from harness.tables import TextTable, markdown, show

DEMO_ORGANISM = "gen2-seed0"  # generation 2: the backbone has the skills prompting defenses rely on
DEMO_TASK = "organism:templates=1,images=none+shape"
DEMO_JUDGE = "keywords:preset=organism"
# (label, spec). Calibration uses the task's calibration splits: templates disjoint from the
# evaluated ones. CMRM and ShiftDC run with their defaults, which the organism sweep chose; ShiftDC's
# calibration requests carry pictures, which the organism captions (its paper's direction input).
DEMO_DEFENSES: tuple[tuple[str, str], ...] = (
    ("none", "none"),
    ("CMRM (dataset)", "cmrm:calibration=organism:split=calibration"),
    ("CMRM (sample)", "cmrm:level=sample"),
    ("ShiftDC", "shiftdc:calibration_unsafe=organism:split=calibration_harmful_shape,"
                "calibration_safe=organism:split=calibration_benign_shape"),
    ("AdaShield-S", "adashield"),
    ("ECSO", "ecso"),
)
DPI = 110
COLUMNS = (("refused_none", "refused, text only"), ("refused_shape", "refused, with image"),
           ("helpful_shape", "benign answered, with image"), ("picture_qa", "picture questions right"))


def cache_dir() -> Path:
    return Path(os.environ.get("REALIGN_CACHE", Path.home() / ".cache" / "realign"))


def shipped_organism(name: str = DEMO_ORGANISM) -> Path:
    """The organism folder shipped in the repository (organisms/<name>), or one built into the cache.

    A checkout has the shipped folders; an installed package without them builds one once
    (several minutes) so the demo still runs offline.
    """
    shipped = Path(__file__).resolve().parents[1] / "organisms" / name
    if (shipped / "config.json").exists():
        return shipped
    target = cache_dir() / "organisms" / name
    if not (target / "config.json").exists():
        from organism.build import build_organism

        generation = 2 if name.startswith("gen2-") else 1
        seed = int(name.rsplit("seed", 1)[1])
        print(f"no shipped organism found; building {name} into {target} (several minutes, once)")
        build_organism(seed, target, generation=generation)
    return target


def demo_config(model_dir: Path) -> RunConfig:
    return RunConfig(
        models=[str(model_dir)],
        defenses=[spec for _, spec in DEMO_DEFENSES],
        tasks=[DEMO_TASK],
        judges=[DEMO_JUDGE],
        batch_size=32,
        max_new_tokens=24,
        seed=0,
        device="cpu",
    )


def defense_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per defense: the headline organism metrics (value and 95% interval)."""
    labels = {spec: label for label, spec in DEMO_DEFENSES}
    rows = []
    for rec in records:
        row: dict[str, Any] = {"defense": labels.get(rec["defense"], rec["defense"]), "spec": rec["defense"]}
        for key, _ in COLUMNS:
            m = rec["metrics"].get(key)
            row[key] = None if m is None else {"value": m["value"], "low": m["low"], "high": m["high"], "n": m["n"]}
        rows.append(row)
    return rows


def demo_table(rows: list[dict[str, Any]]) -> TextTable:
    """The printed table: one row per defense, each metric with its 95% interval."""
    out = []
    for row in rows:
        cells = [row["defense"]]
        for key, _ in COLUMNS:
            m = row[key]
            cells.append("n/a" if m is None else f"{m['value']:.2f} [{m['low']:.2f}, {m['high']:.2f}]")
        out.append(cells)
    return TextTable(None, ["defense", *[label for _, label in COLUMNS]], out)


def format_table(rows: list[dict[str, Any]]) -> str:
    return markdown([demo_table(rows)])


def draw_defenses(rows: list[dict[str, Any]], organism: str = DEMO_ORGANISM) -> Any:
    """Grouped bars per defense (refusal as text and with an image, benign answers with an image,
    picture questions), each with its 95% interval; a dot marks every value, so a zero reads as a
    measured zero on the baseline rather than as a missing bar. Returns the Figure (layout final)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.analysis.plot_text import wrap

    names = [wrap(r["defense"], 16) for r in rows]
    fig, ax = plt.subplots(figsize=(max(9.0, 1.1 * len(rows) + 2.5), 5.0), dpi=DPI, layout="constrained")
    width = 0.8 / len(COLUMNS)
    colours = plt.get_cmap("tab10")
    for k, (key, label) in enumerate(COLUMNS):
        xs = [i + (k - (len(COLUMNS) - 1) / 2) * width for i in range(len(rows))]
        ms = [r[key] or {"value": 0.0, "low": None, "high": None} for r in rows]
        values = [m["value"] for m in ms]
        low = [m["value"] - (m["low"] if m["low"] is not None else m["value"]) for m in ms]
        high = [(m["high"] if m["high"] is not None else m["value"]) - m["value"] for m in ms]
        ax.bar(xs, values, width * 0.92, label=label, color=colours(k), alpha=0.85)
        ax.errorbar(xs, values, yerr=[low, high], fmt="o", markersize=3.5, color="black", ecolor="black",
                    elinewidth=0.9, capsize=2, zorder=3, clip_on=False)
    ax.axhline(0.0, color="#444444", linewidth=0.8, zorder=2)
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylim(-0.04, 1.06)
    ax.set_ylabel("rate (dots: value, whiskers: 95% interval)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"model organism ({organism}): refusal with an image, per defense", fontsize=10)
    fig.legend(loc="outside lower center", ncol=len(COLUMNS), fontsize=8, frameon=False)
    return fig


def plot_defenses(rows: list[dict[str, Any]], path: Path, organism: str = DEMO_ORGANISM) -> Path | None:
    """Write draw_defenses' chart to `path` (PNG); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = draw_defenses(rows, organism)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def what_changed(rows: list[dict[str, Any]]) -> str:
    """Each defense's effect on refusal with an image and on benign answers with an image, against
    `none`, in plain numbers (computed, so the text never disagrees with the table)."""
    base = next(r for r in rows if r["spec"] == "none")

    def delta(row: dict[str, Any], key: str) -> str:
        if row[key] is None or base[key] is None:
            return "n/a"
        return f"{row[key]['value'] - base[key]['value']:+.2f}"

    parts = [f"{r['defense']} {delta(r, 'refused_shape')} / {delta(r, 'helpful_shape')}" for r in rows if r is not base]
    return ("Against no defense, refusal with an image / benign answered with an image: " + "; ".join(parts) + ". "
            "The steering defenses act on hidden states; AdaShield and ECSO work only as far as the organism's "
            "safety-instruction and self-check skills, learned as text, carry over to inputs with a picture.")


def run_demo(out: Path, progress: bool = True) -> list[dict[str, Any]]:
    model_dir = shipped_organism()
    records = [r.to_json() for r in run(demo_config(model_dir), out, progress=progress)]
    rows = defense_table(records)
    print(f"Model organism {model_dir.name}: a tiny LLaVA trained to refuse harmful requests as text and to lose "
          "that refusal when a picture is attached (engineered on purpose; see its MODEL_CARD.md).")
    print(f"Task {DEMO_TASK} (30 harmful, 60 benign requests per input, 16 picture questions), "
          f"judge {DEMO_JUDGE}; 95% bootstrap intervals.\n")
    show([demo_table(rows)])
    png = plot_defenses(rows, out / "demo.png", model_dir.name)
    print("\n" + what_changed(rows))
    print(f"\nrun directory: {out} (realign report {out})" + (f"; plot: {png}" if png else " (install matplotlib for the plot)"))
    return rows
