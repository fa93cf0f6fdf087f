"""Every defense on the shipped organisms (both seeds of both generations): the tables in
benchmarks/results/organism.json and the README.

Run `python -m organism.results [--out runs/organism-defenses]`. Each defense runs with its
defaults (CMRM and ShiftDC defaults were set by the sweep; see the README, "Choosing the CMRM and ShiftDC defaults"), calibrated
on the task's calibration split, through the normal runner, on the full held-out test split as text
only and with a shape picture (generation 2: also its skill sets, so a defense's cost on a skill
shows). Sweep tables given with `--sweep NAME=DIR` are stored alongside.
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
#: The demo's defenses (same defaults), then every other one, calibrated on the organism's own
#: calibration splits (picture inputs, shaped like the evaluated ones). `guard`, `protector` and `eta`
#: are absent: they need a trained Llama Guard, harm detector or reward model and CLIP, which no
#: organism ships (see the README).
DEFENSES = DEMO_DEFENSES + (
    ("HiddenDetect", "hiddendetect:calibration_unsafe=organism:split=calibration_harmful_shape,"
                     "calibration_safe=organism:split=calibration_benign_shape"),
    ("JailGuard", f"jailguard:calibration=organism:split=calibration_benign_shape,"
                  f"calibration_max_new_tokens={CARD_MAX_NEW_TOKENS}"),
    ("QGuard (self)", "qguard:guard=self,calibration=organism:split=calibration_benign_shape"),
    ("CoCA", "coca"),
    # The public selection's KL limit (0.1) discards every candidate on a 4-layer model, so it is
    # relaxed; alpha and positions are the organism sweep's pick (README, "refusal direction").
    ("Refusal direction", "refusal_dir:calibration_unsafe=organism:split=calibration_harmful,"
                          "calibration_safe=organism:split=calibration_benign,kl_threshold=2,"
                          "alpha=0.25,positions=last_prompt"),
)
KEYS = ("refused_none", "refused_shape", "helpful_none", "helpful_shape", "picture_qa")


SKILL_KEYS = ("refused_instructed_none", "helpful_instructed_none", "selfcheck_acc_none", "selfcheck_acc_shape",
              "guard_acc_none", "guard_acc_shape", "caption_qa")
GENERATIONS = {1: ("seed0", "seed1"), 2: ("gen2-seed0", "gen2-seed1")}


def measure(names: list[str], out: Path, progress: bool, gen2_templates: int | None = None) -> list[dict[str, Any]]:
    """Every defense (defaults) on each organism folder, through the normal runner; generation-2
    folders also run the skill sets, so a defense's cost on a skill shows."""
    from harness.runner import run
    from organism.card import generation_of

    rows = []
    for name in names:
        folder = ROOT / "organisms" / name
        generation = generation_of(folder)
        task = TASK + (",skills=true" if generation >= 2 else "")
        if generation >= 2 and gen2_templates:  # a slice of the held-out templates (the skill sets stay whole)
            task += f",templates={gen2_templates}"
        config = RunConfig(models=[str(folder)], defenses=[spec for _, spec in DEFENSES], tasks=[task],
                           judges=[CARD_JUDGE], batch_size=CARD_BATCH_SIZE, max_new_tokens=CARD_MAX_NEW_TOKENS,
                           seed=0, device="cpu")
        start = time.perf_counter()
        records = run(config, out / name, progress=progress)
        labels = {spec: label for label, spec in DEFENSES}
        seed = int(name.rsplit("seed", 1)[1])
        for rec in records:
            m = rec.metrics
            rows.append({"organism": name, "generation": generation, "seed": seed, "defense": labels[rec.defense],
                         "spec": rec.defense, "task": task,
                         **{k: {"value": round(m[k].value, 4), "low": round(m[k].low, 4), "high": round(m[k].high, 4),
                                "n": m[k].n} for k in KEYS + SKILL_KEYS if k in m}})
        print(f"{name}: {time.perf_counter() - start:.0f} s")
    return rows


def markdown(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("refused_none", "refused_shape", "helpful_shape",
                                                                   "picture_qa")) -> str:
    """Defense x metrics, one table per generation, `seed 0 / seed 1` in each cell."""
    heads = {"refused_none": "refused, text only", "refused_shape": "refused, with image",
             "helpful_shape": "benign answered, with image", "picture_qa": "picture QA",
             "selfcheck_acc_shape": "self-check right, with image", "guard_acc_shape": "guard question right, with image",
             "refused_instructed_none": "refused, text + safety instruction"}
    out = []
    for generation in sorted({r.get("generation", 1) for r in rows}):
        mine = [r for r in rows if r.get("generation", 1) == generation]
        names = list(dict.fromkeys(r.get("organism", f"seed{r['seed']}") for r in mine))
        by = {(r["defense"], r.get("organism", f"seed{r['seed']}")): r for r in mine}
        cols = [k for k in keys if any(k in r for r in mine)]
        sliced = sorted({t.split("templates=")[1].split(",")[0] for t in (r.get("task", "") for r in mine) if "templates=" in t})
        split = f"templates={'+'.join(sliced)} of the held-out test split" if sliced else "full held-out test split"
        out += [f"Generation {generation} ({' / '.join(names)}); {split}; {CARD_JUDGE}.", "",
                "| " + " | ".join(["defense", *(heads.get(k, k) for k in cols)]) + " |", "|" + "---|" * (len(cols) + 1)]
        for label, _ in DEFENSES:
            cells = [label]
            for key in cols:
                vals = [by[(label, n)][key]["value"] if (label, n) in by and key in by[(label, n)] else None for n in names]
                cells.append(" / ".join("-" if v is None else f"{v:.2f}" for v in vals))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/organism-defenses")
    p.add_argument("--organisms", default="seed0,seed1,gen2-seed0,gen2-seed1",
                   help="folders under organisms/, comma-separated")
    p.add_argument("--sweep", action="append", default=[], help="NAME=SWEEP_DIR (its sweep.json is stored)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "organism.json"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--gen2-templates", type=int, default=None,
                   help="generation 2: only the first N of the 6 held-out templates (a cheaper slice; recorded per row)")
    args = p.parse_args(argv)
    rows = measure(args.organisms.split(","), Path(args.out), not args.quiet, args.gen2_templates)
    previous = Path(args.json)
    # Sweep tables stored before are kept (a sweep is not re-run here); given ones replace them by name.
    sweeps = json.loads(previous.read_text()).get("sweeps", {}) if previous.is_file() else {}
    for item in args.sweep:
        name, _, folder = item.partition("=")
        sweeps[name] = json.loads((Path(folder) / "sweep.json").read_text())
    table = markdown(rows)
    if any(r.get("generation", 1) >= 2 for r in rows):
        table += "\n\n" + markdown([r for r in rows if r.get("generation", 1) >= 2],
                                     ("selfcheck_acc_shape", "guard_acc_shape", "refused_instructed_none"))
    result = {"benchmark": "organism", "task": TASK, "judge": CARD_JUDGE, "max_new_tokens": CARD_MAX_NEW_TOKENS,
              "git": git_commit(), "host": host_info(), "rows": rows, "table_md": table, "sweeps": sweeps}
    Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
