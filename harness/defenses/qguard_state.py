"""QGuard's calibrated threshold as a fitted state: the calibration samples' risks and a manifest.

A QGuard risk is computed by the guard model from the questions, the yes/no variants and the graph
weights; the model being defended plays no part unless it is its own guard (guard=self). So the
state names its guard (the guard's `backend_key`, as for a target: folder fingerprint, else name
and revision, plus the spec for humans) and those risk settings, and `check_guard` refuses it when
the defense that loads it asks another guard or scores with other settings. With guard=self the
guard is the target, so `check_model` (which the calibration stage calls with the target) already
refuses it for another model; with a separate guard the target is only recorded.

Every benign risk is kept (and every harmful one when `calibration_unsafe=` was given), so τ is
derived with the run's own `fpr` (`tau`), as HiddenDetect derives its τ from kept curves: a run's
recorded `fpr` is the one applied, and changing it needs no guard call. The manifest also records τ,
the calibration false-positive rate and the AUROC for the fit's parameters, for a human reading it.
The file is safetensors (float64 `risks_benign`, `risks_unsafe`) with the manifest in its metadata
and beside it as `<file>.json`, written like every other fitted state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.contracts.backend import Backend
from harness.defenses.state_file import read_state, write_state
from harness.defenses.thresholds import backend_key, key_mismatch, threshold_at_fpr
from harness.errors import DataError

KIND = "qguard-risks"
SELF = "self"  # the guard spec that makes the target its own guard


@dataclass
class QGuardState:
    """Calibration risks by role ("benign", optionally "unsafe") plus a manifest; a `FittedState`."""

    risks: dict[str, np.ndarray]
    manifest: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        tensors = {f"risks_{role}": np.ascontiguousarray(r, dtype=np.float64) for role, r in self.risks.items()}
        return write_state(path, tensors, {**self.manifest, "kind": KIND})

    @classmethod
    def load(cls, path: str | Path) -> QGuardState:
        path, tensors, manifest = read_state(path, "qguard threshold file",
                                             "`realign fit --defense qguard:guard=...,calibration=TASK_SPEC ...`")
        if manifest.get("kind") != KIND or "risks_benign" not in tensors or "guard" not in manifest:
            raise DataError(f"{path} is not a qguard threshold file (kind {manifest.get('kind')!r})")
        return cls({k.removeprefix("risks_"): v.astype(np.float64) for k, v in tensors.items()}, manifest)

    def tau(self, fpr: float) -> float:
        """The threshold at `fpr` on the benign risks (at most that share lies strictly above it)."""
        return threshold_at_fpr(self.risks["benign"].tolist(), fpr)

    def check_model(self, backend: Backend, where: str) -> None:
        """A state fitted with guard=self belongs to its model as target and guard: refuse it for
        another target. A separate guard's risks do not depend on the target (see `check_guard`)."""
        guard = self.manifest.get("guard") or {}
        if guard.get("spec") != SELF:
            return
        have, want = guard.get("key") or {}, backend_key(backend)
        key = key_mismatch(have, want)
        if key is not None:
            raise DataError(f"qguard threshold {where} was calibrated with guard=self on {have.get('model')} "
                            f"({key}={have.get(key)!r}), not on {want.get('model')} ({key}={want.get(key)!r}); "
                            "calibrate again for this model")

    def check_guard(self, guard_key: dict[str, Any], guard_spec: str, settings: dict[str, Any]) -> None:
        """Refuse risks measured by another guard model or with other risk settings (questions,
        wording, yes/no variants, graph weights): τ on them would not fit this defense's risks."""
        fitted = self.manifest.get("guard") or {}
        have = fitted.get("key") or {}
        key = key_mismatch(have, guard_key)
        if key is not None:
            raise DataError(f"qguard threshold state was calibrated with guard {fitted.get('spec')!r} "
                            f"({have.get('model')}, {key}={have.get(key)!r}), but this defense's guard {guard_spec!r} "
                            f"is {guard_key.get('model')} ({key}={guard_key.get(key)!r}); calibrate again with this guard")
        stored = self.manifest.get("settings") or {}
        for name, value in settings.items():
            if stored.get(name) != value:
                raise DataError(f"qguard threshold state was calibrated with {name}={stored.get(name)!r}, but this "
                                f"defense uses {name}={value!r}; calibrate again with these settings")

    def calibration_ids(self) -> set[str]:
        return set(self.manifest.get("calibration", {}).get("ids", []))
