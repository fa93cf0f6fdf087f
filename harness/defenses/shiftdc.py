"""ShiftDC: Activation Shift Disentanglement and Calibration (Zou et al., arXiv 2502.13095).

Only the safety-relevant part of the modality-induced shift is removed. Per layer l:
  s^l = mean h^l(safe text) - mean h^l(unsafe text)            (fitted once, text only)
  m^l = h^l(query, image) - h^l(query + caption, no image)       (per input, unsteered)
  c^l = α · (m^l·s^l / ||s^l||²) · s^l ;  h^l <- h^l - c^l
The caption is written by the evaluated VLM with a query-aware prompt. As in the paper and its
public code, s^l is fitted on the same text-only form as m^l's text side (`direction_input=
query_caption`: each calibration sample with an image is captioned by the model, batched, and the
captions are kept in the fitted file's manifest); `direction_input=query` fits on the bare request.
The public code edits only the last prompt token during prefill, once per layer (`positions=
prefill_only`); editing every generated token too is an option of this harness, not of any
published commit. Both sides use the chat template, and left padding is handled by the backend
(two quirks of the public code that this implementation does not share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from harness.contracts.backend import Backend, Completion, GenerationParams, user_request
from harness.contracts.defense import CalibrationPlan, CalibrationSet, FittedState, sample_request
from harness.defenses.shift import state_difference, text_only
from harness.defenses.steering_base import Steer, SteeringDefense, round_list
from harness.defenses.vectors import FittedVectors
from harness.errors import DataError
from harness.registry import defense
from harness.schema import Sample

KIND = "shiftdc-direction"

# Our wording. The caption asks for what in the image bears on the request; the text-only twin
# of the input is the request followed by that caption.
CAPTION_PROMPT = "Describe what this image shows that is relevant to the following request.\nRequest: {query}"
TEXT_WITH_CAPTION = "{query}\nImage description: {caption}"
POSITION_SETS = {"last_prompt+generated": frozenset({"last_prompt", "generated"}), "prefill_only": frozenset({"last_prompt"})}


@defense("shiftdc")
class ShiftDC(SteeringDefense):
    """ShiftDC: subtract the projection of the image-induced shift on a text-only safety direction."""

    vectors_kind = KIND
    norms_key = "correction_norms"

    @dataclass
    class Params:
        # alpha, layers and positions were chosen by `realign sweep` on the model organism (README,
        # "Choosing the CMRM and ShiftDC defaults"): the most refusal restored with an image while
        # benign helpfulness drops by at most 0.05, with the direction fitted on query + caption. The
        # sweep picked the organism's last layer, its top quarter; stated relative to depth
        # (`top:0.25`) it means the same share of any model. alpha 1 is also the paper's (it has none).
        alpha: float = 1.0
        layers: str = "top:0.25"
        positions: Literal["last_prompt+generated", "prefill_only"] = "prefill_only"
        direction_input: Literal["query_caption", "query"] = "query_caption"
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

    def positions(self) -> frozenset[str]:
        return POSITION_SETS[self.params.positions]

    # ---- calibration -----------------------------------------------------------------------
    def _fit_params(self) -> dict[str, object]:
        p = self.params
        out: dict[str, object] = {"direction_input": p.direction_input}
        if p.direction_input == "query_caption":
            out["caption_max_new_tokens"] = p.caption_max_new_tokens
        return out

    def calibration(self) -> CalibrationPlan:
        p = self.params
        sets = {"unsafe": p.calibration_unsafe, "safe": p.calibration_safe} if p.calibration_unsafe else {}
        return CalibrationPlan(
            kind="shiftdc", file=p.direction, sets=sets, limit=p.calibration_limit,  # type: ignore[arg-type]
            allow_overlap=p.allow_overlap, fit_key=self._fit_params(),
            missing="shiftdc needs direction=FILE (from `realign fit`) or "
                    "calibration_unsafe=TASK_SPEC and calibration_safe=TASK_SPEC")

    def direction_texts(self, backend: Backend, samples: list[Sample], batch_size: int) -> tuple[list[str], dict[str, str]]:
        """The text-only inputs s^l is fitted on, and the captions written for them.

        `query_caption`: a sample with an image becomes `{text}\nImage description: {caption}` (the
        form of m^l's text side); `query` (or a sample without an image): the bare request."""
        if self.params.direction_input == "query":
            return [s.query for s in samples], {}
        with_image = [s for s in samples if s.image is not None]
        captions: dict[str, str] = {}
        for start in range(0, len(with_image), batch_size):
            batch = with_image[start : start + batch_size]
            captions.update({s.id: c.text.strip() for s, c in zip(batch, self.captions(backend, batch))})
        texts = [TEXT_WITH_CAPTION.format(query=s.text, caption=captions[s.id]) if s.id in captions else s.query
                 for s in samples]
        return texts, captions

    def fit(self, backend: Backend, sets: dict[str, CalibrationSet], batch_size: int = 8,
            progress: bool = False) -> FittedVectors:
        """s^l = mean(safe) - mean(unsafe) text-only last-prompt-token states, every layer."""
        missing = [k for k in ("unsafe", "safe") if k not in sets or not sets[k].samples]
        if missing:
            raise DataError(f"shiftdc fit needs non-empty {' and '.join(missing)} calibration set(s) "
                            "(--calibration-unsafe SPEC --calibration-safe SPEC)")
        texts, captions = {}, {}
        for role in ("unsafe", "safe"):
            texts[role], caps = self.direction_texts(backend, sets[role].samples, batch_size)
            captions.update(caps)
        means = self.mean_states(backend, texts, batch_size, progress)
        direction = means["safe"] - means["unsafe"]
        return self.fitted_vectors(
            backend, direction, {"unsafe": sets["unsafe"], "safe": sets["safe"]}, params=self._fit_params(),
            captions=captions, direction_norm_per_layer=[round(float(x), 6) for x in direction.norm(dim=-1)])

    def use_state(self, state: FittedState, backend: Backend) -> None:
        """Refuse a direction fitted on another input form than configured (files from before this
        option existed were fitted on the bare query)."""
        fitted_on = (state.manifest.get("params") or {}).get("direction_input", "query")
        if fitted_on != self.params.direction_input:
            raise DataError(f"the shiftdc direction was fitted with direction_input={fitted_on}, but this run "
                            f"asks for direction_input={self.params.direction_input}; set it to {fitted_on} "
                            "or fit a new direction")
        super().use_state(state, backend)

    # ---- generation ------------------------------------------------------------------------
    def captions(self, backend: Backend, samples: list[Sample]) -> list[Completion]:
        """Query-aware captions by the evaluated VLM itself, one batched greedy generate."""
        requests = [user_request(CAPTION_PROMPT.format(query=s.text), s.image) for s in samples]  # type: ignore[arg-type]
        params = GenerationParams(max_new_tokens=self.params.caption_max_new_tokens)
        return backend.generate(requests, params)

    def corrections(self, backend: Backend, samples: list[Sample], captions: list[str], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrections [B, k, H], projection coefficients [B, k]) from unsteered states."""
        vl = [sample_request(s) for s in samples]
        tt = [text_only(TEXT_WITH_CAPTION.format(query=s.text, caption=c)) for s, c in zip(samples, captions)]
        shift, _, _ = state_difference(backend, vl, tt, layers)  # [B, k, H]
        s = self.fitted().vectors[layers]  # [k, H]
        coef = (shift * s).sum(-1) / (s * s).sum(-1).clamp_min(1e-12)  # [B, k]
        return self.params.alpha * coef[..., None] * s, coef

    def steer(self, backend: Backend, samples: list[Sample], layers: list[int]) -> Steer:
        self.fitted()
        hidden = backend.decoder_size().hidden_size  # type: ignore[attr-defined]
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
        traces = []
        for i in range(len(samples)):
            applied = captions[i] is not None
            traces.append({"model_calls": 2 if applied else 1, "extra_forward_passes": 2 if applied else 0,
                           "applied": applied, "caption": captions[i], "caption_tokens": caption_tokens[i],
                           "projection_coefficients": round_list(coefs[i])})
        return Steer(-corr, traces)
