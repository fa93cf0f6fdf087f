"""Where white-box optimisations live on disk: one folder per (model, defense, sample, budget,
parameters) key, holding the running checkpoint and, once finished, the image.

Why a cache keyed this way: an optimisation costs minutes to hours, a run may be interrupted, and
the same transfer image is evaluated under every defense of a run. The key hashes everything that
changes the result (the model's content fingerprint, the defense's spec, parameters and fitted
state, the sample's id, text and clean image, the budget and the attack's parameters), so a hit is
always the same optimisation, and anything else starts afresh.

Files: `checkpoint.safetensors` (the current 8-bit image, the clean one, the generator state; the
step, the loss history and the objective's held state such as ShiftDC's caption in its metadata),
replaced atomically every `checkpoint_every` steps; when done, `image.png` (8-bit RGB, lossless), `clean.png`
and `record.json`. A finished image is re-read and re-verified (pixel range and L-inf budget, exactly)
before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.errors import DataError
from harness.whitebox.pixels import from_image, to_image

#: Backend identity fields that change an optimisation's result (not the device or library versions).
#: Keys a fitted state's manifest gains when it is written to a file (not part of what was fitted).
FILE_KEYS = ("kind", "format_version")
MODEL_FIELDS = ("model", "revision", "commit", "folder_hash", "dtype", "model_class", "processor_class")


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(backend: Any) -> dict[str, Any]:
    ident = backend.identity()
    return {k: ident.get(k) for k in MODEL_FIELDS if ident.get(k) is not None} or {"spec": backend.spec}


def defense_fingerprint(defense: Any | None) -> dict[str, Any] | None:
    """The defense's identity plus a digest of its fitted state's manifest (which names its calibration)."""
    if defense is None:
        return None
    state = getattr(defense, "state", None) or getattr(defense, "pool", None)
    manifest = getattr(state, "manifest", None)
    if isinstance(manifest, dict):  # the same state fitted now or loaded from its file (which adds these)
        manifest = {k: v for k, v in manifest.items() if k not in FILE_KEYS}
    return {"identity": defense.identity(), "state": digest(manifest) if manifest is not None else None}


@dataclass
class Checkpoint:
    step: int
    u: torch.Tensor  # [3, H, W] int16, the current image in 8-bit units
    u0: torch.Tensor  # [3, H, W] int16, the clean image
    rng: torch.Tensor  # the torch.Generator state (uint8)
    history: list[float] = field(default_factory=list)
    objective: dict[str, Any] = field(default_factory=dict)


class Entry:
    """One optimisation's folder."""

    def __init__(self, root: Path, key: str, parts: dict[str, Any]) -> None:
        self.root, self.key, self.parts = root, key, parts

    @classmethod
    def at(cls, cache: Path, attack: str, parts: dict[str, Any]) -> Entry:
        key = digest(parts)[:24]
        return cls(Path(cache) / attack / key, key, parts)

    @property
    def image_path(self) -> Path:
        return self.root / "image.png"

    def done(self) -> bool:
        return self.image_path.is_file() and (self.root / "record.json").is_file()

    # ---- checkpoints ---------------------------------------------------------------------------
    def load_checkpoint(self) -> Checkpoint | None:
        """The last checkpoint, or None. One file, replaced atomically: tensors and metadata agree."""
        path = self.root / "checkpoint.safetensors"
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        if meta.get("key") != self.key:
            return None
        tensors = load_file(str(path))
        return Checkpoint(int(meta["step"]), tensors["u"], tensors["u0"], tensors["rng"], meta.get("history", []),
                          meta.get("objective", {}))

    def save_checkpoint(self, ck: Checkpoint) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".checkpoint.tmp{os.getpid()}"
        meta = {"key": self.key, "step": ck.step, "history": ck.history, "objective": ck.objective, "parts": self.parts}
        save_file({"u": ck.u.contiguous(), "u0": ck.u0.contiguous(), "rng": ck.rng.contiguous()}, str(tmp),
                  metadata={"meta": json.dumps(meta, sort_keys=True, default=str)})
        os.replace(tmp, self.root / "checkpoint.safetensors")

    # ---- results -------------------------------------------------------------------------------
    def save_result(self, u: torch.Tensor, u0: torch.Tensor, eps: int, record: dict[str, Any]) -> dict[str, Any]:
        """Write the image losslessly, re-read and verify it, then the record (written last: its
        presence marks the entry done)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name, img in (("image.png", u), ("clean.png", u0)):
            tmp = self.root / f".{name}.tmp{os.getpid()}.png"
            to_image(img).save(tmp, format="PNG")
            os.replace(tmp, self.root / name)
        back = verify(self.image_path, self.root / "clean.png", eps)
        if not torch.equal(back, u.to(torch.int16)):
            raise DataError(f"{self.image_path}: the PNG read back differs from the optimised image")
        record = {**record, "key": self.key, "image": str(self.image_path),
                  "sha256": hashlib.sha256(self.image_path.read_bytes()).hexdigest()}
        _write_text(self.root / "record.json", json.dumps(record, indent=2, sort_keys=True, default=str))
        return record

    def load_result(self, eps: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = json.loads((self.root / "record.json").read_text(encoding="utf-8"))
        u = verify(self.image_path, self.root / "clean.png", eps)
        if hashlib.sha256(self.image_path.read_bytes()).hexdigest() != record.get("sha256"):
            raise DataError(f"{self.image_path}: content differs from its record (edited?); delete {self.root}")
        return u, record


def verify(image: Path, clean: Path, eps: int) -> torch.Tensor:
    """The 8-bit image at `image`, after checking exactly that it is within `eps` units of `clean`
    (L-inf) and in [0, 255] (8-bit RGB)."""
    with Image.open(image) as im:
        if im.mode != "RGB":
            raise DataError(f"{image}: mode {im.mode}, expected 8-bit RGB")
        u = from_image(im)
    with Image.open(clean) as im:
        u0 = from_image(im)
    dist = int((u - u0).abs().max()) if u.shape == u0.shape else None
    if dist is None or dist > eps or int(u.min()) < 0 or int(u.max()) > 255:
        raise DataError(f"{image}: L-inf distance {dist} from the clean image exceeds the budget {eps}/255")
    return u


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
