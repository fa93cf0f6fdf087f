"""`realign judge`: the judging stage run alone from a run directory.

It reads each cell's generations.jsonl (every record carries its sample), judges what the verdict
file of that judge does not hold yet, scores with the task's own metrics and replaces that judge's
records in results.json, through the same `harness.judging.score_cell` as `realign run`, so both
write identical records for the same verdicts. No model loads and nothing is regenerated.
Verdicts are appended per chunk and LLM verdicts are cached as they arrive, so a killed re-judge
resumes where it stopped without paying twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness.contracts.judge import Judge
from harness.errors import RunDirError
from harness.judging import merge_record, score_cell
from harness.progress import RunProgress, cell_label
from harness.registry import judges, tasks
from harness.lock import run_lock
from harness.schema import RunConfig, record_key
from harness.store import Cell, RunDir

log = logging.getLogger(__name__)


IDENTITY_KEYS = ("model", "attack", "defense", "task")


def _cell_identity(cell: Cell, records: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Model/attack/defense/task identity as the run recorded it beside the generations; for runs
    written before that, from an earlier record of the cell, else from run.json. (A cell written
    before attacks existed has no attack identity; the record builder fills in `none`.)"""
    stored = cell.identity()
    if stored is not None:
        return {k: stored.get(k) for k in IDENTITY_KEYS}
    for rec in records:
        if record_key(rec)[:4] == (cell.model, cell.attack, cell.defense, cell.task):
            ident = rec.get("identity") or {}
            return {k: ident.get(k) for k in IDENTITY_KEYS}
    return {"model": info.get("backends", {}).get(cell.model, {"spec": cell.model}), "attack": {"spec": cell.attack},
            "defense": {"spec": cell.defense}, "task": {"spec": cell.task}}


def rejudge(run_dir: str | Path, judge_specs: list[str], progress: bool = True,
            retry_errors: bool = True) -> list[dict[str, Any]]:
    """Judge every saved generation of a run with each judge; update and return its result records.

    Every judge is built before any judging, so a bad spec fails at once. Records of other judges
    in results.json are kept; records of these judges are replaced. Returns the new records.
    """
    rundir = RunDir(Path(run_dir))
    config, info = rundir.config()
    built: list[Judge] = [judges.build(spec) for spec in judge_specs]
    with run_lock(rundir.root, "realign judge"):
        return _rejudge(rundir, config, info, built, progress, retry_errors)


def _rejudge(rundir: RunDir, config: RunConfig, info: dict[str, Any], built: list[Judge], progress: bool,
             retry_errors: bool) -> list[dict[str, Any]]:
    try:
        existing = rundir.read_results()
    except RunDirError:
        existing = []
    new: list[dict[str, Any]] = []
    cells = list(rundir.saved_cells(config))
    reporter = RunProgress([c.task for c in cells], enabled=progress, counted="judge")
    for cell in cells:
        task = tasks.build(cell.task)
        if not task.needs_judge:
            log.info("task %s scores answers itself (no judge); skipped", cell.task)
            continue
        samples, generations = cell.load()
        identity = _cell_identity(cell, existing, info)
        size = len(samples) * len(built)  # each judge reads every sample
        reporter.start_cell(cell_label(cell.model, cell.defense, cell.task, cell.attack), cell.task, size, 0)
        for record in score_cell(cell, task, built, samples, generations, identity, reporter, retry_errors):
            new.append(record)
            merge_record(existing, record)
            rundir.write_results(existing)
        reporter.end_cell(size)
    if not new:
        log.warning("%s: no cell with saved generations of a judged task; nothing was judged", rundir.root)
    return new
