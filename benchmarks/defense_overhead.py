"""Wall time per sample of each defense relative to no defense, same model, samples and run.

    python benchmarks/defense_overhead.py                 # CPU: LLaVA-style, text hidden 512, 8 layers
    python benchmarks/defense_overhead.py --gpu           # LLaVA-1.5-7B architecture, random bf16 weights
                                                          # at batch 1, 8, 32 (4, 16, 32 samples)
    python benchmarks/defense_overhead.py --only shiftdc --caption-tokens 64   # one row against `none`

Both models use a byte-level BPE trained on English text (benchmarks/common.py), so a defense
prompt costs about as many tokens as with a real tokenizer.

Each defense runs on benign and on harmful inputs. Every answer has the same fixed number of
new tokens (min = max; captions are capped, not forced), ECSO's self-check verdict is forced
(benign: safe, harmful: unsafe) because random weights never say "yes", fitted state
(CMRM dataset shifts, ShiftDC direction) is computed before timing, each defense runs one
full-length batch untimed first (so the memory allocator has grown before timing), and defenses run
round-robin `--repeats` times; the median is reported. Prints a table; writes
benchmarks/results/defense_overhead.json (machine included; `--json PATH` elsewhere) after every
(batch size, inputs) group, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import cpu_llava, llava7b_random, write_json  # noqa: E402
from harness.contracts.defense import CalibrationSet, Defense  # noqa: E402
from harness.defenses import ecso as ecso_module  # noqa: E402
from harness.contracts.backend import Backend, GenerationParams  # noqa: E402
from harness.registry import defenses  # noqa: E402
from harness.schema import Sample  # noqa: E402
from tasks.demo import BENIGN_REQUESTS, HARMFUL_REQUESTS, shape_image  # noqa: E402

TARGETS = {("cmrm dataset", "benign"): 1.05, ("cmrm dataset", "harmful"): 1.05,
           ("cmrm sample", "benign"): 1.4, ("cmrm sample", "harmful"): 1.4,
           ("shiftdc", "benign"): 1.5, ("shiftdc", "harmful"): 1.5,
           ("adashield", "benign"): 1.1, ("adashield", "harmful"): 1.1, ("ecso", "benign"): 1.3}


def bench_samples(n: int, size: int, kind: str) -> list[Sample]:
    texts = HARMFUL_REQUESTS if kind == "harmful" else BENIGN_REQUESTS
    return [Sample(f"{kind}{i}", texts[i % len(texts)], image=shape_image(i, size)) for i in range(n)]


@contextmanager
def ecso_verdict(unsafe: bool) -> Iterator[None]:
    """Random weights never answer the self-check with a strict "yes", so ECSO's path is forced:
    harmful inputs are flagged (answer, check, caption, text-only answer), benign ones pass."""
    original = ecso_module.says_yes
    ecso_module.says_yes = lambda reply: unsafe
    try:
        yield
    finally:
        ecso_module.says_yes = original


def calibration() -> dict[str, list[Sample]]:
    harmful = [Sample(f"u{i}", t) for i, t in enumerate(HARMFUL_REQUESTS)]
    benign = [Sample(f"s{i}", t) for i, t in enumerate(BENIGN_REQUESTS)]
    return {"anchor": benign, "unsafe": harmful, "safe": benign}


ROWS = ("none", "cmrm dataset", "cmrm sample", "shiftdc", "adashield", "ecso")


def _fitted(spec: str, backend: Backend, calib: dict[str, list[Sample]]) -> Defense:
    d = defenses.build(spec)
    d.use_state(d.fit(backend, {name: CalibrationSet("bench", samples) for name, samples in calib.items()}, batch_size=8), backend)
    return d


def build_defenses(backend: Backend, caption_tokens: int, rows: tuple[str, ...] = ROWS) -> dict[str, Defense]:
    """The defenses of `rows` (names from ROWS), fitted where they need it; nothing else is fitted."""
    calib = calibration()
    make: dict[str, Callable[[], Defense]] = {
        "none": lambda: defenses.build("none"),
        "cmrm dataset": lambda: _fitted("cmrm:level=dataset", backend, {"anchor": calib["anchor"]}),
        "cmrm sample": lambda: defenses.build("cmrm:level=sample"),
        "shiftdc": lambda: _fitted(f"shiftdc:caption_max_new_tokens={caption_tokens}", backend,
                                   {"unsafe": calib["unsafe"], "safe": calib["safe"]}),
        "adashield": lambda: defenses.build("adashield"),
        "ecso": lambda: defenses.build(f"ecso:caption_max_new_tokens={caption_tokens}"),
    }
    return {name: make[name]() for name in rows}


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
    model calls, caption tokens, and the prompt/completion tokens the defense reports."""
    sync()
    start = time.perf_counter()
    counts = {"model_calls": 0.0, "caption_tokens": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0}
    for i in range(0, len(samples), batch):
        for g in d.generate(backend, samples[i : i + batch], params):
            counts["model_calls"] += g.trace.get("model_calls", 1)
            counts["caption_tokens"] += g.trace.get("caption_tokens", 0)
            counts["prompt_tokens"] += g.tokens.get("prompt", 0)
            counts["completion_tokens"] += g.tokens.get("completion", 0)
    sync()
    return (time.perf_counter() - start) / len(samples), {k: v / len(samples) for k, v in counts.items()}


def run(backend: Backend, batches: list[int], n_for: Callable[[int], int], new_tokens: int, caption_tokens: int,
        repeats: int, image_size: int, on_rows: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
        only: tuple[str, ...] = ROWS) -> list[dict[str, Any]]:
    """Time every defense per (batch size, input kind); `on_rows` sees the rows so far after each
    group, so a run cut short still leaves what it measured."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    defs = build_defenses(backend, caption_tokens, only)
    rows: list[dict[str, Any]] = []
    for batch, kind in itertools.product(batches, ("benign", "harmful")):
        n = n_for(batch)
        samples = bench_samples(n, image_size, kind)
        print(f"[{time.strftime('%H:%M:%S')}] batch {batch}, {kind}: {n} samples x {len(defs)} defenses x {repeats}",
              flush=True)
        for d in defs.values():  # warm-up at full length: the allocator reaches its peak before timing
            with ecso_verdict(unsafe=kind == "harmful"):
                d.generate(backend, samples[:batch], params)
        times: dict[str, list[float]] = {k: [] for k in defs}
        counts: dict[str, dict[str, float]] = {}
        for _ in range(repeats):
            for name, d in defs.items():
                with ecso_verdict(unsafe=kind == "harmful"):
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
    print(f"{'defense':<14} {'inputs':<8} {'batch':>5} {'n':>3} {'s/sample':>10} {'x none':>7} {'target':>7} {'calls':>6} {'caption tok':>11} {'prompt tok':>10}")
    for r in rows:
        target = f"<={r['target_ratio']}" if r["target_ratio"] else ""
        print(f"{r['defense']:<14} {r['inputs']:<8} {r['batch_size']:>5} {r['samples']:>3} {r['seconds_per_sample']:>10.4f} {r['ratio_to_none']:>7.2f} "
              f"{target:>7} {r['model_calls_per_sample']:>6.1f} {r['caption_tokens_per_sample']:>11.1f} "
              f"{r.get('prompt_tokens_per_sample', float('nan')):>10.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="LLaVA-1.5-7B architecture, random bf16 weights, on CUDA")
    p.add_argument("--layers", type=int, default=None, help="(--gpu) fewer decoder layers, for a smoke test")
    p.add_argument("--device", default=None, help="override the device of the --gpu model (e.g. cpu for a smoke test)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default: 8 on CPU; 1,8,32 on GPU)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per measurement (default 16 on CPU; on GPU 2 batches' worth, at least 4, at most 32)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--caption-tokens", type=int, default=128, help="ShiftDC caption_max_new_tokens (its default, 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", type=parse_only, default=ROWS,
                   help="comma list of rows to time (e.g. 'none,shiftdc'); `none` is always kept as the baseline")
    p.add_argument("--name", default="defense_overhead", help="JSON file name under benchmarks/results/")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here instead (e.g. another machine's output folder)")
    args = p.parse_args(argv)
    if args.gpu:
        device = args.device or "cuda"
        backend = llava7b_random(args.layers, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        batches = [int(b) for b in (args.batch_sizes or "1,8,32").split(",")]
        image_size, setup = 336, "LLaVA-1.5-7B architecture, random weights, bf16, 32k English BPE tokenizer"
        n_for = (lambda b: args.samples) if args.samples else (lambda b: max(4, min(2 * b, 32)))
    else:
        torch.manual_seed(0)
        backend = cpu_llava()
        batches = [int(b) for b in (args.batch_sizes or "8").split(",")]
        image_size, setup = 224, "LLaVA-style, text hidden 512 x 8 layers, CLIP 28px (16 image tokens), float32, 8k English BPE tokenizer"
        n_for = lambda b: args.samples or 16  # noqa: E731
    header = {"setup": setup, "model": backend.spec, "new_tokens": args.new_tokens,
              "caption_tokens": args.caption_tokens, "repeats": args.repeats, "batch_sizes": batches}

    def save(rows: list[dict[str, Any]]) -> Path:
        return write_json(args.name, {**header, "rows": rows}, path=args.json)

    rows = run(backend, batches, n_for, args.new_tokens, args.caption_tokens, args.repeats, image_size, save, args.only)
    print(f"{setup}; {args.new_tokens} new tokens, ShiftDC/ECSO caption cap {args.caption_tokens} tokens, "
          f"median of {args.repeats}")
    print_table(rows)
    print(f"wrote {save(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
