"""Data-parallel runs (issue 19 part 1): `torchrun --standalone --nproc_per_node 2 -m harness.cli run ...`
on the CPU (gloo) gives the very records and results of a single-process run, fits a defense once,
and resumes a run begun with another number of processes.

The model is the shipped organism (a real 1 M-parameter VLM); each launch takes a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.distributed import Shard, env_world
from harness.errors import DataError

REPO = Path(__file__).resolve().parents[1]
ORGANISM = str(REPO / "organisms" / "seed0")
DEFENSES = ["none", "cmrm:calibration=organism:split=calibration"]


def run_args(out: Path, limit: int) -> list[str]:
    # 20 samples in batches of 4: 5 batches, so rank 1 has an empty batch in the last round.
    return ["run", "--model", ORGANISM, "--task", "organism:templates=1,images=shape", "--defense", *DEFENSES,
            "--judge", "keywords:preset=organism", "--limit", str(limit), "--batch-size", "4",
            "--max-new-tokens", "12", "--device", "cpu", "--out", str(out), "--quiet"]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "harness.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(out: Path) -> dict[str, list[dict]]:
    """Every generation and verdict file, in file order, records without their timings."""
    files = sorted(out.rglob("generations.jsonl")) + sorted(out.rglob("verdicts/*.jsonl"))
    return {str(p.relative_to(out)): [{k: v for k, v in json.loads(line).items() if k != "timings"}
                                      for line in p.read_text().splitlines()] for p in files}


def results(out: Path) -> list[dict]:
    keep = ("model", "attack", "defense", "task", "judge", "n", "metrics", "generation_errors", "judge_errors",
            "identity")
    return [{k: r.get(k) for k in keep} for r in json.loads((out / "results.json").read_text())["results"]]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("dp") / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(run_args(out, 20)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_two_processes_write_what_one_writes(single, tmp_path):
    out = tmp_path / "dp"
    proc = torchrun(run_args(out, 20))
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports; rank 1 exits 0 quietly
    got, want = records(out), records(single)
    assert got == want and len(want) == 4 and all(len(v) == 20 for v in want.values())
    outputs = [[r["output"] for r in v] for f, v in want.items() if "generations" in f]
    assert outputs[0] != outputs[1] and len(set(outputs[0] + outputs[1])) > 2  # CMRM changes answers; not all alike
    assert results(out) == results(single)
    assert sorted(p.name for p in out.rglob("fitted/*.safetensors")) == sorted(
        p.name for p in single.rglob("fitted/*.safetensors"))  # fitted once, by rank 0, where one process puts it
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["sessions"][-1]["processes"] == 2
    assert not list(out.rglob("*.tmp*")) and not (out / ".realign.lock.json").exists()


def test_resume_with_another_number_of_processes(single, tmp_path):
    import torch

    out = tmp_path / "dp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(run_args(out, 8)) == 0  # one process begins: 8 samples
    finally:
        torch.set_num_threads(threads)
    torchrun(run_args(out, 20))  # two processes finish: 12 pending samples each cell (3 batches)
    # The same records; in another file order, since the first session ordered its 8 samples alone.
    by_id = lambda recs: {f: sorted(lines, key=lambda r: r["sample_id"]) for f, lines in recs.items()}  # noqa: E731
    assert by_id(records(out)) == by_id(records(single))
    assert results(out) == results(single)
    assert [s.get("processes") for s in json.loads((out / "run.json").read_text())["sessions"]] == [None, 2]


def test_batches_are_dealt_round_robin_in_single_process_order():
    pending = list(range(11))
    dealt = [list(Shard(rank, 3).rounds(pending, 2)) for rank in range(3)]
    assert dealt[0] == [[0, 1], [6, 7]] and dealt[1] == [[2, 3], [8, 9]] and dealt[2] == [[4, 5], [10]]
    assert list(Shard(1, 2).rounds(list(range(5)), 2)) == [[2, 3], []]  # same number of rounds on every rank
    assert list(Shard().rounds(pending, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert Shard().collect([{"a": 1}]) == [[{"a": 1}]] and Shard().collect([]) == []


def test_rank_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_world() == (0, 1, 0) and Shard.from_env() == Shard()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DataError, match="not within"):
        env_world()
