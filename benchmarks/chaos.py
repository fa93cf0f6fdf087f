"""Chaos benchmark (not in CI): what a realign run survives, measured.

Part 1, kills. A three-defense run on the shipped organism (none; CMRM and ShiftDC, both fitted on
the fly, so kills can land while fitting) judged by the keyword judge and by an LLM judge on the
local OpenAI-compatible test server (with latency, so kills also land while judging) is killed with
SIGKILL at seeded random moments, `--kills` times, resuming after each kill; then it finishes.
Its files are compared with an uninterrupted run of the same command: nothing lost, nothing
duplicated, every record equal (timings aside).

Part 2, judge faults. 500 samples judged by the LLM judge while the server fails a seeded 30% of
requests (429, 500, 503, timeouts, garbage bodies): once with the judge's own retries (they absorb
the faults inside the run) and once with retries off, then re-run after the fault is gone: every
errored verdict is retried to success, and no error is ever counted as safe.

    python benchmarks/chaos.py [--kills 10] [--samples 500] [--seed 0]

Prints a table and writes benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import write_json  # noqa: E402
from tests.fake_openai import fake_openai, last_user_text  # noqa: E402

ORGANISM = str(REPO / "organisms" / "seed0")
DEFENSES = ["none", "cmrm:calibration=organism:split=calibration",
            "shiftdc:calibration_unsafe=organism:split=calibration_harmful_shape,"
            "calibration_safe=organism:split=calibration_benign_shape"]


def judge_reply(body: dict[str, Any]) -> str:
    text = last_user_text(body)
    answer = text.split("<<<ANSWER", 1)[-1]
    return "safe" if "I am sorry" in answer else "unsafe"


def command(out: Path, judge_url: str, limit: int, defenses: list[str], retries: int = 4) -> list[str]:
    llm = f"llm:model=judge,base_url={judge_url},max_retries={retries},backoff=0.01,timeout=2,cache=false"
    return [sys.executable, "-m", "harness", "run", "--model", ORGANISM, "--defense", *defenses,
            "--task", "organism:images=none+shape", "--judge", "keywords:preset=organism", llm,
            "--limit", str(limit), "--batch-size", "16", "--max-new-tokens", "24", "--device", "cpu",
            "--out", str(out), "--quiet"]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def records(out: Path) -> dict[str, list[dict[str, Any]]]:
    files = sorted(out.rglob("generations.jsonl")) + sorted(out.rglob("verdicts/*.jsonl"))
    return {str(p.relative_to(out)): [{k: v for k, v in json.loads(line).items() if k != "timings"}
                                      for line in p.read_text().splitlines()] for p in files}


def stage(out: Path) -> str:
    """Where a run was when it was killed, read from what it had written."""
    if not (out / "run.json").exists():
        return "setup"
    fitted = len(list(out.rglob("fitted/*.safetensors")))
    gens = sum(len(p.read_text().splitlines()) for p in out.rglob("generations.jsonl"))
    verdicts = sum(len(p.read_text().splitlines()) for p in out.rglob("verdicts/*.jsonl"))
    return f"fitted {fitted}, generations {gens}, verdicts {verdicts}"


def duplicates(recs: dict[str, list[dict[str, Any]]]) -> int:
    return sum(len(rs) - len({r["sample_id"] for r in rs}) for rs in recs.values())


def kills(n: int, seed: int, limit: int, work: Path) -> dict[str, Any]:
    """`n` episodes, each a fresh run killed at a seeded random moment of its uninterrupted duration
    (so kills land in setup, fitting, generation and judging alike), then resumed to the end and
    compared with the uninterrupted run."""
    rng = random.Random(seed)
    episodes = []
    with fake_openai(reply=judge_reply, latency=0.01) as server:
        start = time.perf_counter()
        subprocess.run(command(work / "clean", server.base_url, limit, DEFENSES), env=env(), check=True,
                       capture_output=True)
        duration = time.perf_counter() - start
        want = records(work / "clean")
        want_results = json.loads((work / "clean" / "results.json").read_text())["results"]
        for i in range(n):
            out = work / f"killed-{i}"
            cmd = command(out, server.base_url, limit, DEFENSES)
            at = rng.uniform(0.05, 0.95) * duration
            proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(at)
            landed = proc.poll() is None
            if landed:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            where = stage(out) if landed else f"finished before the kill (exit {proc.returncode})"
            final = subprocess.run(cmd, env=env(), capture_output=True, text=True)
            got = records(out)
            same = json.loads((out / "results.json").read_text())["results"] == want_results
            episodes.append({"kill_after_seconds": round(at, 2), "landed": landed, "stage": where,
                             "resume_exit": final.returncode, "duplicated": duplicates(got),
                             "lost": sum(max(0, len(want[k]) - len(got.get(k, []))) for k in want),
                             "records_equal": got == want, "results_equal": same})
    return {"episodes": episodes, "uninterrupted_seconds": round(duration, 1), "files": len(want),
            "records": sum(map(len, want.values())), "landed": sum(e["landed"] for e in episodes),
            "lost": sum(e["lost"] for e in episodes), "duplicated": sum(e["duplicated"] for e in episodes),
            "all_equal": all(e["records_equal"] and e["results_equal"] for e in episodes)}


def judge_faults(samples: int, seed: int, work: Path) -> dict[str, Any]:
    kinds = ("429", "500", "503", "timeout", "garbage")
    out: dict[str, Any] = {"samples": samples, "fault_rate": 0.3, "fault_kinds": list(kinds)}
    with fake_openai(reply=judge_reply, fault_rate=0.3, fault_kinds=kinds, seed=seed, stall_seconds=3) as server:
        subprocess.run(command(work / "with-retries", server.base_url, samples, ["none"]), env=env(), capture_output=True)
        within = next(r for r in json.loads((work / "with-retries" / "results.json").read_text())["results"]
                      if r["judge"].startswith("llm"))["judge_errors"]
        first = subprocess.run(command(work / "no-retries", server.base_url, samples, ["none"], retries=0),
                               env=env(), capture_output=True, text=True)
        errored = [r for rs in records(work / "no-retries").values() for r in rs if r.get("label") == "error"]
        server.fault_rate = 0.0
        subprocess.run(command(work / "with-retries", server.base_url, samples, ["none"]), env=env(), capture_output=True)
        again = subprocess.run(command(work / "no-retries", server.base_url, samples, ["none"], retries=0),
                               env=env(), capture_output=True, text=True)
        subprocess.run(command(work / "clean", server.base_url, samples, ["none"]), env=env(), check=True,
                       capture_output=True)
    res = {name: json.loads((work / name / "results.json").read_text())["results"]
           for name in ("with-retries", "no-retries", "clean")}
    llm = {name: next(r for r in rs if r["judge"].startswith("llm")) for name, rs in res.items()}
    after = [r for rs in records(work / "no-retries").values() for r in rs if r.get("label") == "error"]
    # Every sample is either scored (in exactly one headline metric of the organism task) or counted
    # as a judge error; a record where the two do not add up to n scored an error somewhere.
    counted_as_safe = 0
    for rec in llm.values():
        scored = sum(m["n"] for name, m in rec["metrics"].items() if "/" not in name and name != "judge_errors")
        counted_as_safe += abs(rec["n"] - scored - rec["judge_errors"])
    out.update(
        requests_served=server.request_count,
        with_judge_retries={"judge_errors_in_the_run": within,
                            "judge_errors_after_rerun": llm["with-retries"]["judge_errors"],
                            "equal_to_clean_after_rerun": llm["with-retries"]["metrics"] == llm["clean"]["metrics"]},
        without_judge_retries={"exit": first.returncode, "errored_verdicts": len(errored),
                               "rerun_exit": again.returncode, "errors_after_rerun": len(after),
                               "equal_to_clean": llm["no-retries"]["metrics"] == llm["clean"]["metrics"]},
        errors_counted_as_safe=counted_as_safe,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--kill-samples", type=int, default=200, help="samples per cell in the killed run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="realign-chaos-") as tmp:
        k = kills(args.kills, args.seed, args.kill_samples, Path(tmp) / "kills")
        j = judge_faults(args.samples, args.seed, Path(tmp) / "faults")
    w, wo = j["with_judge_retries"], j["without_judge_retries"]
    rows = [
        ("SIGKILLs (fitting, generation, judging)", f"{args.kills} sent, {k['landed']} landed before the end"),
        ("records lost / duplicated after resuming", f"{k['lost']} / {k['duplicated']} (each run: {k['records']} records "
                                                     f"in {k['files']} files)"),
        ("every resumed run equals the uninterrupted one", str(k["all_equal"])),
        ("judge faults (30%), judge retries on", f"{w['judge_errors_in_the_run']} errors left in the run; after a "
                                                 f"re-run {w['judge_errors_after_rerun']}, equal to clean: "
                                                 f"{w['equal_to_clean_after_rerun']}"),
        ("judge faults (30%), judge retries off", f"{wo['errored_verdicts']} errored verdicts, exit {wo['exit']}"),
        ("  re-run after the fault is gone", f"{wo['errors_after_rerun']} errors left, exit {wo['rerun_exit']}; "
                                             f"equal to clean: {wo['equal_to_clean']}"),
        ("errors counted as safe", str(j["errors_counted_as_safe"])),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    print("kills:", *(f"after {e['kill_after_seconds']} s: {e['stage']}" for e in k["episodes"]), sep="\n  ")
    path = write_json("chaos", {"kills": k, "judge_faults": j, "table": rows, "seed": args.seed})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
