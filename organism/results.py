"""Every defense on both shipped organisms: the table in benchmarks/results/organism.json and the README.

Run `python -m organism.results [--out runs/organism-defenses]`. Each defense runs with its
defaults (CMRM and ShiftDC defaults were set by the sweep; see the README, "Choosing the CMRM and ShiftDC defaults"), calibrated
on the task's calibration split, through the normal runner, on the full held-out test split as text
only and with a shape picture. Sweep tables given with `--sweep NAME=DIR` are stored alongside.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from organism.card import CARD_BATCH_SIZE, CARD_JUDGE, CARD_MAX_NEW_TOKENS
from organism.demo import DEMO_DEFENSES
from harness.provenance import git_commit, host_info
from harness.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TASK = "organism:images=none+shape"
DEFENSES = DEMO_DEFENSES  # the same defaults as the demo, on the full test split
KEYS = ("refused_none", "refused_shape", "helpful_none", "helpful_shape", "picture_qa")


def measure(seeds: list[int], out: Path, progress: bool) -> list[dict[str, Any]]:
    from harness.runner import run

    rows = []
    for seed in seeds:
        folder = ROOT / "organisms" / f"seed{seed}"
        config = RunConfig(models=[str(folder)], defenses=[spec for _, spec in DEFENSES], tasks=[TASK],
                           judges=[CARD_JUDGE], batch_size=CARD_BATCH_SIZE, max_new_tokens=CARD_MAX_NEW_TOKENS,
                           seed=0, device="cpu")
        start = time.perf_counter()
        records = run(config, out / f"seed{seed}", progress=progress)
        names = {spec: name for name, spec in DEFENSES}
        for rec in records:
            m = rec.metrics
            rows.append({"seed": seed, "defense": names[rec.defense], "spec": rec.defense,
                         **{k: {"value": round(m[k].value, 4), "low": round(m[k].low, 4), "high": round(m[k].high, 4),
                                "n": m[k].n} for k in KEYS if k in m}})
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """Defense x (refused / benign answered, with an image) for seed 0 / seed 1."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["defense"], r["seed"]): r for r in rows}
    head = ["defense", "refused, text only", "refused, with image", "benign answered, with image", "picture QA"]
    lines = [f"Seeds {' / '.join(map(str, seeds))}; full held-out test split; keywords:preset=organism.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, _ in DEFENSES:
        cells = [name]
        for key in ("refused_none", "refused_shape", "helpful_shape", "picture_qa"):
            vals = [by[(name, s)][key]["value"] if (name, s) in by and key in by[(name, s)] else float("nan") for s in seeds]
            cells.append(" / ".join(f"{v:.2f}" for v in vals))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/organism-defenses")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--sweep", action="append", default=[], help="NAME=SWEEP_DIR (its sweep.json is stored)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "organism.json"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rows = measure([int(s) for s in args.seeds.split(",")], Path(args.out), not args.quiet)
    previous = Path(args.json)
    # Sweep tables stored before are kept (a sweep is not re-run here); given ones replace them by name.
    sweeps = json.loads(previous.read_text()).get("sweeps", {}) if previous.is_file() else {}
    for item in args.sweep:
        name, _, folder = item.partition("=")
        sweeps[name] = json.loads((Path(folder) / "sweep.json").read_text())
    table = markdown(rows)
    result = {"benchmark": "organism", "task": TASK, "judge": CARD_JUDGE, "max_new_tokens": CARD_MAX_NEW_TOKENS,
              "git": git_commit(), "host": host_info(), "rows": rows, "table_md": table, "sweeps": sweeps}
    Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
