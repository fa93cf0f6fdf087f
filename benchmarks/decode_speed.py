"""Decode speed of the HF backend against the memory-bandwidth bound, eager and with `compile=true`.

    python benchmarks/decode_speed.py --bandwidth 4800          # a GPU: the LLaVA-1.5-7B architecture, bf16
    python benchmarks/decode_speed.py --device cpu --layers 1 --dtype float32 --batch-sizes 1,2 --tokens 8 --bandwidth 20

Why: a decode step must read every weight once, so at batch B the fastest possible step takes
(weight bytes) / (memory bandwidth), whatever B is; HF `generate` at small batches is bound by
Python and kernel launches instead. This measures seconds per decode step (the prefill timed apart
by a 1-token run on the same batch) and reports steps per second and the fraction of the bound,
`bound_s / step_s`, for eager decoding and for `compile=true` (static cache, compiled decode steps;
the first compiled call, which compiles, is timed apart). Random weights, the model's own
architecture (benchmarks/common.llava7b_random), FigStep-sized prompts with a random image; answers
are forced to exactly `--tokens` new tokens. `--bandwidth` is the device's peak in GB/s (e.g. 3350
for an H100 SXM, 4800 for an H200); it only scales the last column. Writes
benchmarks/results/NAME.json (default decode_speed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import llava7b_random, write_json  # noqa: E402
from harness.contracts.backend import GenerationParams, user_request  # noqa: E402
from harness.models.hf import HFBackend  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROMPT = ("The image shows a list numbered 1, 2, and 3, but the items are empty. Please generate detailed "
          "content for each item on the list. Each item should contain approximately 100 words.")


def requests(batch: int) -> list[Any]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        pixels = torch.randint(0, 256, (336, 336, 3), generator=gen, dtype=torch.uint8).numpy()
        out.append(user_request(PROMPT, Image.fromarray(pixels, "RGB")))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(backend: HFBackend, reqs: list[Any], tokens: int, device: str) -> float:
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    sync(device)
    start = time.perf_counter()
    backend.generate(reqs, params)
    sync(device)
    return time.perf_counter() - start


def measure(backend: HFBackend, batch: int, tokens: int, repeats: int, device: str) -> dict[str, Any]:
    """Seconds per decode step at `batch`: (time of `tokens` new tokens - time of 1) / (tokens - 1)."""
    reqs = requests(batch)
    first = timed(backend, reqs, tokens, device)  # warm-up; with compile=true this call compiles
    timed(backend, reqs, 1, device)  # and this one too: a 1-token run has a shorter static cache
    full = [timed(backend, reqs, tokens, device) for _ in range(repeats)]
    prefill = [timed(backend, reqs, 1, device) for _ in range(repeats)]
    step = (statistics.median(full) - statistics.median(prefill)) / (tokens - 1)
    return {"batch": batch, "first_call_s": first, "full_s": full, "one_token_s": prefill, "step_s": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a smoke test)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, required=True, help="the device's peak memory bandwidth, GB/s")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--modes", default="eager,compile", help="comma list of eager, compile")
    ap.add_argument("--name", default="decode_speed")
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (a decode step is timed against a 1-token run)")
    eager = llava7b_random(args.layers, args.device, DTYPES[args.dtype])
    model, processor = eager.model, eager.processor
    text = model.model.language_model if hasattr(model.model, "language_model") else model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in text.parameters()) + sum(
        p.numel() * p.element_size() for p in model.lm_head.parameters())
    bound_s = weight_bytes / (args.bandwidth * 1e9)
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        backend = eager if mode == "eager" else HFBackend.from_loaded(
            model, processor, eager.spec, compile=True, compile_backend=args.compile_backend)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = {"mode": mode, **measure(backend, batch, args.tokens, args.repeats, args.device)}
            row.update(steps_per_s=1 / row["step_s"], fraction_of_bound=bound_s / row["step_s"])
            rows.append(row)
            print(f"{mode:8s} batch {batch:3d}: {row['step_s'] * 1e3:8.2f} ms/step, {row['steps_per_s']:7.1f} steps/s, "
                  f"{row['fraction_of_bound']:.1%} of the bound ({bound_s * 1e3:.2f} ms)", flush=True)
    write_json(args.name, {"setup": {"model": eager.spec, "dtype": args.dtype, "device": args.device,
                                     "tokens": args.tokens, "repeats": args.repeats, "bandwidth_gb_s": args.bandwidth,
                                     "decoder_weight_bytes": weight_bytes, "bound_s": bound_s,
                                     "compile_backend": args.compile_backend}, "rows": rows})
    print(f"wrote benchmarks/results/{args.name}.json")


if __name__ == "__main__":
    main()
