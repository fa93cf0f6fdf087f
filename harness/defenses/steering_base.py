"""The base of every defense that edits hidden states: it supplies only how its vectors are computed.

A steering defense adds a per-sample vector to the outputs of some decoder layers, at some token
positions, while the model generates (CMRM subtracts a modality shift, ShiftDC the safety part of
it, a refusal-direction defense adds α·r). Everything else is the same for all of them and lives
here once: resolving the layer spec against the model's depth, building the edit, one batched
generate, the per-sample trace (layers, vector norms, model calls) and the timing; plus, for a
defense fitted on calibration data, loading and keeping its `FittedVectors`.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from harness.contracts.backend import Backend, Edits, GenerationParams
from harness.contracts.defense import CalibrationSet, Defense, FittedState, generation, sample_request
from harness.defenses.layers import check_layers, parse_layers
from harness.defenses.shift import text_states
from harness.defenses.vectors import FittedVectors, calibration_record, model_key
from harness.schema import Generation, Sample


@dataclass
class Steer:
    """One batch's edit: `vectors` [batch, len(layers), hidden] to ADD at the defense's layers (a
    defense that subtracts passes the negated vector), and extra trace fields per sample."""

    vectors: torch.Tensor
    traces: list[dict[str, Any]]


def round_list(values: torch.Tensor) -> list[float]:
    """Numbers recorded in a trace: 6 decimals, enough to audit, small enough to read."""
    return [round(float(x), 6) for x in values]


class SteeringDefense(Defense):
    """Subclasses define `Params` (with `layers` and `positions`) and `steer()`; fitted ones also
    `vectors_kind`, `calibration()` and `fit()` (see `fitted_vectors` for the manifest)."""

    requires = frozenset({"steering"})
    #: The trace key holding the per-layer norms of the applied vectors.
    norms_key: ClassVar[str] = "vector_norms"
    #: The `kind` recorded in this defense's fitted-vector files ("" for a defense that fits nothing).
    vectors_kind: ClassVar[str] = ""

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        check_layers(str(params.layers))
        self.state: FittedVectors | None = None

    # ---- what a subclass may override --------------------------------------------------------
    def layers(self, backend: Backend) -> list[int]:
        return parse_layers(str(self.params.layers), backend.decoder_size().num_layers)  # type: ignore[attr-defined]

    def positions(self) -> frozenset[str]:
        positions = self.params.positions
        return frozenset([positions] if isinstance(positions, str) else positions)

    @abstractmethod
    def steer(self, backend: Backend, samples: list[Sample], layers: list[int]) -> Steer:
        """The vectors to add for this batch (and what to trace). Samples have loaded images."""

    # ---- fitted vectors ------------------------------------------------------------------------
    def load_state(self, path: str | Path) -> FittedState:
        return FittedVectors.load(path, self.vectors_kind)

    def use_state(self, state: FittedState, backend: Backend) -> None:
        assert isinstance(state, FittedVectors)
        self.state = state

    def fitted(self) -> FittedVectors:
        if self.state is None:
            raise RuntimeError(f"{self.spec or type(self).__name__}: no fitted vectors; the calibration "
                               "stage (harness.calibration.prepare) must run before generate()")
        return self.state

    def mean_states(self, backend: Backend, texts: dict[str, list[str]], batch_size: int = 8,
                    progress: bool = False) -> dict[str, torch.Tensor]:
        """Per role, the mean [num_layers, hidden] last-prompt-token state of its text-only inputs
        (difference-in-means directions are built from these)."""
        layers = list(range(backend.decoder_size().num_layers))  # type: ignore[attr-defined]
        return {role: text_states(backend, items, layers, batch_size, f"{self.spec or 'fit'} ({role})", progress).mean(0)
                for role, items in texts.items()}

    def fitted_vectors(self, backend: Backend, vectors: torch.Tensor, sets: dict[str, CalibrationSet],
                       **manifest: Any) -> FittedVectors:
        """A FittedVectors ([num_layers, hidden]) whose manifest names this model and every calibration set."""
        ids = [s.id for cs in sets.values() for s in cs.samples]
        specs = ";".join(f"{role}={cs.spec}" for role, cs in sets.items())
        return FittedVectors(self.vectors_kind, vectors.float(), {
            "defense": getattr(self, "registered_name", type(self).__name__),
            "model_key": model_key(backend),
            "calibration": calibration_record(specs, ids),
            **{f"calibration_{role}": {"spec": cs.spec, "n": len(cs.samples)} for role, cs in sets.items()},
            **manifest,
        })

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        start = time.perf_counter()
        layers = self.layers(backend)
        steer = self.steer(backend, samples, layers)
        edits = Edits({layer: steer.vectors[:, i, :] for i, layer in enumerate(layers)}, self.positions())
        requests = [sample_request(s) for s in samples]
        completions = backend.generate(requests, params, edits=edits)
        seconds = (time.perf_counter() - start) / max(len(samples), 1)
        norms = steer.vectors.norm(dim=-1)
        return [
            generation(s, r, c, seconds, {"model_calls": 1, "layers": layers, **extra, self.norms_key: round_list(norms[i])})
            for i, (s, r, c, extra) in enumerate(zip(samples, requests, completions, steer.traces))
        ]
