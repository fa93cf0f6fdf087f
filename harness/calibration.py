"""The calibration stage: load a defense's fitted state, or fit it on calibration data and cache it,
then check that it belongs to this model and shares no sample with the evaluation.

Every fitted defense (CMRM's shifts, ShiftDC's direction, AdaShield-A's pool, and any later one)
goes through these few functions, so "given file, or fit, cache, check" is written once and a
defense only says what it needs (`Defense.calibration()`) and how to fit (`Defense.fit()`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from harness.contracts.backend import Backend
from harness.contracts.defense import CalibrationPlan, CalibrationSet, Defense, DefenseContext, FittedState
from harness.errors import DataError, RunDirError
from harness.registry import tasks
from harness.samples import load_images, load_samples

log = logging.getLogger(__name__)


def load_sets(roles: dict[str, str], limit: int | None) -> dict[str, CalibrationSet]:
    """Calibration sets by role from task specs, images loaded (a bad calibration image is an error)."""
    out: dict[str, CalibrationSet] = {}
    for role, spec in roles.items():
        task = tasks.build(spec)
        out[role] = CalibrationSet(task.spec, load_images(load_samples(task, limit)))
    return out


def model_identity(backend: Backend) -> dict[str, object]:
    """The parts of a backend's identity that a cached state's name depends on."""
    ident = backend.identity()
    return {k: ident.get(k) for k in ("backend", "model", "pretrained", "revision", "commit", "folder_hash")}


def cache_path(defense: Defense, plan: CalibrationPlan, backend: Backend, cache_dir: Path) -> Path:
    """Where a state fitted on the fly is cached: one file per (defense kind, fit parameters,
    calibration specs and limit, model)."""
    key = json.dumps([plan.kind, plan.fit_key, plan.sets, plan.limit, model_identity(backend)],
                     sort_keys=True, default=str)
    return cache_dir / f"{plan.kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


def check_overlap(state: FittedState, eval_ids: frozenset[str], allow: bool, where: str) -> None:
    """Refuse a state fitted on samples that are also evaluated (unless the user allows it)."""
    overlap = sorted(state.calibration_ids() & set(eval_ids))
    if overlap and not allow:
        raise DataError(f"fitted state {where} was fitted on {len(overlap)} evaluation sample(s) (e.g. {overlap[0]!r}); "
                        "calibrate on other data, or pass allow_overlap=true to accept this")


def obtain(defense: Defense, backend: Backend, context: DefenseContext) -> FittedState | None:
    """The defense's state for this backend (None if it needs none): the given file, else the cached
    fit, else a fresh fit on its calibration sets (then cached); checked before it is returned."""
    plan = defense.calibration()
    if plan is None:
        return None
    if plan.file:
        where = plan.file
        state = defense.load_state(plan.file)
    elif plan.sets:
        path = cache_path(defense, plan, backend, context.cache_dir)
        where = str(path)
        if path.exists():
            state = defense.load_state(path)
        else:
            state = defense.fit(backend, load_sets(plan.sets, plan.limit), context.batch_size, context.progress)
            state.save(path)
            log.info("%s: fitted state cached at %s", plan.kind, path)
    else:
        raise DataError(plan.missing)
    state.check_model(backend, where)
    check_overlap(state, context.eval_ids, plan.allow_overlap, where)
    return state


def prepare(defense: Defense, backend: Backend, context: DefenseContext) -> None:
    """Check the backend, then obtain and install the defense's state, if it has one."""
    defense.check_backend(backend)
    state = obtain(defense, backend, context)
    if state is not None:
        defense.use_state(state, backend)


def fit_to_file(defense: Defense, backend: Backend, sets: dict[str, CalibrationSet], out: Path,
                batch_size: int = 8, progress: bool = False, model_spec: str | None = None) -> Path:
    """`realign fit`: fit on the given sets and save to `out` (never overwriting)."""
    if out.exists():
        raise RunDirError(f"{out} already exists; choose another --out (fitted files are never overwritten)")
    defense.check_backend(backend)
    state = defense.fit(backend, sets, batch_size=batch_size, progress=progress)
    if model_spec is not None:
        state.manifest["model_spec"] = model_spec
    return state.save(out)
