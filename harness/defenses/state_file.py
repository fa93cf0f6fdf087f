"""One on-disk format for small fitted states (thresholds, calibration scores): a safetensors file
of numpy arrays whose metadata carries a JSON manifest, plus the same manifest beside it as
`<file>.json` for people. Written through a temporary file so a reader never sees half a state;
read back with one clear error per way a file can be wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from harness.errors import DataError


def write_state(path: str | Path, tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest, sort_keys=True)})
    os.replace(tmp, path)
    path.with_name(path.name + ".json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                                   encoding="utf-8")
    return path


def read_state(path: str | Path, what: str, make_hint: str) -> tuple[Path, dict[str, np.ndarray], dict[str, Any]]:
    """(path, tensors, manifest) of a state file; `path` may name its `.json` sidecar. `what` names
    the kind of file in errors ("jailguard theta file"), `make_hint` how to make one."""
    path = Path(path).expanduser()
    if path.name.endswith(".json"):  # the human-readable sidecar names the same state
        path = path.with_name(path.name[: -len(".json")])
    if not path.exists():
        raise DataError(f"{what} {path} does not exist (make one with {make_hint})")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        manifest = json.loads(meta.get("manifest", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{what} {path} is unreadable: {exc}") from None
    return path, tensors, manifest
