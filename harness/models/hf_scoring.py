"""Scoring without generating, for the HF backend: the logit lens over decoder layers and the
log-probabilities of candidate next tokens. Detectors and guards use them (HiddenDetect reads
refusal in the hidden states; QGuard turns a guard VLM's yes/no into a probability).

Both take an already encoded, LEFT-padded batch, so the last position is each request's last
prompt token, and run one forward pass under inference mode.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from harness.models import steering


def final_norm(model: Any) -> torch.nn.Module:
    """The text decoder's final normalisation (applied before the LM head)."""
    decoder = model.get_decoder()
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
    if norm is None:
        raise RuntimeError(f"{type(decoder).__name__} has no final norm the logit lens can apply")
    return norm


def lens_logits(model: Any, inputs: Mapping[str, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """[batch, len(layers), vocab] float32: lm_head(norm(h^l)) at the last prompt token, where h^l is
    decoder layer l's output (before the final norm, so every layer is normalised exactly once)."""
    states = steering.last_token_states(model, inputs, layers)  # float32, CPU
    norm, head = final_norm(model), model.get_output_embeddings()
    param = next(head.parameters())
    with torch.inference_mode():
        x = states.to(param.device, param.dtype)
        return head(norm(x)).float().cpu()


def first_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    out = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{word!r} encodes to no token")
        out.append(int(ids[0]))
    return out


def next_token_logprobs(model: Any, inputs: Mapping[str, torch.Tensor], candidate_ids: Sequence[int]) -> torch.Tensor:
    """[batch, len(candidate_ids)] log-softmax of the next-token logits at the candidates."""
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError("next_token_logprobs needs a left-padded batch")
    with torch.inference_mode():
        logits = model(**inputs, use_cache=False).logits[:, -1, :].float()
    return torch.log_softmax(logits, dim=-1)[:, list(candidate_ids)].cpu()
