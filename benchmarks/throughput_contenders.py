"""The three contenders of benchmarks/throughput.py, each run in a fresh process by the parent.

    python -m benchmarks.throughput_contenders CONTENDER JOB.json RESULT.json

Every contender gets the same model folder, the same (text, image file) pairs, batch size and token
count (min = max new tokens, so each answer has exactly that many tokens), greedy, float32 on CPU.
The clock starts after the imports (torch, transformers and the contender's own framework's modules
are imported first, so start-up is not counted: lm-eval's `hf_vlms`, realign's registered
components; the parent also records each whole process's wall time) and stops when the contender has
its answers: for `realign`, when `realign run` returns (model load, task loading, generation,
records, judging and results included, as a user pays for them); for `bare`, a hand-written batched
`generate` loop doing only what any script must (load the model, read the images, apply the chat
template, process, generate, decode); for `lm-eval`, lm-eval's own `hf-multimodal` model answering
`generate_until` requests (its model load included).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch  # noqa: F401  (imported before the clock starts, as by every contender)
import transformers  # noqa: F401


def _bare(job: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(job["model"])
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(job["model"], dtype=torch.float32).eval()
    n, tokens, outputs = job["batch"], job["tokens"], {}
    prompt_tokens = completion_tokens = 0
    for i in range(0, len(job["samples"]), n):
        chunk = job["samples"][i : i + n]
        images = [[Image.open(s["image"]).convert("RGB")] for s in chunk]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["text"]}]}],
            add_generation_prompt=True, tokenize=False) for s in chunk]
        bos = processor.tokenizer.bos_token  # the chat template may write BOS itself
        batch = processor(images=images, text=texts, return_tensors="pt", padding=True,
                          add_special_tokens=not (bos and texts[0].startswith(bos)))
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        prompt_tokens += int(batch["attention_mask"].sum())
        completion_tokens += int(new.numel())
        for s, row in zip(chunk, new):
            outputs[s["id"]] = processor.tokenizer.decode(row, skip_special_tokens=True)
    return {"seconds": time.perf_counter() - start, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "outputs": outputs}


def _realign(job: dict[str, Any]) -> dict[str, Any]:
    from harness.cli import main

    out = Path(job["workdir"]) / "run"
    args = realign_cli(job["model"], job["task"], len(job["samples"]), job["batch"], job["tokens"], out)
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"realign run exited {code}")
    gens = [json.loads(line) for f in out.glob("*/none/*/generations.jsonl") for line in f.read_text().splitlines()]
    return {"seconds": seconds, "prompt_tokens": sum(g["tokens"]["prompt"] for g in gens),
            "completion_tokens": sum(g["tokens"]["completion"] for g in gens),
            "outputs": {g["sample_id"]: g["output"] for g in gens}}


def realign_cli(model: str, task: str, n: int, batch: int, tokens: int, out: Path) -> list[str]:
    """The `realign run` arguments of the benchmark (also the data-parallel runs of throughput.py)."""
    return ["run", "--model", model, "--defense", "none", "--task", task, "--limit", str(n), "--judge", "keywords",
            "--batch-size", str(batch), "--max-new-tokens", str(tokens), "--min-new-tokens", str(tokens),
            "--device", "cpu", "--dtype", "float32", "--out", str(out), "--quiet"]


def _lm_eval(job: dict[str, Any]) -> dict[str, Any]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.hf_vlms import HFMultimodalLM
    from PIL import Image

    start = time.perf_counter()
    lm = HFMultimodalLM(pretrained=job["model"], device="cpu", dtype="float32", batch_size=job["batch"])
    gen_kwargs = {"until": [], "max_gen_toks": job["tokens"], "min_new_tokens": job["tokens"], "do_sample": False}
    requests = []
    for i, s in enumerate(job["samples"]):
        context = lm.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["text"]}]}],
            add_generation_prompt=True, tokenize=False)
        visual = {"visual": [Image.open(s["image"]).convert("RGB")]}
        requests.append(Instance("generate_until", {}, (context, gen_kwargs, visual), i))
    answers = lm.generate_until(requests, disable_tqdm=True)
    seconds = time.perf_counter() - start
    count = lm.tokenizer(answers, add_special_tokens=False)["input_ids"]
    return {"seconds": seconds, "prompt_tokens": None, "completion_tokens": sum(map(len, count)),
            "outputs": {s["id"]: a for s, a in zip(job["samples"], answers)}}


CONTENDERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"bare": _bare, "realign": _realign,
                                                                      "lm-eval": _lm_eval}


def main(argv: list[str]) -> None:
    name, job_file, result_file = argv
    job = json.loads(Path(job_file).read_text())
    if name == "lm-eval":
        import lm_eval.models.hf_vlms  # noqa: F401  (its import is start-up, not throughput)
    elif name == "realign":
        from harness.registry import load_components

        load_components()  # its modules (every registered component), as lm-eval's above
    result = CONTENDERS[name](job)
    Path(result_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
