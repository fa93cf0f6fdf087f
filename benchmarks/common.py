"""Shared helpers for the speed benchmarks: machine description, models with random weights,
and JSON output. Benchmarks print a table and write JSON under benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import platform
import sysconfig
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from harness.models.hf import HFBackend
from harness.provenance import git_commit, package_versions
from harness.tiny import build_tiny_vlm

RESULTS = Path(__file__).resolve().parent / "results"

# A LLaVA-style model on CPU big enough that model compute dominates Python overhead.
CPU_TEXT = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 8}


def english_corpus() -> list[str]:
    """English-heavy text that every machine has offline: the Python standard library's top-level
    modules (docstrings and comments), in name order so the tokenizer is the same each time on a
    given Python version. A byte-level BPE trained on it spends about 1.3 tokens per English word on
    the defense prompts, close to LLaMA's tokenizer, so prompt lengths are realistic."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="ignore") for p in sorted(lib.glob("*.py"))]
    if sum(map(len, texts)) < 1_000_000:
        raise RuntimeError(f"the Python standard library at {lib} has too little source text "
                           f"({len(texts)} .py files) to train the benchmark tokenizer")
    return texts


def bench_tokenizer(vocab_size: int) -> dict[str, Any]:
    """Arguments for `build_tiny_vlm(tokenizer=...)`: the English corpus at `vocab_size` entries."""
    return {"corpus": english_corpus(), "vocab_size": vocab_size}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_llava(seed: int = 0) -> HFBackend:
    """LLaVA-style CPU model. Its vocabulary is 8,000 entries: enough for realistic prompt lengths,
    while the output layer stays a small part of each decoding step, as in a 7B model."""
    folder = build_tiny_vlm("llava", Path(tempfile.mkdtemp(prefix="realign-bench-")) / "llava", seed, text=CPU_TEXT,
                            tokenizer=bench_tokenizer(8000))
    return HFBackend(HFBackend.Params(pretrained=str(folder), device="cpu", dtype="float32"))


def llava7b_random(layers: int | None = None, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> HFBackend:
    """The LLaVA-1.5-7B architecture (Vicuna-7B + CLIP ViT-L/14-336, 576 image tokens) with random
    weights: compute and memory traffic are the real model's, so timings are real. The tokenizer is
    a 32,000-entry BPE (LLaMA's size) trained on English text, so prompts have realistic lengths."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    small = HFBackend(HFBackend.Params(pretrained=str(build_tiny_vlm(
        "llava", Path(tempfile.mkdtemp()) / "p", tokenizer=bench_tokenizer(32000))), device="cpu"))
    processor = small.processor
    tok = processor.tokenizer
    config = LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=layers or 32, num_attention_heads=32, num_key_value_heads=32,
                         vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.generation_config = small.model.generation_config
    ip = processor.image_processor
    ip.size, ip.crop_size = {"shortest_edge": 336}, {"height": 336, "width": 336}
    processor.patch_size, processor.image_seq_length = 14, 576
    name = f"random:llava-1.5-7b-architecture{'' if layers is None else f'-{layers}layers'}"
    return HFBackend.from_loaded(model, processor, name)


def write_json(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write `payload` with the machine, versions and commit; to benchmarks/results/NAME.json
    unless `path` is given. Written whole each time, through a temporary file, so a reader never
    sees half a file."""
    payload = {
        "benchmark": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": package_versions(),
        "git": git_commit(),
        **payload,
    }
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
