"""The run directory under faults: one writer at a time, setup failures that do not block the fix,
SIGTERM, a full disk, a record missing its newline, and kills at random points.

Model-backed runs use the shipped organism (a real 1 M-parameter VLM: a run of a few hundred samples
takes seconds) through the `realign` command, in-process or in a subprocess as a user runs it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
ORGANISM = str(REPO / "organisms" / "seed0")


def run_args(out: Path, *extra: str, limit: int = 40, task: str = "organism:templates=1,images=none+shape") -> list[str]:
    return ["run", "--model", ORGANISM, "--task", task, "--judge", "keywords:preset=organism",
            "--limit", str(limit), "--batch-size", "8", "--max-new-tokens", "24", "--device", "cpu",
            "--out", str(out), "--quiet", *extra]


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def without_timings(out: Path) -> dict[str, list[dict]]:
    """Every generation and verdict file of a run, records without their timings, by relative path."""
    files = sorted(out.rglob("generations.jsonl")) + sorted(out.rglob("verdicts/*.jsonl"))
    return {str(p.relative_to(out)): [{k: v for k, v in r.items() if k != "timings"} for r in lines(p)]
            for p in files}


def results(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["results"]


# ---- one writer per run directory ------------------------------------------------------------
HOLDER = """
import sys, time
from harness.lock import run_lock
with run_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(60)
"""


@contextlib.contextmanager
def holder(out: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    with holder(out) as proc:
        start = time.perf_counter()
        assert main(run_args(out)) == 2
        err = capsys.readouterr().err
        assert time.perf_counter() - start < 10  # refused at once, not after waiting
        assert f"pid {proc.pid}" in err and "test holder" in err and err.count("\n") == 1
        assert main(["judge", str(out), "--judge", "keywords"]) == 2  # no run.json yet: a clear error too
        capsys.readouterr()
        proc.send_signal(signal.SIGKILL)  # the holder dies without releasing anything
        proc.wait()
        assert main(run_args(out)) == 0  # the kernel released its lock: taken over safely
    gens = next(out.rglob("generations.jsonl"))
    ids = [r["sample_id"] for r in lines(gens)]
    assert len(ids) == len(set(ids)) == 40


def test_two_concurrent_runs_never_duplicate_samples(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness", *run_args(out, limit=120)]
    first = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    first_err = first.communicate(timeout=300)[1]
    codes = sorted([first.returncode, second.returncode])
    assert codes in ([0, 2], [0, 0]), (codes, first_err, second.stderr)  # [0, 0]: the first had finished
    if codes == [0, 2]:
        assert "is being written by pid" in (second.stderr + first_err)
    for path in out.rglob("generations.jsonl"):
        ids = [r["sample_id"] for r in lines(path)]
        assert len(ids) == len(set(ids))
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


# ---- setup failures do not block the corrected command ----------------------------------------
def test_a_typo_in_a_calibration_spec_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    bad = "cmrm:calibration=organism:split=calibratoin"
    assert main(run_args(out, "--defense", bad)) == 2
    assert "calibratoin" in capsys.readouterr().err
    assert not (out / "run.json").exists()
    assert main(run_args(out, "--defense", "cmrm:calibration=organism:split=calibration")) == 0


def test_a_model_that_does_not_load_leaves_a_directory_the_fix_can_use(tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(out)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert main(args) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert main(run_args(out)) == 0  # another configuration, but nothing was generated: accepted
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_sigterm_marks_the_run_interrupted_and_it_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness", *run_args(out, "--batch-size", "4", limit=400, task="organism")]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.stat().st_size for p in out.rglob("generations.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["sessions"][-1]["finished_at"]
    resumed = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(lines(next(out.rglob("generations.jsonl")))) == 400


# ---- a complete last record without its newline ----------------------------------------------
def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    out = tmp_path / "run"
    assert main(run_args(out, limit=16)) == 0
    gens = next(out.rglob("generations.jsonl"))
    gens.write_bytes(gens.read_bytes().rstrip(b"\n"))  # what a full disk can leave
    kept = lines(gens)
    assert main(run_args(out, limit=24)) == 0  # resumes: no KeyError, nothing regenerated twice
    after = lines(gens)
    assert after[:16] == kept and len(after) == 24 and len({r["sample_id"] for r in after}) == 24


# ---- a full disk under the run directory -----------------------------------------------------
@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of `size` at `path` where the platform allows mounting one (root in a namespace that
    permits it); False (and a plain folder) elsewhere, where the test injects ENOSPC instead."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_is_a_clear_error_with_nothing_torn_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    with small_filesystem(tmp_path / "small", "48k") as mounted:
        out = tmp_path / "small" / "run"
        if not mounted:  # inject: the third fsync of a records file fails as a full disk would
            import harness.store as store

            calls = {"n": 0}
            real = os.fsync

            def fsync(fd: int) -> None:
                calls["n"] += 1
                if calls["n"] == 6:
                    raise OSError(errno.ENOSPC, "No space left on device")
                real(fd)

            monkeypatch.setattr(store.os, "fsync", fsync)
        assert main(run_args(out, limit=200, task="organism")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err and "Traceback" not in err
        assert not list(out.rglob(".*.tmp*"))  # no stale temporary files
        for path in out.rglob("*.jsonl"):
            lines(path)  # every line parses: nothing torn
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=16m", str(tmp_path / "small")], check=True)
        else:
            monkeypatch.undo()
        assert main(run_args(out, limit=200, task="organism")) == 0
        resumed = without_timings(out)
        assert main(run_args(tmp_path / "clean", limit=200, task="organism")) == 0
        assert resumed == without_timings(tmp_path / "clean")


# ---- kills at random points --------------------------------------------------------------------
def test_random_kills_during_fitting_generation_and_judging_leave_the_same_outputs(tmp_path):
    """Seeded SIGKILLs at random moments of a two-defense run (CMRM fitted on the fly, then
    generation and judging); every resume continues, and the final files equal an uninterrupted run."""
    rng = random.Random(13)
    defenses = ["--defense", "none", "cmrm:calibration=organism:split=calibration"]
    cmd = [sys.executable, "-m", "harness", *run_args(tmp_path / "killed", *defenses, limit=120)]
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    clean = subprocess.run([sys.executable, "-m", "harness", *run_args(tmp_path / "clean", *defenses, limit=120)],
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert kills >= 1
    assert without_timings(tmp_path / "killed") == without_timings(tmp_path / "clean")
    assert results(tmp_path / "killed") == results(tmp_path / "clean")
