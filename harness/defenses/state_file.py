"""One on-disk format for fitted states (steering vectors, refusal-direction candidates, HiddenDetect
curves, thresholds, calibration scores): a safetensors file whose metadata carries a JSON manifest,
plus the same manifest beside it as `<file>.json` for people. Written through a temporary file so a
reader never sees half a state; read back with one clear error per way a file can be wrong. Tensors
may be numpy arrays or torch tensors (`framework="np"` or `"pt"` on reading); every state module
uses these two functions, so the format and its errors are the same for every defense.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError, safe_open

from harness.errors import DataError


def sidecar(path: Path) -> Path:
    """The human-readable manifest beside a state file."""
    return path.with_name(path.name + ".json")


def write_state(path: str | Path, tensors: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """Write `tensors` (all numpy arrays, or all torch tensors) with `manifest`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    metadata = {"manifest": json.dumps(manifest, sort_keys=True)}
    if all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file as save_np

        save_np(tensors, str(tmp), metadata=metadata)
    else:
        from safetensors.torch import save_file as save_pt

        save_pt({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    sidecar(path).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_state(path: str | Path, what: str, make_hint: str, framework: Literal["np", "pt"] = "np",
               kind: str | None = None, required: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(path, tensors, manifest) of a state file; `path` may name its `.json` sidecar. `what` names
    the kind of file in errors ("jailguard theta file"), `make_hint` how to make one. With `kind`,
    the manifest must say it and the file must hold the `required` tensors."""
    path = Path(path).expanduser()
    if path.name.endswith(".json"):  # the human-readable sidecar names the same state
        path = path.with_name(path.name[: -len(".json")])
    if not path.exists():
        raise DataError(f"{what} {path} does not exist (make one with {make_hint})")
    try:
        with safe_open(str(path), framework="numpy" if framework == "np" else "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        manifest = json.loads(meta["manifest"]) if "manifest" in meta else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{what} {path} is unreadable (not a safetensors state file: {exc})") from None
    if manifest is None:
        raise DataError(f"{what} {path} has no realign manifest (make one with {make_hint})")
    if kind is not None:
        missing = sorted(set(required) - set(tensors))
        if manifest.get("kind") != kind or missing:
            found = f"{manifest.get('kind')!r} state" + (f" without {', '.join(missing)}" if missing else "")
            raise DataError(f"{what} {path} holds {found}, not {kind!r}")
    return path, tensors, manifest
