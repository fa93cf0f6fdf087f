"""ShiftDC: Activation Shift Disentanglement and Calibration (Zou et al., arXiv 2502.13095).

Only the safety-relevant part of the modality-induced shift is removed. Per layer l:
  s^l = mean h^l(safe text) - mean h^l(unsafe text)            (fitted once, text only)
  m^l = h^l(query, image) - h^l(query + caption, no image)       (per input, unsteered)
  c^l = α · (m^l·s^l / ||s^l||²) · s^l ;  h^l <- h^l - c^l
The caption is written by the evaluated VLM with a query-aware prompt. Both sides use the
chat template, and left padding is handled by the backend (two quirks of the public code that
this implementation does not share).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

from harness.contracts.defense import Defense, DefenseContext, sample_request
from harness.defenses.layers import parse_layers
from harness.defenses.shift import state_difference, text_only
from harness.defenses.vectors import FittedVectors, calibration_record, model_key
from harness.errors import DataError
from harness.contracts.backend import Backend, Completion, Edits, GenerationParams, user_request
from harness.registry import defense
from harness.schema import Generation, Sample

log = logging.getLogger(__name__)
KIND = "shiftdc-direction"

# Our wording. The caption asks for what in the image bears on the request; the text-only twin
# of the input is the request followed by that caption.
CAPTION_PROMPT = "Describe what this image shows that is relevant to the following request.\nRequest: {query}"
TEXT_WITH_CAPTION = "{query}\nImage description: {caption}"
POSITION_SETS = {"last_prompt+generated": frozenset({"last_prompt", "generated"}), "prefill_only": frozenset({"last_prompt"})}


def text_states(backend: Backend, texts: list[str], layers: list[int], batch_size: int, desc: str, progress: bool) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = texts[start : start + batch_size]
        chunks.append(backend.last_token_states([text_only(t) for t in batch], layers).float())
    return torch.cat(chunks)


@defense("shiftdc")
class ShiftDC(Defense):
    """ShiftDC: subtract the projection of the image-induced shift on a text-only safety direction."""

    requires = frozenset({"steering"})

    @dataclass
    class Params:
        # Defaults chosen by `realign sweep` on the model organism (docs/organism_readme.md): the most
        # refusal restored with an image while benign helpfulness drops by at most 0.05. Before the
        # sweep: alpha=1 (the paper has none), layers=half (the paper's L//2..L-1) and
        # last_prompt+generated (the public code's later commit; its first version edited prefill only).
        alpha: float = 0.75
        layers: str = "last"
        positions: Literal["last_prompt+generated", "prefill_only"] = "prefill_only"
        caption_max_new_tokens: int = 128
        direction: str | None = None
        calibration_unsafe: str | None = None
        calibration_safe: str | None = None
        calibration_limit: int | None = None
        allow_overlap: bool = False

        def __post_init__(self) -> None:
            if (self.calibration_unsafe is None) != (self.calibration_safe is None):
                raise ValueError("calibration_unsafe and calibration_safe go together")
            if self.caption_max_new_tokens < 1:
                raise ValueError("caption_max_new_tokens must be at least 1")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.fitted: FittedVectors | None = None

    def fit(self, backend: Backend, calibration: dict[str, tuple[str, list[Sample]]],
            batch_size: int = 8, progress: bool = False) -> FittedVectors:
        """s^l = mean(safe) - mean(unsafe) text-only last-prompt-token states, every layer."""
        missing = [k for k in ("unsafe", "safe") if k not in calibration or not calibration[k][1]]
        if missing:
            raise DataError(f"shiftdc fit needs non-empty {' and '.join(missing)} calibration set(s) "
                            "(--calibration-unsafe SPEC --calibration-safe SPEC)")
        layers = list(range(backend.num_layers))
        (unsafe_spec, unsafe), (safe_spec, safe) = calibration["unsafe"], calibration["safe"]
        h_unsafe = text_states(backend, [s.query for s in unsafe], layers, batch_size, "shiftdc fit (unsafe)", progress)
        h_safe = text_states(backend, [s.query for s in safe], layers, batch_size, "shiftdc fit (safe)", progress)
        direction = h_safe.mean(0) - h_unsafe.mean(0)
        manifest = {
            "defense": "shiftdc",
            "model_key": model_key(backend),
            "params": {},
            "calibration": calibration_record(f"unsafe={unsafe_spec};safe={safe_spec}", [s.id for s in unsafe + safe]),
            "calibration_unsafe": {"spec": unsafe_spec, "n": len(unsafe)},
            "calibration_safe": {"spec": safe_spec, "n": len(safe)},
            "direction_norm_per_layer": [round(float(x), 6) for x in direction.norm(dim=-1)],
        }
        return FittedVectors(KIND, direction, manifest)

    def prepare(self, backend: Backend, context: DefenseContext) -> None:
        p = self.params
        if p.direction:
            fitted, where = FittedVectors.load(p.direction, KIND), p.direction
        elif p.calibration_unsafe and p.calibration_safe:
            from harness.registry import tasks
            from harness.runner import load_samples

            key = json.dumps([p.calibration_unsafe, p.calibration_safe, p.calibration_limit, model_key(backend)])
            path = context.cache_dir / f"shiftdc-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
            if path.exists():
                fitted = FittedVectors.load(path, KIND)
            else:
                calib = {}
                for name, spec in (("unsafe", p.calibration_unsafe), ("safe", p.calibration_safe)):
                    task = tasks.build(spec)
                    calib[name] = (task.spec, load_samples(task, p.calibration_limit))
                fitted = self.fit(backend, calib, context.batch_size, context.progress)
                fitted.save(path)
                log.info("shiftdc: fitted safety direction cached at %s", path)
            where = str(path)
        else:
            raise DataError("shiftdc needs direction=FILE (from `realign fit`) or "
                            "calibration_unsafe=TASK_SPEC and calibration_safe=TASK_SPEC")
        fitted.check_model(backend, where)
        fitted.check_overlap(context.eval_ids, p.allow_overlap, where)
        self.fitted = fitted

    def captions(self, backend: Backend, samples: list[Sample]) -> list[Completion]:
        """Query-aware captions by the evaluated VLM itself, one batched greedy generate."""
        requests = [user_request(CAPTION_PROMPT.format(query=s.text), s.image) for s in samples]  # type: ignore[arg-type]
        params = GenerationParams(max_new_tokens=self.params.caption_max_new_tokens)
        return backend.generate(requests, params)

    def corrections(self, backend: Backend, samples: list[Sample], captions: list[str], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrections [B, k, H], projection coefficients [B, k]) from unsteered states."""
        assert self.fitted is not None
        vl = [sample_request(s) for s in samples]
        tt = [text_only(TEXT_WITH_CAPTION.format(query=s.text, caption=c)) for s, c in zip(samples, captions)]
        shift, _, _ = state_difference(backend, vl, tt, layers)  # [B, k, H]
        s = self.fitted.vectors[layers]  # [k, H]
        coef = (shift * s).sum(-1) / (s * s).sum(-1).clamp_min(1e-12)  # [B, k]
        return self.params.alpha * coef[..., None] * s, coef

    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        if self.fitted is None:
            raise RuntimeError("shiftdc: prepare() was not called before generate()")
        start = time.perf_counter()
        layers = parse_layers(self.params.layers, backend.num_layers)
        hidden = backend.hidden_size
        corr = torch.zeros(len(samples), len(layers), hidden)
        coefs = torch.zeros(len(samples), len(layers))
        captions: list[str | None] = [None] * len(samples)
        caption_tokens = [0] * len(samples)
        idx = [i for i, s in enumerate(samples) if s.image is not None]
        if idx:
            subset = [samples[i] for i in idx]
            caps = self.captions(backend, subset)
            texts = [c.text.strip() for c in caps]
            c, k = self.corrections(backend, subset, texts, layers)
            corr[idx], coefs[idx] = c, k
            for i, cap, text in zip(idx, caps, texts):
                captions[i], caption_tokens[i] = text, cap.completion_tokens
        edits = Edits({l: -corr[:, j, :] for j, l in enumerate(layers)}, POSITION_SETS[self.params.positions])
        requests = [sample_request(s) for s in samples]
        completions = backend.generate(requests, params, edits=edits)
        per_sample = (time.perf_counter() - start) / max(len(samples), 1)
        norms = corr.norm(dim=-1)
        out = []
        for i, (s, r, c) in enumerate(zip(samples, requests, completions)):
            applied = captions[i] is not None
            out.append(Generation(
                sample_id=s.id,
                output=c.text,
                prompt=r.to_json(),
                trace={
                    "model_calls": 2 if applied else 1,
                    "extra_forward_passes": 2 if applied else 0,
                    "applied": applied,
                    "caption": captions[i],
                    "caption_tokens": caption_tokens[i],
                    "layers": layers,
                    "projection_coefficients": [round(float(x), 6) for x in coefs[i]],
                    "correction_norms": [round(float(x), 6) for x in norms[i]],
                },
                timings={"seconds": per_sample},
                tokens={"prompt": c.prompt_tokens, "completion": c.completion_tokens},
                error=c.error,
            ))
        return out
