"""Seconds per sample of none / CMRM / ShiftDC with and without `compile=true` on the HF backend.

    python benchmarks/compile_overhead.py                       # CPU LLaVA-style model (benchmarks/common.py)
    python benchmarks/compile_overhead.py --compile-backend aot_eager
    python benchmarks/compile_overhead.py --smoke               # tiny model, few tokens: checks it runs

The same model folder is loaded twice: once as is, once as `hf:...,compile=true` (static KV cache,
decode steps through torch.compile, prompts left-padded to a multiple of 64 tokens). Each defense
runs on both backends with the same samples, fitted state and a fixed number of new tokens
(min = max). The first full batch on the compiled backend is timed apart: it includes tracing and
compiling the decode step (and any recompilation a defense's new shapes cause), reported as
`first_batch_s`; `compile_s` is that minus a steady batch. Then each defense runs round-robin
`--repeats` times per backend and the median seconds per sample is reported, with the ratio of
compiled to eager and the greedy outputs' agreement (compiled outputs should equal eager ones).
Prints a table; writes compile_overhead.json under benchmarks/results/ (`--json PATH` elsewhere; with
--smoke a temporary file, so a smoke run never replaces measured results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import cpu_llava, write_json  # noqa: E402
from benchmarks.defense_overhead import bench_samples, time_defense  # noqa: E402
from benchmarks.overhead_defenses import OverheadDefenses  # noqa: E402
from harness.contracts.backend import GenerationParams  # noqa: E402
from harness.models.hf import HFBackend  # noqa: E402
from harness.tiny import build_tiny_vlm  # noqa: E402

ROWS = ("none", "cmrm sample", "cmrm dataset", "shiftdc")


def _no_sync() -> None:
    """CPU: nothing runs asynchronously."""


def backends(smoke: bool, compile_backend: str) -> tuple[HFBackend, HFBackend, str]:
    """(eager, compiled) backends on one model folder, and a description of the setup."""
    if smoke:
        folder = build_tiny_vlm("llava", Path(tempfile.mkdtemp(prefix="realign-bench-")) / "llava", seed=0)
        eager = HFBackend(HFBackend.Params(pretrained=str(folder), device="cpu", dtype="float32"))
        setup = "smoke: tiny LLaVA (harness/tiny), float32"
    else:
        torch.manual_seed(0)
        eager = cpu_llava()
        setup = "LLaVA-style, text hidden 512 x 8 layers, CLIP 28px (16 image tokens), float32, 8k English BPE tokenizer"
    params = HFBackend.Params(pretrained=eager.params.pretrained, device="cpu", dtype="float32", compile=True,
                              compile_backend=compile_backend)
    return eager, HFBackend(params), setup


def run(args: argparse.Namespace) -> dict[str, Any]:
    eager, compiled, setup = backends(args.smoke, args.compile_backend)
    params = GenerationParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    samples = bench_samples(args.samples, args.image_size, "benign")
    defs = {name: OverheadDefenses(b, args.caption_tokens, args.new_tokens).build(ROWS, "benign")
            for name, b in (("eager", eager), ("compiled", compiled))}
    first: dict[str, float] = {}
    outputs: dict[tuple[str, str], list[str]] = {}
    for row in ROWS:  # untimed warm-up on eager; on the compiled backend it is where compiling happens
        defs["eager"][row].generate(eager, samples[: args.batch], params)
        start = time.perf_counter()
        defs["compiled"][row].generate(compiled, samples[: args.batch], params)
        first[row] = time.perf_counter() - start
    times: dict[tuple[str, str], list[float]] = {(k, r): [] for k in defs for r in ROWS}
    for _ in range(args.repeats):
        for row in ROWS:
            for kind, backend in (("eager", eager), ("compiled", compiled)):
                t, _ = time_defense(defs[kind][row], backend, samples, args.batch, params, _no_sync)
                times[(kind, row)].append(t)
    for row in ROWS:
        for kind, backend in (("eager", eager), ("compiled", compiled)):
            outputs[(kind, row)] = [g.output for g in defs[kind][row].generate(backend, samples, params)]
    rows = []
    for row in ROWS:
        e, c = statistics.median(times[("eager", row)]), statistics.median(times[("compiled", row)])
        rows.append({
            "defense": row, "spec": defs["compiled"][row].spec, "batch_size": args.batch, "samples": len(samples),
            "eager_seconds_per_sample": round(e, 5), "compiled_seconds_per_sample": round(c, 5),
            "compiled_to_eager": round(c / e, 3),
            "first_batch_s": round(first[row], 3), "compile_s": round(max(first[row] - c * args.batch, 0.0), 3),
            "outputs_equal": outputs[("eager", row)] == outputs[("compiled", row)],
            "all_eager": [round(t, 5) for t in times[("eager", row)]],
            "all_compiled": [round(t, 5) for t in times[("compiled", row)]],
        })
    return {"setup": setup, "model": eager.spec or eager.params.pretrained, "compiled_identity": {
        k: compiled.identity().get(k) for k in ("compile", "pad_to_multiple")}, "new_tokens": args.new_tokens,
        "caption_tokens": args.caption_tokens, "repeats": args.repeats, "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['setup']}; {result['new_tokens']} new tokens, median of {result['repeats']}; "
          f"compiled: {result['compiled_identity']}")
    print(f"{'defense':<13} {'batch':>5} {'eager s/sample':>14} {'compiled s/sample':>17} {'ratio':>6} "
          f"{'first batch s':>13} {'compile s':>9} {'same out':>8}")
    for r in result["rows"]:
        print(f"{r['defense']:<13} {r['batch_size']:>5} {r['eager_seconds_per_sample']:>14.4f} "
              f"{r['compiled_seconds_per_sample']:>17.4f} {r['compiled_to_eager']:>6.2f} {r['first_batch_s']:>13.2f} "
              f"{r['compile_s']:>9.2f} {'yes' if r['outputs_equal'] else 'NO':>8}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, batch 2, 4 new tokens, one repeat: checks it runs")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (compile_backend=)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; smoke 2)")
    p.add_argument("--samples", type=int, default=None, help="samples per measurement (default 16; smoke 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per answer (default 128; smoke 4)")
    p.add_argument("--caption-tokens", type=int, default=None, help="ShiftDC caption cap (default 128; smoke 4)")
    p.add_argument("--repeats", type=int, default=None, help="default 3; smoke 1")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here instead of benchmarks/results/")
    args = p.parse_args(argv)
    defaults = {"batch": 2, "samples": 2, "new_tokens": 4, "caption_tokens": 4, "repeats": 1} if args.smoke else \
        {"batch": 8, "samples": 16, "new_tokens": 128, "caption_tokens": 128, "repeats": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.image_size = 56 if args.smoke else 224
    result = run(args)
    print_table(result)
    path = args.json or (Path(tempfile.mkdtemp(prefix="realign-bench-")) / "compile_overhead.json" if args.smoke else None)
    print(f"wrote {write_json('compile_overhead', result, path=path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
