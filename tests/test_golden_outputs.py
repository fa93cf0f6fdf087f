"""Outputs recorded before the core was restructured must not move.

`tests/data/golden_outputs.json` holds, for the shipped organism (seed 0) and a tiny random LLaVA,
every generation record (output, prompt as sent, trace, token counts) of each defense on a small
mixed slice of the organism task, written by the code as it was before the calibration, judging
and steering stages were split out. A refactor that changes any token, prompt or traced number
fails here. Timings are left out (they vary run to run).

Record again only when a change is *meant* to move outputs:
`python -m tests.test_golden_outputs --record` (and say why in the commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_outputs.json"
CALIB = "calibration_limit=24"
# label -> spec. ShiftDC is pinned to what it computed before: direction fitted on the bare query
# and its old defaults (`layers=last`, `alpha=0.75`) spelled out.
DEFENSES = {
    "none": "none",
    "cmrm_dataset": f"cmrm:calibration=organism:split=calibration,{CALIB}",
    "cmrm_sample": "cmrm:level=sample",
    "shiftdc": ("shiftdc:layers=last,alpha=0.75,direction_input=query,calibration_unsafe=organism:split=calibration_harmful,"
                f"calibration_safe=organism:split=calibration_benign,{CALIB}"),
    "adashield": "adashield",
    "ecso": "ecso",
}
TASKS = {
    "harmful_shape": "organism:images=shape,templates=1,kinds=harmful",
    "benign_shape": "organism:images=shape,templates=1,kinds=benign",
    "picture": "organism:images=shape,templates=1,kinds=picture",
    "harmful_text": "organism:images=none,templates=1,kinds=harmful",
}
# The recorded batches: task order, 4 per batch (trace numbers such as CMRM's per-sample vector norms
# move in the last printed digit when the same samples are padded in other company).
SETTINGS = {"limit": 5, "batch_size": 4, "max_new_tokens": 16, "order": "task"}
KEPT = ("output", "prompt", "trace", "tokens", "error")


def produce(model: Path, out: Path, defenses: dict[str, str]) -> dict[str, Any]:
    """{defense label: {task label: [record without timings, ...]}} from one normal run."""
    import torch

    from harness.registry import tasks
    from harness.runner import run
    from harness.samples import load_samples
    from harness.schema import RunConfig
    from harness.store import RunDir

    torch.set_num_threads(1)
    config = RunConfig(models=[str(model)], defenses=list(defenses.values()), tasks=list(TASKS.values()),
                       judges=[], device="cpu", **SETTINGS)
    run(config, out, progress=False)
    rundir = RunDir(out)
    result: dict[str, Any] = {}
    for label, spec in defenses.items():
        for task_label, task_spec in TASKS.items():
            records = rundir.cell(str(model), spec, task_spec).generations()
            order = [s.id for s in load_samples(tasks.build(task_spec), config.limit)]  # the file is in generation order
            result.setdefault(label, {})[task_label] = [{k: records[i][k] for k in KEPT} for i in order]
    return result


def models(tmp: Path) -> dict[str, Path]:
    from harness.tiny import build_tiny_vlm

    return {"organism_seed0": ROOT / "organisms" / "seed0", "tiny_llava": build_tiny_vlm("llava", tmp / "llava", seed=0)}


@pytest.mark.parametrize("model_label", ["organism_seed0", "tiny_llava"])
def test_outputs_equal_those_recorded_before(model_label: str, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))["models"][model_label]
    got = produce(models(tmp_path)[model_label], tmp_path / "run", DEFENSES)
    assert set(got) == set(golden)
    for label in golden:
        for task_label, records in golden[label].items():
            mine = got[label][task_label]
            assert len(mine) == len(records), (label, task_label)
            for old, new in zip(records, mine):
                where = (model_label, label, task_label, old["trace"].get("caption"))
                for key in ("output", "prompt", "tokens", "error"):
                    assert new[key] == old[key], (*where, key)
                # Traces may gain fields; every field recorded before keeps its value.
                for key, value in old["trace"].items():
                    assert new["trace"].get(key) == value, (*where, "trace", key)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description="record tests/data/golden_outputs.json")
    parser.add_argument("--record", action="store_true", required=True)
    parser.add_argument("--shiftdc-spec", default=None, help="the spec that computes the pinned ShiftDC (old code)")
    args = parser.parse_args(argv)
    defenses = dict(DEFENSES)
    if args.shiftdc_spec:
        defenses["shiftdc"] = args.shiftdc_spec
    with tempfile.TemporaryDirectory() as tmp:
        out: dict[str, Any] = {"settings": SETTINGS, "tasks": TASKS, "defenses": defenses, "models": {}}
        for label, folder in models(Path(tmp)).items():
            out["models"][label] = produce(folder, Path(tmp) / f"run-{label}", defenses)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
