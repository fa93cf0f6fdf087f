"""Tiny random stand-ins for MLLM-Protector's two helper models, built offline for tests.

The released helpers are LoRA adapters on 3B/7B LLaMA models; what the `protector` defense must
exercise is the same machinery at any size: a folder that `AutoModelForSequenceClassification`
loads with one output (the harm detector: sigmoid of its logit is p(safe)), and a folder that
`AutoModelForCausalLM` loads with a tokenizer (the detoxifier, which rewrites an answer). Both are
4-layer Llamas of hidden size 64 with the project's tiny byte-level tokenizer (the same machinery
as the tiny Llama Guard). Same seed, same weights; a different seed, different weights. Their
outputs are meaningless: tests force the outcomes they need (a threshold, zeroed weights).
`text` and `tokenizer` (as in `build_tiny_vlm`) change the sizes and the tokenizer, e.g. for the
defense-overhead benchmark, whose helpers must cost what helpers at its target's size would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from harness.tiny.build import TEXT
from harness.tiny.tokenizer import train_tokenizer


def _config(tokenizer: Any, text: dict[str, int] | None = None, **extra: Any) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), **dict(TEXT, **(text or {})), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False, **extra)


def _save(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, note: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(f"# {note} (random weights)\n\nBuilt offline for tests; its outputs are meaningless.\n")
    return out


def _seeded(cls: type, config: LlamaConfig, seed: int) -> torch.nn.Module:
    """Random float32 weights from `seed`, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).to(torch.float32).eval()


def build_tiny_detector(out_dir: str | Path, seed: int = 0, text: dict[str, int] | None = None,
                        tokenizer: dict[str, Any] | None = None) -> Path:
    """A tiny random one-output sequence classifier (the harm detector's shape) with its tokenizer.
    `text` overrides the Llama sizes (TEXT); `tokenizer` holds keyword arguments for
    `train_tokenizer` (`corpus`, `vocab_size`)."""
    tok = train_tokenizer([], **(tokenizer or {}))
    model = _seeded(LlamaForSequenceClassification, _config(tok, text, num_labels=1), seed)
    return _save(model, tok, out_dir, "tiny harm detector")


def build_tiny_detoxifier(out_dir: str | Path, seed: int = 0, text: dict[str, int] | None = None,
                          tokenizer: dict[str, Any] | None = None) -> Path:
    """A tiny random causal LM (the detoxifier's shape) with its tokenizer and a greedy generation
    config; `text` and `tokenizer` as for `build_tiny_detector`."""
    tok = train_tokenizer([], **(tokenizer or {}))
    model = _seeded(LlamaForCausalLM, _config(tok, text), seed)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    return _save(model, tok, out_dir, "tiny detoxifier")
