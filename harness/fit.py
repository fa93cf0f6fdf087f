"""`realign fit`: precompute a defense's state (CMRM shifts, ShiftDC directions, AdaShield-A prompt
pools) once per model, through the calibration stage every run uses."""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness import calibration
from harness.errors import DataError, RunDirError
from harness.models.resolve import load_backend, resolve_backend
from harness.registry import defenses
from harness.schema import check_count, check_dtype


def fit_defense(
    model: str, defense_spec: str, roles: dict[str, str], out: str | Path,
    limit: int | None = None, batch_size: int = 8, device: str | None = None, dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Fit on the calibration task specs given by role (`anchor`, `unsafe`, `safe`) and save to
    `out`; refuses to overwrite an existing file. With no roles given, the calibration sets the
    defense spec itself names (e.g. `cmrm:calibration=...`) are used. Options, the device and the
    output folder are checked first: a fit can take an hour, and must not fail at its last step."""
    check_count("--batch-size", batch_size, 1)
    check_count("--limit", limit, 1, optional=True)
    check_dtype(dtype)
    out = Path(out)
    if out.exists():
        raise RunDirError(f"{out} already exists; choose another --out (fitted files are never overwritten)")
    overrides = {"device": device, "dtype": dtype}
    resolve_backend(model, overrides)  # a bad spec or a missing GPU fails here, before any data loads
    defense = defenses.build(defense_spec)
    if not defense.fits():
        raise DataError(f"defense {defense.spec!r} has nothing to fit")
    plan = defense.calibration()
    if not roles and plan is not None and plan.sets:
        roles, limit = dict(plan.sets), limit if limit is not None else plan.limit
    if not roles:
        raise DataError("give calibration data: --calibration SPEC (cmrm anchors; adashield harmful samples) "
                        "or --calibration-unsafe/--calibration-safe (shiftdc)")
    check_writable_folder(out.parent, out)
    sets = calibration.load_sets(roles, limit)
    backend = load_backend(model, overrides)
    try:
        return calibration.fit_to_file(defense, backend, sets, out, batch_size, progress, model_spec=model)
    finally:
        backend.close()


def check_writable_folder(folder: Path, out: Path) -> None:
    """Create `folder` and write a throwaway file in it, or raise RunDirError naming `out`. A real
    write is the only test that holds on read-only mounts and for root, whom permissions don't stop."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot write in {folder} ({exc.strerror or exc})") from None
