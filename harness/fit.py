"""`realign fit`: precompute a defense's state (CMRM shifts, ShiftDC directions, AdaShield-A prompt
pools) once per model, through the calibration stage every run uses."""

from __future__ import annotations

from pathlib import Path

from harness import calibration
from harness.errors import DataError, RunDirError
from harness.models.resolve import load_backend
from harness.registry import defenses


def fit_defense(
    model: str, defense_spec: str, roles: dict[str, str], out: str | Path,
    limit: int | None = None, batch_size: int = 8, device: str | None = None, dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Fit on the calibration task specs given by role (`anchor`, `unsafe`, `safe`) and save to
    `out`; refuses to overwrite an existing file. With no roles given, the calibration sets the
    defense spec itself names (e.g. `cmrm:calibration=...`) are used."""
    out = Path(out)
    if out.exists():
        raise RunDirError(f"{out} already exists; choose another --out (fitted files are never overwritten)")
    defense = defenses.build(defense_spec)
    if not defense.fits():
        raise DataError(f"defense {defense.spec!r} has nothing to fit")
    plan = defense.calibration()
    if not roles and plan is not None and plan.sets:
        roles, limit = dict(plan.sets), limit if limit is not None else plan.limit
    if not roles:
        raise DataError("give calibration data: --calibration SPEC (cmrm anchors; adashield harmful samples) "
                        "or --calibration-unsafe/--calibration-safe (shiftdc)")
    sets = calibration.load_sets(roles, limit)
    backend = load_backend(model, {"device": device, "dtype": dtype})
    try:
        return calibration.fit_to_file(defense, backend, sets, out, batch_size, progress, model_spec=model)
    finally:
        backend.close()
