"""ETA's reward model: loading by hub id or folder, and batched scores of [user, assistant] conversations.

Kept apart from the defense because it is about a checkpoint and batching, not about the method.

Which models: any `AutoModelForSequenceClassification` with one output, whose reward is
`logits[:, 0]`, and reward models with their own modelling code that return an output with a
`score` field. ETA's RLHFlow/ArmoRM-Llama3-8B-v0.1 is one of the latter: its remote code (loaded
with `trust_remote_code`) returns a `CustomOutput` whose `score` is the gating-weighted sum of its
19 reward objectives, one number per conversation; that `score` is what ETA thresholds, and what
is read here whenever an output has a `score` field. A multi-output model without `score` is
refused (which column is "the" reward would be a guess).

How a conversation is scored: the tokenizer's chat template renders [user: prompt, assistant:
answer] (no generation prompt), exactly as the public code calls `apply_chat_template`; the
rendered text is tokenized without adding special tokens again. Batches are RIGHT-padded with the
model's pad id (`config.pad_token_id`, else the tokenizer's), which both the transformers
classifiers (last non-pad token) and ArmoRM's code (the token before the first pad) read at each
row's own last token. A row that contains the pad id itself, or any row when there is no pad id,
is scored alone without padding, so a batch always scores like single conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import DataError, ModelLoadError


@dataclass
class RewardModel:
    """A loaded reward model with its tokenizer and the pad id it reads batches with (None: no batching)."""

    name: str
    model: Any
    tokenizer: Any
    device: str
    pad_id: int | None

    def encode(self, prompt: str, answer: str) -> list[int]:
        """Token ids of the conversation [user: prompt, assistant: answer] in the model's chat template."""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, prompt: str, answers: list[str], batch_size: int) -> list[float]:
        """The reward of each answer to `prompt`, in order (float32 values as Python floats)."""
        rows = [self.encode(prompt, a) for a in answers]
        out: list[float | None] = [None] * len(rows)
        alone = [i for i, r in enumerate(rows) if self.pad_id is None or self.pad_id in r]
        together = [i for i in range(len(rows)) if i not in set(alone)]
        for i in alone:
            out[i] = self._forward([rows[i]])[0]
        for start in range(0, len(together), batch_size):
            idx = together[start : start + batch_size]
            for i, value in zip(idx, self._forward([rows[i] for i in idx])):
                out[i] = value
        return [float(v) for v in out]  # type: ignore[arg-type]

    def _forward(self, rows: list[list[int]]) -> list[float]:
        import torch

        width = max(len(r) for r in rows)
        pad = self.pad_id if self.pad_id is not None else 0  # unused when every row has the same length
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        with torch.inference_mode():
            output = self.model(input_ids=ids, attention_mask=mask)
        return read_reward(output, len(rows), self.name)


def read_reward(output: Any, n: int, name: str) -> list[float]:
    """The reward per row: `output.score` when the model returns one (ArmoRM), else `logits[:, 0]` of a
    one-output classifier."""
    score = getattr(output, "score", None)
    if score is not None:
        return [float(x) for x in score.float().reshape(n, -1)[:, 0].cpu()]
    logits = output.logits if hasattr(output, "logits") else output[0]
    if logits.shape[-1] != 1:
        raise DataError(f"reward model {name!r} has {logits.shape[-1]} outputs and no `score`; a reward model "
                        "must have one output (or return a `score`, as ArmoRM's code does)")
    return [float(x) for x in logits.float()[:, 0].cpu()]


def load_reward_model(name: str, device: str | None, dtype: str | None, trust_remote_code: bool) -> RewardModel:
    """A reward model by hub id or folder; ModelLoadError naming the model and why."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    where = Path(name).expanduser()
    if (name.startswith((".", "~", "/")) or where.is_absolute()) and not where.is_dir():
        raise ModelLoadError(f"eta reward model folder {name!r} does not exist")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        hint = "" if trust_remote_code else " (a reward model with its own code, such as ArmoRM, needs rm_trust_remote_code=true)"
        raise ModelLoadError(f"cannot load the eta reward model {name!r} with "
                             f"AutoModelForSequenceClassification: {exc}{hint}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"eta reward model {name!r}: its tokenizer has no chat template, so a "
                             "[user, assistant] conversation cannot be rendered the way it was trained")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    if pad_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id  # transformers classifiers need it to read padded rows
    return RewardModel(name, model.to(device).eval(), tokenizer, device, pad_id)
