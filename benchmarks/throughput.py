"""Throughput of `realign run --defense none` against a bare batched `generate` loop and lm-eval's
`hf-multimodal`, same model, samples, batch sizes and token counts; and a data-parallel run.

    python benchmarks/throughput.py                        # 33 M LLaVA-style model, 32 FigStep samples x 32 tokens
    python benchmarks/throughput.py --batch-sizes 8 --repeats 1 --no-lm-eval --no-dp   # quicker

Each measurement is a fresh process (benchmarks/throughput_contenders.py says what its clock
covers); contenders run interleaved, in a rotating order, `--repeats` times per batch size, and the
ratios are of medians from this one run. Every repeat is in the JSON. The realign and bare answers
are compared (they must be equal, greedy float32), and every contender's completion token count is
recorded (exactly samples x tokens for realign and bare).

Data parallel: the same `realign run` as one process (torch's default threads) and as two processes
under `torchrun --standalone --nproc_per_node 2` (one thread each, torchrun's default), timed as
whole commands; the two runs' generations must be identical. On a 2-core CPU this shows the split
works and what it costs, not a speedup: two processes share the same two cores.

FigStep data: $REALIGN_FIGSTEP_DIR, else ../shared/data/figstep beside the checkout.
Writes benchmarks/results/throughput.json (`--name` for another file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import CPU_TEXT, bench_tokenizer, write_json  # noqa: E402
from benchmarks.throughput_contenders import realign_cli  # noqa: E402
from harness.registry import tasks  # noqa: E402
from harness.tiny import build_tiny_vlm  # noqa: E402


def figstep_data() -> Path:
    env = os.environ.get("REALIGN_FIGSTEP_DIR")
    folder = Path(env).expanduser() if env else REPO.parent / "shared" / "data" / "figstep"
    if not folder.is_dir():
        raise SystemExit(f"FigStep data not found at {folder}: set REALIGN_FIGSTEP_DIR to a copy of the release")
    return folder


def job_samples(task_spec: str, n: int) -> list[dict[str, Any]]:
    out = []
    for s in tasks.build(task_spec).samples():
        if not isinstance(s.image, str):
            raise SystemExit(f"{task_spec}: sample {s.id} has no image file (the benchmark reads the release's images)")
        out.append({"id": s.id, "text": s.text, "image": s.image})
        if len(out) == n:
            return out
    raise SystemExit(f"{task_spec} has only {len(out)} samples; --samples {n} asks for more")


def contender(name: str, job: dict[str, Any], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    job = {**job, "workdir": str(work)}
    (work / "job.json").write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "benchmarks.throughput_contenders", name, str(work / "job.json"), str(work / "result.json")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads((work / "result.json").read_text())
    result["process_seconds"] = wall
    return result


def generations(out: Path) -> dict[str, str]:
    return {g["sample_id"]: g["output"] for f in out.glob("*/none/*/generations.jsonl")
            for g in map(json.loads, f.read_text().splitlines())}


def data_parallel(model: str, task: str, n: int, batch: int, tokens: int, work: Path, repeats: int) -> dict[str, Any]:
    """One process vs two under torchrun, whole commands timed, interleaved."""
    rows: dict[str, list[float]] = {"1 process": [], "2 processes (torchrun)": []}
    same = True
    for r in range(repeats):
        order = list(rows) if r % 2 == 0 else list(reversed(rows))
        outs = {}
        for label in order:
            out = work / f"dp-{r}-{label.split()[0]}"
            args = realign_cli(model, task, n, batch, tokens, out)
            cmd = ([sys.executable, "-m", "harness", *args] if label == "1 process" else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "harness.cli", *args])
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            rows[label].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
            outs[label] = generations(out)
        same = same and outs["1 process"] == outs["2 processes (torchrun)"] and len(outs["1 process"]) == n
    return {"batch": batch, "seconds": rows, "identical_outputs": same,
            "median_seconds": {k: statistics.median(v) for k, v in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="4,8,16")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="a model folder (default: the 33 M LLaVA-style benchmark model, built here)")
    ap.add_argument("--no-lm-eval", action="store_true")
    ap.add_argument("--no-dp", action="store_true")
    ap.add_argument("--name", default="throughput")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="realign-throughput-"))
    model = args.model or str(build_tiny_vlm("llava", work / "model", 0, text=CPU_TEXT, tokenizer=bench_tokenizer(8000)))
    task = f"figstep:subset=tiny,data_dir={figstep_data()}"
    job = {"model": model, "task": task, "samples": job_samples(task, args.samples), "tokens": args.tokens}
    names = ["bare", "realign"] + ([] if args.no_lm_eval else ["lm-eval"])
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results: dict[str, Any] = {"setup": {"model": model if args.model else "LLaVA-style, text hidden 512 x 8 layers, "
                                         "8,000-entry BPE, random weights, float32", "task": task.split(",data_dir")[0],
                                         "samples": args.samples, "new_tokens": args.tokens, "repeats": args.repeats,
                                         "torch_threads_per_process": "torch default (all cores)"},
                               "batches": {}}
    for batch in batches:
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for r in range(args.repeats):
            for k in range(len(names)):  # rotate who goes first
                name = names[(r + k) % len(names)]
                res = contender(name, {**job, "batch": batch}, work / f"b{batch}-r{r}-{name}")
                runs[name].append(res)
                print(f"batch {batch} repeat {r} {name}: {res['seconds']:.2f} s", flush=True)
        med = {n: statistics.median(x["seconds"] for x in v) for n, v in runs.items()}
        row = {"seconds": {n: [x["seconds"] for x in v] for n, v in runs.items()},
               "process_seconds": {n: [x["process_seconds"] for x in v] for n, v in runs.items()},
               "median_seconds": med,
               "completion_tokens": {n: v[0]["completion_tokens"] for n, v in runs.items()},
               "prompt_tokens": {n: v[0]["prompt_tokens"] for n, v in runs.items()},
               "realign_equals_bare": runs["realign"][0]["outputs"] == runs["bare"][0]["outputs"],
               "realign_vs_bare": med["bare"] / med["realign"]}
        if "lm-eval" in med:
            row["realign_vs_lm_eval"] = med["lm-eval"] / med["realign"]
        results["batches"][str(batch)] = row
        write_json(args.name, results)
    if not args.no_dp:
        results["data_parallel"] = data_parallel(model, task, args.samples, 8, args.tokens, work, args.repeats)
        write_json(args.name, results)
    print_table(results)
    print(f"wrote benchmarks/results/{args.name}.json")


def print_table(results: dict[str, Any]) -> None:
    print("\n| batch | bare loop | realign none | lm-eval hf-multimodal | realign / bare (throughput) | "
          "realign / lm-eval | answers equal | tokens (bare / realign / lm-eval) |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, row in results["batches"].items():
        med, tok = row["median_seconds"], row["completion_tokens"]
        lm = f"{med['lm-eval']:.2f} s" if "lm-eval" in med else "-"
        print(f"| {batch} | {med['bare']:.2f} s | {med['realign']:.2f} s | {lm} | {row['realign_vs_bare']:.3f}x | "
              f"{row.get('realign_vs_lm_eval', float('nan')):.3f}x | {row['realign_equals_bare']} | "
              f"{tok['bare']} / {tok['realign']} / {tok.get('lm-eval', '-')} |")
    dp = results.get("data_parallel")
    if dp:
        m = dp["median_seconds"]
        print(f"\ndata parallel (batch {dp['batch']}, whole commands): " + ", ".join(f"{k} {v:.2f} s" for k, v in m.items())
              + f"; identical outputs: {dp['identical_outputs']}")


if __name__ == "__main__":
    main()
