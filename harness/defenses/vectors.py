"""Fitted per-layer vectors (CMRM shifts, ShiftDC safety directions): a `FittedState` to save, load, check.

A file is safetensors (tensor `vectors`: [num_layers, hidden]) plus a JSON manifest, stored
both in the safetensors metadata and beside it (`<file>.json`) for humans. The manifest names
the model, its layer count and hidden size, the defense parameters and the calibration ids,
so a file made for another model is refused and calibration/evaluation overlap is detectable.

A local model folder is matched by its content fingerprint (`harness.models.hf_loading.folder_fingerprint`),
not by the path string it was given as: the path `organisms/seed0` may hold other weights in
another working directory, and `/abs/organisms/seed0` is the same model. Hub ids are matched by
id and revision. Files written before fingerprints were recorded are checked by path as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from harness.contracts.backend import Backend
from harness.defenses.state_file import read_state, write_state
from harness.errors import DataError

FORMAT_VERSION = 1


def ids_digest(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def model_key(backend: Backend) -> dict[str, Any]:
    """The parts of a backend's identity a fitted file must match. `fingerprint` (local folders
    only) is the folder's content fingerprint; `model` is kept for humans and for hub ids."""
    ident = backend.identity()
    size = backend.decoder_size()  # type: ignore[attr-defined]  (steering defenses only)
    key: dict[str, Any] = {
        "model": ident.get("pretrained") or ident.get("model") or backend.spec,
        "revision": ident.get("revision"),
        "num_layers": size.num_layers,
        "hidden_size": size.hidden_size,
    }
    if ident.get("folder_hash"):
        key["fingerprint"] = ident["folder_hash"]
    return key


def model_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """What differs between the model a state was made for (`have`) and this one (`want`), or None.

    Shapes always count. Weights: by content fingerprint when both sides have one (path strings
    then do not matter), else by model id and revision (hub ids, and files from before fingerprints).
    """
    keys = ["num_layers", "hidden_size"]
    keys += ["fingerprint"] if have.get("fingerprint") and want.get("fingerprint") else ["model", "revision"]
    for key in keys:
        if have.get(key) != want.get(key):
            what = f"{key}={have.get(key)!r}, but the model has {key}={want.get(key)!r}"
            if key == "fingerprint":
                what = (f"weights with folder fingerprint {have[key]!r} ({have.get('model')}), but the model "
                        f"{want.get('model')} has fingerprint {want[key]!r} (other weights)")
            return what
    return None


@dataclass
class FittedVectors:
    kind: str
    vectors: torch.Tensor  # [num_layers, hidden], float32
    manifest: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        manifest = {**self.manifest, "kind": self.kind, "format_version": FORMAT_VERSION}
        return write_state(path, {"vectors": self.vectors.detach().float()}, manifest)

    @classmethod
    def load(cls, path: str | Path, kind: str) -> FittedVectors:
        path, tensors, manifest = read_state(path, "vector file", "`realign fit`", framework="pt", kind=kind,
                                             required=("vectors",))
        return cls(kind, tensors["vectors"].float(), manifest)

    def check_model(self, backend: Backend, where: str | Path | None = None) -> None:
        """Refuse vectors fitted on other weights, layer count or hidden size (see `model_mismatch`)."""
        where = f"vector file {where}" if where else "fitted vectors"
        want = model_key(backend)
        differs = model_mismatch(self.manifest.get("model_key", {}), want)
        if differs:
            raise DataError(f"{where} was made for {differs}; fit vectors for this model with `realign fit`")
        if tuple(self.vectors.shape) != (want["num_layers"], want["hidden_size"]):
            raise DataError(f"{where} has shape {tuple(self.vectors.shape)}, expected "
                            f"({want['num_layers']}, {want['hidden_size']})")

    def calibration_ids(self) -> set[str]:
        return set(self.manifest.get("calibration", {}).get("ids", []))


def calibration_record(spec: str, ids: list[str]) -> dict[str, Any]:
    return {"spec": spec, "n": len(ids), "ids_sha256": ids_digest(ids), "ids": sorted(ids)}
