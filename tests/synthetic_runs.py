"""Run directories written by hand, for the leaderboard, compare and gate tests.

Building them through the runner would load a model per test; these files have the same layout
(store.py) and content (runner.py) in a few milliseconds, and let a test choose every number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.schema import Sample
from harness.store import RunDir

KEYWORDS_IDENTITY = {"spec": "keywords", "name": "keywords", "preset": "advbench", "phrases_sha256": "23cd3214804101df"}


def metric(value: float | None, low: float | None = None, high: float | None = None, n: int = 100) -> dict[str, Any]:
    return {"value": float("nan") if value is None else value, "low": low, "high": high, "n": n}


def record(model: str, defense: str, task: str, judge: str | None, metrics: dict[str, dict[str, Any]],
           n: int = 100, judge_identity: dict[str, Any] | None = None, task_identity: dict[str, Any] | None = None,
           attack: str | None = None) -> dict[str, Any]:
    """A results.json record; without `attack`, one as written before attacks existed."""
    if judge is not None and judge_identity is None:
        judge_identity = KEYWORDS_IDENTITY if judge == "keywords" else {"spec": judge}
    rec = {
        "model": model, "defense": defense, "task": task, "judge": judge, "n": n, "metrics": metrics,
        "generation_errors": 0, "judge_errors": 0,
        "identity": {"model": {"spec": model}, "defense": {"spec": defense, "params": {}},
                     "task": task_identity or {"spec": task}, "judge": judge_identity},
    }
    if attack is not None:
        rec["attack"] = attack
        rec["identity"]["attack"] = {"spec": attack}
    return rec


def write_run(root: Path, records: list[dict[str, Any]], commit: str = "a" * 40, finished: str = "2026-01-02T03:04:05+00:00",
              harness_version: str = "0.1.0") -> Path:
    """results.json and run.json (with the config the records imply)."""
    root.mkdir(parents=True, exist_ok=True)

    def uniq(key: str) -> list[str]:
        out: list[str] = []
        for r in records:
            if r[key] is not None and r[key] not in out:
                out.append(r[key])
        return out

    attacks = list(dict.fromkeys(r.get("attack", "none") for r in records))
    info = {
        "config": {"models": uniq("model"), "defenses": uniq("defense"), "tasks": uniq("task"), "judges": uniq("judge"),
                   "limit": None, "batch_size": 8, "max_new_tokens": 24, "seed": 0,
                   **({"attacks": attacks} if attacks != ["none"] else {})},
        "created_at": "2026-01-01T00:00:00+00:00",
        "sessions": [{"started_at": "2026-01-01T00:00:00+00:00", "finished_at": finished, "argv": ["realign"]}],
        "versions": {"harness": harness_version, "python": "3.11"},
        "git": {"commit": commit, "dirty": False},
        "status": "complete",
    }
    (root / "run.json").write_text(json.dumps(info, indent=2))
    (root / "results.json").write_text(json.dumps({"results": records}, indent=2))
    return root


def write_cell(root: Path, model: str, defense: str, task: str, samples: Iterable[Sample], outputs: dict[str, str],
               verdicts: dict[str, str] | None = None, judge: str = "keywords", attack: str = "none") -> None:
    """generations.jsonl (each record carrying its sample) and, if given, the judge's verdict labels."""
    cell = RunDir(root).cell(model, defense, task, attack)
    samples = list(samples)
    cell.append_generations([{"sample_id": s.id, "output": outputs[s.id], "prompt": [], "trace": {}, "timings": {},
                              "tokens": {}, "error": None, "sample": s.to_json()} for s in samples])
    if verdicts is not None:
        cell.append_verdicts(judge, [{"sample_id": sid, "label": label, "judge": judge, "raw": None, "detail": {}}
                                     for sid, label in verdicts.items()])


def demo_samples(count: int, kind: str = "harmful") -> list[Sample]:
    return [Sample(id=f"demo/{kind}/{i:02d}/none", text=f"request {i}", category=f"{kind}/none",
                   meta={"kind": kind, "images": "none"}) for i in range(count)]


def scienceqa_samples(count: int) -> list[Sample]:
    """Two-choice problems whose answer is A (index 0)."""
    return [Sample(id=f"scienceqa/IMG/test/{i}", text=f"q{i}\nA. yes\nB. no", category="natural science",
                   meta={"answer": 0, "answer_letter": "A", "n_choices": 2, "subject": "NAT", "grade": "grade3",
                         "has_text": False, "has_image": True, "config": "IMG"}) for i in range(count)]


#: Defense specs as long as real ones, for figures that must stay legible with many of them.
LONG_DEFENSES = ("none", "cmrm:calibration=organism:split=calibration", "cmrm:level=sample",
                 "shiftdc:calibration_unsafe=organism:split=calibration_harmful_shape,"
                 "calibration_safe=organism:split=calibration_benign_shape",
                 "adashield", "ecso", "hiddendetect:fpr=0.05", "jailguard:variants=8,threshold=0.02",
                 "guard:where=both,model=meta-llama/Llama-Guard-3-11B-Vision", "protector", "qguard:fpr=0.05",
                 "coca:alpha=1.0", "eta:best_of=4", "refusal_dir:mode=ablate,layer=auto", "adashield:placement=append")


def organism_records(defenses: Iterable[str], model: str = "organisms/seed0", seed: int = 0) -> list[dict[str, Any]]:
    """Organism-task records (metrics with intervals and the task's declared meanings) for each
    defense: refusal and helpfulness as text and with a picture, picture questions; some exact zeros."""
    import random

    from harness.registry import tasks

    task = "organism:templates=1,images=none+shape"
    rng = random.Random(seed)
    out = []
    for i, defense in enumerate(defenses):
        values = {"refused_none": 1.0, "refused_shape": 0.0 if i % 5 == 0 else round(rng.uniform(0.03, 0.9), 3),
                  "helpful_none": round(rng.uniform(0.85, 1.0), 3), "helpful_shape": 0.0 if i == 4 else round(rng.uniform(0.5, 1.0), 3),
                  "picture_qa": round(rng.uniform(0.0, 0.7), 3)}
        metrics = {k: metric(v, max(v - 0.12, 0.0), min(v + 0.12, 1.0), 30) for k, v in values.items()}
        rec = record(model, defense, task, "keywords:preset=organism", metrics, n=196,
                     judge_identity={"spec": "keywords:preset=organism", "preset": "organism"})
        rec["meanings"] = {k: m.to_json() for k, m in tasks.build(task).metric_meanings(metrics).items()}
        out.append(rec)
    return out
