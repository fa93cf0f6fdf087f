"""A tiny random stand-in for a reward model (ETA's RLHFlow/ArmoRM-Llama3-8B-v0.1), built offline for tests.

What the `eta` defense must exercise is the machinery, not the judgement: a folder that
`AutoModelForSequenceClassification` loads with one output (the reward, read as `logits[:, 0]`),
whose tokenizer has a chat template (a reward model scores a [user, assistant] conversation) and a
pad token that is not EOS (so right-padded batches read each row at its own last token). It is a
4-layer Llama of hidden size 64 with the project's tiny byte-level tokenizer, the same machinery
as the tiny MLLM-Protector detector. Same seed, same weights. Its scores are meaningless: tests
force the outcomes they need with thresholds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import LlamaForSequenceClassification

from harness.tiny.protector import _config, _save, _seeded
from harness.tiny.tokenizer import chat_template, train_tokenizer


def build_tiny_reward_model(out_dir: str | Path, seed: int = 0, text: dict[str, int] | None = None,
                            tokenizer: dict[str, Any] | None = None) -> Path:
    """A tiny random one-output sequence classifier with a chat-template tokenizer (a reward model's
    shape). `text` and `tokenizer` resize it as for the protector's helpers (benchmarks)."""
    tok = train_tokenizer([], **(tokenizer or {}))
    tok.chat_template = chat_template("")  # text-only conversations: no image placeholder is ever written
    model = _seeded(LlamaForSequenceClassification, _config(tok, text, num_labels=1), seed)
    return _save(model, tok, out_dir, "tiny reward model")
