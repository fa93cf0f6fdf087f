"""Teacher-forced batches: the prompt as the backend renders it, a target continuation appended,
and the loss of that continuation given the pixels.

Why this shape: the defended generation is a prefill of the prompt then decode steps, one generated
token each. Feeding prompt + target in one forward with the same position ids computes the same
states (causal attention, KV cache or not), so the loss of the target under the defended forward is
what the defended model's generation would assign to it, positions included: `prompt` positions
are the prompt's, `last_prompt` is its last token, `generated` are the target tokens (the inputs of
decode steps).

Rows and images: each row is one (text, target) pair owned by one image (`owner`), so a per-sample
attack has one or two rows per image (target and refusal), a universal one many rows on one image.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from harness.contracts.backend import user_request
from harness.errors import CapabilityError
from harness.whitebox.pixels import Pixels

Kind = Literal["target", "refusal"]


@dataclass(frozen=True)
class Row:
    owner: int  # index of the image this row is conditioned on
    text: str  # the user text as the defended model receives it
    target: str | tuple[int, ...]  # the continuation whose likelihood the row scores (text, or token ids)
    kind: Kind = "target"


@dataclass
class TeacherBatch:
    rows: list[Row]
    input_ids: torch.Tensor  # [R, P + T]
    attention_mask: torch.Tensor  # [R, P + T]
    prompt_len: int  # P (left padded: every row's prompt ends at P - 1)
    target_mask: torch.Tensor  # [R, T] 1 where a target token is
    target_ids: torch.Tensor  # [R, T]
    owner: torch.Tensor  # [R]
    #: per-token tensors [R, P + T] the processor sends beside the ids (Qwen2-VL's mm_token_type_ids),
    #: 0 over the target (text)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def weights(self, positions: frozenset[str]) -> torch.Tensor:
        """[R, seq] 0/1 weights of the positions an edit applies to (see the module docstring)."""
        p = self.prompt_len
        w = torch.zeros(self.attention_mask.shape, dtype=torch.float32, device=self.attention_mask.device)
        if "prompt" in positions:
            w[:, :p] = self.attention_mask[:, :p].float()
        if "last_prompt" in positions:
            w[:, p - 1] = 1.0
        if "generated" in positions:
            w[:, p:] = self.target_mask.float()
        return w


def target_ids(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Token ids of `target` as they follow the rendered prompt: the tail of tokenize(prompt + target)
    when its head is tokenize(prompt) (merges across the boundary handled as the tokenizer does),
    else tokenize(target) alone."""
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        return list(full[len(head) :])
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} encodes to no token")
    return ids


def build(backend: Any, rows: list[Row], placeholder: Image.Image) -> TeacherBatch:
    """Encode the rows' prompts (each with one image; the pixels are replaced at every forward) and
    append their targets, right padded (positions after a row's target are masked and not scored)."""
    requests = [user_request(r.text, placeholder) for r in rows]
    enc = backend.encode(requests)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if not bool(mask[:, -1].all()):
        raise CapabilityError("white-box attacks need a left-padded prompt batch")
    prompts = [backend.processor.apply_chat_template(_messages(r.text), add_generation_prompt=True, tokenize=False)
               for r in rows]
    targets = [list(r.target) if not isinstance(r.target, str) else target_ids(backend.tokenizer, p, r.target)
               for p, r in zip(prompts, rows)]
    t = max(len(x) for x in targets)
    pad = backend.tokenizer.pad_token_id or 0
    tgt = torch.full((len(rows), t), pad, dtype=ids.dtype)
    tmask = torch.zeros((len(rows), t), dtype=mask.dtype)
    for i, x in enumerate(targets):
        tgt[i, : len(x)] = torch.tensor(x, dtype=ids.dtype)
        tmask[i, : len(x)] = 1
    tgt, tmask = tgt.to(ids.device), tmask.to(ids.device)
    extras = {k: torch.cat([v, torch.zeros((len(rows), t), dtype=v.dtype, device=v.device)], 1)
              for k, v in enc.items() if k not in ("input_ids", "attention_mask") and v.shape == ids.shape}
    return TeacherBatch(rows, torch.cat([ids, tgt], 1), torch.cat([mask, tmask], 1), int(ids.shape[1]), tmask, tgt,
                        torch.tensor([r.owner for r in rows], device=ids.device), extras)


def tile(batch: TeacherBatch, copies: int, images: int) -> TeacherBatch:
    """The batch repeated `copies` times, copy c's rows owned by image c * images + owner: the rows
    of an expectation over transformations, scored on `copies` stacked versions of the images."""
    owner = torch.cat([batch.owner + c * images for c in range(copies)])
    rows = [Row(int(o), r.text, r.target, r.kind) for o, r in zip(owner.tolist(), batch.rows * copies)]
    return TeacherBatch(rows, batch.input_ids.repeat(copies, 1), batch.attention_mask.repeat(copies, 1),
                        batch.prompt_len, batch.target_mask.repeat(copies, 1), batch.target_ids.repeat(copies, 1), owner,
                        {k: v.repeat(copies, 1) for k, v in batch.extras.items()})


def _messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def forward(model: Any, batch: TeacherBatch, pixels: Pixels) -> torch.Tensor:
    """Logits [R, T, vocab] predicting each target token (the positions P-1 .. P+T-2), with the
    image inputs of each row's owner (`Pixels.for_rows`) and the batch's per-token extras. Position
    ids follow the attention mask, as in generation; a model with multimodal rotary positions
    (`get_rope_index`: Qwen2-VL) derives its own from the ids, mask and image grid, as its
    generation does."""
    mask = batch.attention_mask
    t = batch.target_ids.shape[1]
    extra: dict[str, Any] = dict(batch.extras)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = t + 1
    if not callable(getattr(getattr(model, "model", None), "get_rope_index", None)):
        extra["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False,
                **pixels.for_rows(batch.owner, model.dtype), **extra)
    logits = out.logits
    return logits[:, -(t + 1) : -1, :]


def row_losses(logits: torch.Tensor, batch: TeacherBatch) -> torch.Tensor:
    """[R] per-row loss in float32: target rows the mean negative log-likelihood of the target tokens;
    refusal rows the mean unlikelihood -log(1 - p) of the refusal tokens (bounded below by 0, so
    pushing a refusal down cannot dominate the target term)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least (float64 kept)
    logp = torch.log_softmax(wide, dim=-1).gather(-1, batch.target_ids[..., None]).squeeze(-1)  # [R, T]
    mask = batch.target_mask.to(wide.dtype)
    nll = -logp
    unlikely = -torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
    refusal = torch.tensor([r.kind == "refusal" for r in batch.rows], device=logits.device)
    per_token = torch.where(refusal[:, None], unlikely, nll)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)
