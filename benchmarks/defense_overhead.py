"""Wall time per sample of each defense relative to no defense, same model, samples and run.

    python benchmarks/defense_overhead.py                 # CPU: LLaVA-style, text hidden 512, 8 layers
    python benchmarks/defense_overhead.py --gpu           # LLaVA-1.5-7B architecture, random bf16 weights
                                                          # at batch 1, 8, 32 (4, 16, 32 samples)
    python benchmarks/defense_overhead.py --only shiftdc --caption-tokens 64   # one row against `none`

Both models use a byte-level BPE trained on English text (benchmarks/common.py), so a defense
prompt costs about as many tokens as with a real tokenizer.

Each defense runs on benign and on harmful inputs, with its decision path forced (benign: pass,
harmful: flagged; benchmarks/overhead_defenses.py says how per defense) because random weights
decide nothing meaningful. Every answer has the same fixed number of new tokens (min = max;
captions are capped, not forced), fitted state (CMRM dataset shifts, ShiftDC direction) is
computed before timing, each defense runs one full-length batch untimed first (so the memory
allocator has grown and helper models are loaded before timing), and defenses run round-robin
`--repeats` times; the median is reported. `guard` and `protector` use helper models of the
target's size (a copy of the target with the guard chat template; a detector and a detoxifier at
its language-model size and tokenizer). On --gpu the guard is the random 7B saved to a temporary
folder (about 14 GB of disk), and `protector` is CPU-only (its two 7B helpers would be written as
float32 folders, which do not fit the GPU machine's disk): it is left out, and refused by --only.
Prints a table; writes benchmarks/results/defense_overhead.json (machine included; `--json PATH`
elsewhere) after every (batch size, inputs) group, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import bench_tokenizer, cpu_llava, llava7b_random, write_json  # noqa: E402
from benchmarks.overhead_defenses import CPU_ONLY, ROWS, OverheadDefenses, forced_paths  # noqa: E402
from harness.contracts.backend import Backend, GenerationParams  # noqa: E402
from harness.contracts.defense import Defense  # noqa: E402
from harness.schema import Sample  # noqa: E402
from tasks.demo import BENIGN_REQUESTS, HARMFUL_REQUESTS, shape_image  # noqa: E402

TARGETS = {("cmrm dataset", "benign"): 1.05, ("cmrm dataset", "harmful"): 1.05,
           ("cmrm sample", "benign"): 1.4, ("cmrm sample", "harmful"): 1.4,
           ("shiftdc", "benign"): 1.5, ("shiftdc", "harmful"): 1.5,
           ("adashield", "benign"): 1.1, ("adashield", "harmful"): 1.1, ("ecso", "benign"): 1.3}
COUNTS = ("model_calls", "extra_forward_passes", "caption_tokens", "prompt_tokens", "completion_tokens")


def bench_samples(n: int, size: int, kind: str) -> list[Sample]:
    texts = HARMFUL_REQUESTS if kind == "harmful" else BENIGN_REQUESTS
    return [Sample(f"{kind}{i}", texts[i % len(texts)], image=shape_image(i, size)) for i in range(n)]


def parse_only(value: str) -> tuple[str, ...]:
    """`--only a,b`: those rows plus the `none` baseline, in table order."""
    wanted = {x.strip() for x in value.split(",") if x.strip()}
    unknown = sorted(wanted - set(ROWS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    return tuple(r for r in ROWS if r == "none" or r in wanted)


def time_defense(d: Defense, backend: Backend, samples: list[Sample], batch: int, params: GenerationParams,
                 sync: Callable[[], None]) -> tuple[float, dict[str, float]]:
    """Seconds per sample over all samples in batches, and per-sample counts from the generations:
    model calls (generations, guard or helper calls, as each defense's trace counts them), extra
    forward passes (prefills outside those calls: CMRM's, ShiftDC's, HiddenDetect's scoring,
    QGuard's 35 self-guard questions), caption tokens, and the target's prompt/completion tokens."""
    sync()
    start = time.perf_counter()
    counts = dict.fromkeys(COUNTS, 0.0)
    for i in range(0, len(samples), batch):
        for g in d.generate(backend, samples[i : i + batch], params):
            counts["model_calls"] += g.trace.get("model_calls", 1)
            counts["extra_forward_passes"] += g.trace.get("extra_forward_passes", 0)
            counts["caption_tokens"] += g.trace.get("caption_tokens", 0)
            counts["prompt_tokens"] += g.tokens.get("prompt", 0)
            counts["completion_tokens"] += g.tokens.get("completion", 0)
    sync()
    return (time.perf_counter() - start) / len(samples), {k: v / len(samples) for k, v in counts.items()}


def run(backend: Backend, batches: list[int], n_for: Callable[[int], int], new_tokens: int, caption_tokens: int,
        repeats: int, image_size: int, on_rows: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
        only: tuple[str, ...] = ROWS, helper_tokenizer: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Time every defense per (batch size, input kind), its decision path forced by the kind;
    `on_rows` sees the rows so far after each group, so a run cut short still leaves what it
    measured. `helper_tokenizer`: `train_tokenizer` arguments for the protector's helper models."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    factory = OverheadDefenses(backend, caption_tokens, new_tokens, helper_tokenizer)
    rows: list[dict[str, Any]] = []
    for batch, kind in itertools.product(batches, ("benign", "harmful")):
        n = n_for(batch)
        samples = bench_samples(n, image_size, kind)
        defs = factory.build(only, kind)
        print(f"[{time.strftime('%H:%M:%S')}] batch {batch}, {kind}: {n} samples x {len(defs)} defenses x {repeats}",
              flush=True)
        times: dict[str, list[float]] = {k: [] for k in defs}
        counts: dict[str, dict[str, float]] = {}
        with forced_paths(unsafe=kind == "harmful"):
            for d in defs.values():  # warm-up at full length: the allocator reaches its peak before timing
                d.generate(backend, samples[:batch], params)
            for _ in range(repeats):
                for name, d in defs.items():
                    t, counts[name] = time_defense(d, backend, samples, batch, params, sync)
                    times[name].append(t)
        base = statistics.median(times["none"])
        for name in defs:
            med = statistics.median(times[name])
            rows.append({
                "defense": name, "spec": defs[name].spec, "batch_size": batch, "inputs": kind, "samples": n,
                "seconds_per_sample": round(med, 5), "ratio_to_none": round(med / base, 3),
                **{f"{k}_per_sample": round(v, 2) for k, v in counts[name].items()},
                "target_ratio": TARGETS.get((name, kind)),
                "all_seconds_per_sample": [round(t, 5) for t in times[name]],
            })
        on_rows(rows)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'defense':<14} {'inputs':<8} {'batch':>5} {'n':>3} {'s/sample':>10} {'x none':>7} {'target':>7} {'calls':>6} "
          f"{'extra fwd':>9} {'caption tok':>11} {'prompt tok':>10}")
    for r in rows:
        target = f"<={r['target_ratio']}" if r["target_ratio"] else ""
        print(f"{r['defense']:<14} {r['inputs']:<8} {r['batch_size']:>5} {r['samples']:>3} {r['seconds_per_sample']:>10.4f} {r['ratio_to_none']:>7.2f} "
              f"{target:>7} {r['model_calls_per_sample']:>6.1f} {r['extra_forward_passes_per_sample']:>9.1f} "
              f"{r['caption_tokens_per_sample']:>11.1f} "
              f"{r.get('prompt_tokens_per_sample', float('nan')):>10.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true",
                   help="LLaVA-1.5-7B architecture, random bf16 weights, on CUDA; the guard row saves a 7B copy to a "
                        "temporary folder (about 14 GB); the protector row is CPU only and left out")
    p.add_argument("--layers", type=int, default=None, help="(--gpu) fewer decoder layers, for a smoke test")
    p.add_argument("--device", default=None, help="override the device of the --gpu model (e.g. cpu for a smoke test)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default: 8 on CPU; 1,8,32 on GPU)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per measurement (default 16 on CPU; on GPU 2 batches' worth, at least 4, at most 32)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--caption-tokens", type=int, default=128, help="ShiftDC caption_max_new_tokens (its default, 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", type=parse_only, default=None,
                   help=f"comma list of rows to time (e.g. 'none,shiftdc'; default all: {', '.join(ROWS)}); `none` is "
                        f"always kept as the baseline; {', '.join(CPU_ONLY)}: CPU only (left out with --gpu)")
    p.add_argument("--name", default="defense_overhead", help="JSON file name under benchmarks/results/")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here instead (e.g. another machine's output folder)")
    args = p.parse_args(argv)
    only = args.only or ROWS
    if args.gpu:
        asked = sorted(set(CPU_ONLY) & set(args.only or ()))
        if asked:
            p.error(f"--only {', '.join(asked)}: CPU only (its 7B helper models do not fit the GPU machine's disk)")
        only = tuple(r for r in only if r not in CPU_ONLY)
        device = args.device or "cuda"
        backend = llava7b_random(args.layers, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        batches = [int(b) for b in (args.batch_sizes or "1,8,32").split(",")]
        image_size, setup = 336, "LLaVA-1.5-7B architecture, random weights, bf16, 32k English BPE tokenizer"
        n_for = (lambda b: args.samples) if args.samples else (lambda b: max(4, min(2 * b, 32)))
        helper_tokenizer = None  # no protector row on --gpu
    else:
        torch.manual_seed(0)
        backend = cpu_llava()
        batches = [int(b) for b in (args.batch_sizes or "8").split(",")]
        image_size, setup = 224, "LLaVA-style, text hidden 512 x 8 layers, CLIP 28px (16 image tokens), float32, 8k English BPE tokenizer"
        n_for = lambda b: args.samples or 16  # noqa: E731
        helper_tokenizer = bench_tokenizer(8000)  # the target's: protector's helpers tokenize as it does
    header = {"setup": setup, "model": backend.spec, "new_tokens": args.new_tokens,
              "caption_tokens": args.caption_tokens, "repeats": args.repeats, "batch_sizes": batches}

    def save(rows: list[dict[str, Any]]) -> Path:
        return write_json(args.name, {**header, "rows": rows}, path=args.json)

    rows = run(backend, batches, n_for, args.new_tokens, args.caption_tokens, args.repeats, image_size, save, only,
               helper_tokenizer)
    print(f"{setup}; {args.new_tokens} new tokens, ShiftDC/ECSO caption cap {args.caption_tokens} tokens, "
          f"median of {args.repeats}")
    print_table(rows)
    print(f"wrote {save(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
