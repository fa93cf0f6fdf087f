"""CMRM: Cross-Modality Representation Manipulation (Liu et al., arXiv 2410.09047).

The modality shift of layer l is Δ^l = h^l(x, img') - h^l(x): the last-prompt-token state with
a meaningless image minus the text-only state of the same text. The defense subtracts α·Δ^l
from the multimodal hidden states. Dataset level uses the mean shift over an anchor set (fitted
once per model); sample level measures the shift of each input (two extra forwards, batched).
The paper does not say which layers, positions or estimator; those are parameters here, with
the harness defaults of defenses.md, and all of them are recorded in each result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm import tqdm

from harness.contracts.defense import Defense, DefenseContext, sample_request
from harness.defenses.layers import parse_layers
from harness.defenses.shift import layer_vectors, reference_image, state_difference, text_only
from harness.defenses.vectors import FittedVectors, calibration_record, model_key
from harness.errors import DataError
from harness.contracts.backend import Backend, Edits, GenerationParams, user_request
from harness.registry import defense
from harness.schema import Generation, Sample

log = logging.getLogger(__name__)
KIND = "cmrm-shift"


def _image_size(sample: Sample, fallback: int) -> tuple[int, int]:
    img = sample.image
    return img.size if img is not None and not isinstance(img, str) else (fallback, fallback)


@defense("cmrm")
class CMRM(Defense):
    """CMRM: subtract the modality shift (dataset- or sample-level) from multimodal hidden states."""

    requires = frozenset({"steering"})

    @dataclass
    class Params:
        level: Literal["dataset", "sample"] = "dataset"
        # Defaults chosen by `realign sweep` on the model organism (docs/organism_readme.md): the most
        # refusal restored with an image while benign helpfulness drops by at most 0.05.
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

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.fitted: FittedVectors | None = None

    # ---- fitting (dataset level) ------------------------------------------------------
    def _reference(self, backend: Backend, size: tuple[int, int]) -> Any:
        mean = getattr(backend, "image_mean", None)
        return reference_image(self.params.blank, size, self.params.seed, mean)

    def sample_shifts(self, backend: Backend, samples: list[Sample], layers: list[int], size: int | None = None) -> torch.Tensor:
        """[n, len(layers), hidden] shifts h(x, img') - h(x), one batched forward for the batch."""
        with_ref = [
            user_request(s.text, self._reference(backend, _image_size(s, size or self.params.blank_size)))
            for s in samples
        ]
        diff, _, _ = state_difference(backend, with_ref, [text_only(s.text) for s in samples], layers)
        return diff

    def fit(self, backend: Backend, calibration: dict[str, tuple[str, list[Sample]]],
            batch_size: int = 8, progress: bool = False) -> FittedVectors:
        """Mean (or first principal component) shift per layer over the anchor set."""
        if "anchor" not in calibration:
            raise DataError("cmrm fit needs an anchor set (--calibration TASK_SPEC)")
        spec, anchors = calibration["anchor"]
        if not anchors:
            raise DataError(f"calibration task {spec!r} gave no samples")
        layers = list(range(backend.num_layers))
        chunks = []
        for start in tqdm(range(0, len(anchors), batch_size), desc="cmrm fit", disable=not progress, unit="batch"):
            chunks.append(self.sample_shifts(backend, anchors[start : start + batch_size], layers, self.params.blank_size))
        shifts = torch.cat(chunks)  # [n, L, H]
        vectors = shifts.mean(0) if self.params.estimator == "mean" else principal_shift(shifts)
        fit_params = {k: v for k, v in dataclasses.asdict(self.params).items() if k in ("blank", "blank_size", "seed", "estimator")}
        manifest = {
            "defense": "cmrm",
            "model_key": model_key(backend),
            "params": fit_params,
            "calibration": calibration_record(spec, [s.id for s in anchors]),
            "mean_norm_per_layer": [round(float(x), 6) for x in shifts.norm(dim=-1).mean(0)],
        }
        return FittedVectors(KIND, vectors, manifest)

    def prepare(self, backend: Backend, context: DefenseContext) -> None:
        if self.params.level == "sample":
            return
        p = self.params
        if p.vectors:
            fitted = FittedVectors.load(p.vectors, KIND)
            fitted.check_model(backend, p.vectors)
            fitted.check_overlap(context.eval_ids, p.allow_overlap, p.vectors)
        elif p.calibration:
            from harness.runner import load_images, load_samples
            from harness.registry import tasks

            key = json.dumps([p.calibration, p.calibration_limit, p.blank, p.blank_size, p.seed, p.estimator, model_key(backend)])
            path = context.cache_dir / f"cmrm-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
            if path.exists():
                fitted = FittedVectors.load(path, KIND)
            else:
                task = tasks.build(p.calibration)
                anchors = load_samples(task, p.calibration_limit)
                fitted = self.fit(backend, {"anchor": (task.spec, load_images(anchors))}, context.batch_size, context.progress)
                fitted.save(path)
                log.info("cmrm: fitted shifts cached at %s", path)
            fitted.check_model(backend, path)
            fitted.check_overlap(context.eval_ids, p.allow_overlap, path)
        else:
            raise DataError("cmrm level=dataset needs vectors=FILE (from `realign fit`) or calibration=TASK_SPEC")
        self.fitted = fitted

    # ---- generation ---------------------------------------------------------------------
    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        start = time.perf_counter()
        layers = parse_layers(self.params.layers, backend.num_layers)
        has_image = torch.tensor([s.image is not None for s in samples])
        if self.params.level == "sample":
            shifts = self.sample_shifts(backend, samples, layers)  # [B, k, H]
            forwards = 2
        else:
            if self.fitted is None:
                raise RuntimeError("cmrm: prepare() was not called before generate()")
            shifts = self.fitted.vectors[layers].unsqueeze(0).expand(len(samples), -1, -1)
            forwards = 0
        vectors = self.params.alpha * layer_vectors(shifts, layers, self.params.accumulate)
        vectors = vectors * has_image[:, None, None].to(vectors.dtype)  # text-only inputs have no modality shift
        edits = Edits({l: -vectors[:, i, :] for i, l in enumerate(layers)}, frozenset(self.params.positions))
        requests = [sample_request(s) for s in samples]
        completions = backend.generate(requests, params, edits=edits)
        per_sample = (time.perf_counter() - start) / max(len(samples), 1)
        norms = vectors.norm(dim=-1)  # [B, k]
        out = []
        for i, (s, r, c) in enumerate(zip(samples, requests, completions)):
            out.append(Generation(
                sample_id=s.id,
                output=c.text,
                prompt=r.to_json(),
                trace={
                    "model_calls": 1,
                    "extra_forward_passes": forwards if s.image is not None else 0,
                    "level": self.params.level,
                    "layers": layers,
                    "applied": bool(has_image[i]),
                    "vector_norms": [round(float(x), 6) for x in norms[i]],
                },
                timings={"seconds": per_sample},
                tokens={"prompt": c.prompt_tokens, "completion": c.completion_tokens},
                error=c.error,
            ))
        return out


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
