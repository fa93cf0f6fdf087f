"""CMRM: Cross-Modality Representation Manipulation (Liu et al., arXiv 2410.09047).

The modality shift of layer l is Δ^l = h^l(x, img') - h^l(x): the last-prompt-token state with
a meaningless image minus the text-only state of the same text. The defense subtracts α·Δ^l
from the multimodal hidden states. Dataset level uses the mean shift over an anchor set (fitted
once per model); sample level measures the shift of each input (two extra forwards, batched).
The paper does not say which layers, positions or estimator; those are parameters here, with
harness defaults set by the organism sweep (README, "CMRM"), and all of them are recorded in each result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm import tqdm

from harness.contracts.backend import Backend, user_request
from harness.contracts.defense import CalibrationPlan, CalibrationSet
from harness.defenses.shift import layer_vectors, reference_image, state_difference, text_only
from harness.defenses.steering_base import Steer, SteeringDefense
from harness.defenses.vectors import FittedVectors
from harness.errors import DataError
from harness.registry import defense
from harness.schema import Sample

KIND = "cmrm-shift"
FIT_PARAMS = ("blank", "blank_size", "seed", "estimator")


def _image_size(sample: Sample, fallback: int) -> tuple[int, int]:
    img = sample.image
    return img.size if img is not None and not isinstance(img, str) else (fallback, fallback)  # type: ignore[union-attr]


@defense("cmrm")
class CMRM(SteeringDefense):
    """CMRM: subtract the modality shift (dataset- or sample-level) from multimodal hidden states."""

    vectors_kind = KIND

    @dataclass
    class Params:
        level: Literal["dataset", "sample"] = "dataset"
        # Defaults chosen by `realign sweep` on the model organism (README, "Choosing the CMRM and
        # ShiftDC defaults"): the most refusal restored with an image while benign helpfulness drops
        # by at most 0.05. `all` is relative to depth, so it means the same on any model.
        alpha: float = 0.7
        layers: str = "all"
        positions: list[Literal["last_prompt", "prompt", "generated"]] = field(default_factory=lambda: ["last_prompt"])
        accumulate: Literal["independent", "incremental"] = "independent"
        blank: Literal["blank", "noise", "mean"] = "blank"
        blank_size: int = 336
        seed: int = 0
        estimator: Literal["mean", "pc1"] = "mean"
        vectors: str | None = None
        calibration: str | None = None
        calibration_limit: int | None = None
        allow_overlap: bool = False

        def __post_init__(self) -> None:
            if not self.positions:
                raise ValueError("positions must name at least one of last_prompt, prompt, generated")
            if self.level == "sample" and (self.vectors or self.calibration or self.estimator != "mean"):
                raise ValueError("vectors=, calibration= and estimator=pc1 apply to level=dataset only")

    # ---- calibration (dataset level) -------------------------------------------------------
    def calibration(self) -> CalibrationPlan | None:
        p = self.params
        if p.level == "sample":
            return None
        return CalibrationPlan(
            kind="cmrm", file=p.vectors, sets={"anchor": p.calibration} if p.calibration else {},
            limit=p.calibration_limit, allow_overlap=p.allow_overlap,
            fit_key={k: getattr(p, k) for k in FIT_PARAMS},
            missing="cmrm level=dataset needs vectors=FILE (from `realign fit`) or calibration=TASK_SPEC")

    def _reference(self, backend: Backend, size: tuple[int, int]) -> Any:
        return reference_image(self.params.blank, size, self.params.seed, backend.image_mean())

    def sample_shifts(self, backend: Backend, samples: list[Sample], layers: list[int], size: int | None = None) -> torch.Tensor:
        """[n, len(layers), hidden] shifts h(x, img') - h(x), one batched forward for the batch."""
        with_ref = [
            user_request(s.text, self._reference(backend, _image_size(s, size or self.params.blank_size)))
            for s in samples
        ]
        diff, _, _ = state_difference(backend, with_ref, [text_only(s.text) for s in samples], layers)
        return diff

    def fit(self, backend: Backend, sets: dict[str, CalibrationSet], batch_size: int = 8,
            progress: bool = False) -> FittedVectors:
        """Mean (or first principal component) shift per layer over the anchor set."""
        if "anchor" not in sets:
            raise DataError("cmrm fit needs an anchor set (--calibration TASK_SPEC)")
        anchors = sets["anchor"].samples
        if not anchors:
            raise DataError(f"calibration task {sets['anchor'].spec!r} gave no samples")
        layers = list(range(backend.decoder_size().num_layers))  # type: ignore[attr-defined]
        chunks = []
        for start in tqdm(range(0, len(anchors), batch_size), desc="cmrm fit", disable=not progress, unit="batch"):
            chunks.append(self.sample_shifts(backend, anchors[start : start + batch_size], layers, self.params.blank_size))
        shifts = torch.cat(chunks)  # [n, L, H]
        vectors = shifts.mean(0) if self.params.estimator == "mean" else principal_shift(shifts)
        return self.fitted_vectors(
            backend, vectors, {"anchor": sets["anchor"]},
            params={k: getattr(self.params, k) for k in FIT_PARAMS},
            mean_norm_per_layer=[round(float(x), 6) for x in shifts.norm(dim=-1).mean(0)])

    # ---- generation ---------------------------------------------------------------------
    def steer(self, backend: Backend, samples: list[Sample], layers: list[int]) -> Steer:
        has_image = torch.tensor([s.image is not None for s in samples])
        if self.params.level == "sample":
            shifts = self.sample_shifts(backend, samples, layers)  # [B, k, H]
            forwards = 2
        else:
            shifts = self.fitted().vectors[layers].unsqueeze(0).expand(len(samples), -1, -1)
            forwards = 0
        vectors = self.params.alpha * layer_vectors(shifts, layers, self.params.accumulate)
        vectors = vectors * has_image[:, None, None].to(vectors.dtype)  # text-only inputs have no modality shift
        traces = [{"extra_forward_passes": forwards if s.image is not None else 0, "level": self.params.level,
                   "applied": bool(has_image[i])} for i, s in enumerate(samples)]
        return Steer(-vectors, traces)

def principal_shift(shifts: torch.Tensor) -> torch.Tensor:
    """Per layer: the first principal direction of the per-sample shifts (unit norm), scaled by
    the mean projection of the shifts on it. shifts: [n, L, H] -> [L, H]."""
    n, num_layers, _ = shifts.shape
    out = torch.zeros(shifts.shape[1:], dtype=torch.float32)
    for l in range(num_layers):
        x = shifts[:, l, :].double()
        centred = x - x.mean(0, keepdim=True)
        if n < 2 or float(centred.norm()) == 0.0:
            direction = x.mean(0)
            direction = direction / direction.norm().clamp_min(1e-12)
        else:
            direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        out[l] = ((x @ direction).mean() * direction).float()
    return out
