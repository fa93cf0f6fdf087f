"""The refusal direction's fitted state: every candidate direction, the selection scores, the choice,
and (when a gate set was given) the benign projections a gate threshold is set on.

Tensors (safetensors): `candidates` [P, L, H] float32 (r for each post-instruction position p = -P..-1,
row p + P, and each layer); `ablation_refusal`, `steering`, `kl` [P, L] float64 (the selection scores);
optionally `gate_benign` [n, P, L] float64, the block-input projections h^l[p]·r̂[p, l] of the benign
gate inputs (as sent: image and text), and `gate_harmful_val` [m, P, L], the same for the harmful
validation texts (only to report how well the projection separates). Keeping every candidate, score
and projection means a run may choose another layer, position or false-positive rate without
refitting, and a human can audit the choice from the file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from harness.contracts.backend import Backend
from harness.defenses.state_file import read_state, write_state
from harness.defenses.vectors import FORMAT_VERSION, model_key, model_mismatch
from harness.errors import DataError

KIND = "refusal-direction"
SCORES = ("ablation_refusal", "steering", "kl")
GATE = ("gate_benign", "gate_harmful_val")


@dataclass
class RefusalDirState:
    """A `FittedState`: the candidates, the score tables, optional gate projections, and a manifest
    (model, calibration ids, fit parameters, the selection and why candidates were discarded)."""

    candidates: torch.Tensor
    scores: dict[str, torch.Tensor]
    gate: dict[str, torch.Tensor]
    manifest: dict[str, Any]

    @property
    def num_positions(self) -> int:
        return int(self.candidates.shape[0])

    def direction(self, position: int, layer: int) -> torch.Tensor:
        """r at (position from the prompt end, layer): [hidden] float32, unnormalised."""
        if not -self.num_positions <= position <= -1:
            raise DataError(f"position {position} is not one of the fitted post-instruction positions "
                            f"-{self.num_positions}..-1")
        return self.candidates[position, layer]

    def save(self, path: str | Path) -> Path:
        manifest = {**self.manifest, "kind": KIND, "format_version": FORMAT_VERSION}
        tensors = {"candidates": self.candidates.detach().float()}
        tensors.update({k: v.detach().double() for k, v in self.scores.items()})
        tensors.update({k: v.detach().double() for k, v in self.gate.items()})
        return write_state(path, tensors, manifest)

    @classmethod
    def load(cls, path: str | Path) -> RefusalDirState:
        path, tensors, manifest = read_state(path, "refusal direction file", "`realign fit --defense refusal_dir ...`",
                                             framework="pt", kind=KIND, required=("candidates", *SCORES))
        return cls(tensors["candidates"].float(), {k: tensors[k].double() for k in SCORES},
                   {k: tensors[k].double() for k in GATE if k in tensors}, manifest)

    def check_model(self, backend: Backend, where: str | Path | None = None) -> None:
        """Refuse a state fitted on other weights, depth or width (the rule of fitted vectors)."""
        where = f"refusal direction file {where}" if where else "refusal direction"
        want = model_key(backend)
        differs = model_mismatch(self.manifest.get("model_key", {}), want)
        if differs:
            raise DataError(f"{where} was made for {differs}; fit it for this model with `realign fit`")
        if tuple(self.candidates.shape[1:]) != (want["num_layers"], want["hidden_size"]):
            raise DataError(f"{where} has candidates of shape {tuple(self.candidates.shape)}, expected "
                            f"[P, {want['num_layers']}, {want['hidden_size']}]")

    def calibration_ids(self) -> set[str]:
        return set(self.manifest.get("calibration", {}).get("ids", []))
