"""The judging stage and the one builder of result records.

`realign run` (after generating) and `realign judge` (from a finished run directory) both call
`score_cell`: judge what the cell's verdict file lacks, count what the judge cost, score with the
task's metrics and its declared metric meanings, and build the record. One path means the two
commands write identical records for the same verdicts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

from harness.contracts.judge import Judge
from harness.contracts.task import Task
from harness.progress import RunProgress, disabled, short_spec
from harness.schema import Generation, ResultRecord, Sample, Verdict, record_key
from harness.stats import generation_errors
from harness.store import Cell

log = logging.getLogger(__name__)
JUDGE_CHUNK = 64


@dataclass(frozen=True)
class CellKey:
    model: str
    defense: str
    task: str
    attack: str = "none"


def judge_cell(cell: Cell, judge: Judge, samples: list[Sample], generations: dict[str, Generation],
               progress: bool | RunProgress = False, retry_errors: bool = True) -> dict[str, Verdict]:
    """Verdicts for every sample, judging only those the judge's verdict file lacks, and (unless
    `retry_errors` is false) those whose verdict was an error; appended per chunk, so a killed judge
    resumes where it stopped, and a retried verdict supersedes the error it replaces."""
    stored = cell.verdicts(judge.spec)
    pending = [s for s in samples if s.id not in stored or (retry_errors and stored[s.id].get("label") == "error")]
    reporter = progress if isinstance(progress, RunProgress) else RunProgress([cell.task], enabled=bool(progress))
    if not pending:
        reporter = disabled()
    with reporter.stage(f"judge {short_spec(judge.spec)}", len(samples), len(samples) - len(pending)) as advance:
        for start in range(0, len(pending), JUDGE_CHUNK):
            chunk = pending[start : start + JUDGE_CHUNK]
            verdicts = judge.verdicts(chunk, [generations[s.id] for s in chunk])
            cell.append_verdicts(judge.spec, [v.to_json() for v in verdicts], replace=any(s.id in stored for s in chunk))
            advance(len(chunk))
    stored = cell.verdicts(judge.spec)
    return {s.id: Verdict.from_json(stored[s.id]) for s in samples if s.id in stored}


def verdict_tokens(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """The judge bill of a cell as recorded in its verdicts: tokens and HTTP requests paid for
    verdicts made fresh, and how many verdicts came from the cache instead (free)."""
    out = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cached_verdicts": 0}
    for v in verdicts:
        if v.detail.get("cached"):
            out["cached_verdicts"] += 1
            continue
        for k in ("prompt_tokens", "completion_tokens", "requests"):
            out[k] += int(v.detail.get(k, 0) or 0)
    return out


def result_record(key: CellKey, task: Task, judge: Judge | None, samples: list[Sample],
                  generations: dict[str, Generation], verdicts: dict[str, Verdict] | None,
                  identity: dict[str, Any]) -> dict[str, Any]:
    """The results.json record of one (model, attack, defense, task, judge): metrics with
    intervals, what each metric means, error counts, and every identity a number depends on (a
    cell written before attacks existed has no attack identity: it gets `{"spec": "none"}`)."""
    metrics = task.metrics(samples, generations, verdicts)
    judge_errors = int(metrics["judge_errors"].value) if "judge_errors" in metrics else 0
    identity = {**identity, "attack": identity.get("attack") or {"spec": key.attack}}
    record = ResultRecord(
        model=key.model, defense=key.defense, task=key.task, judge=judge.spec if judge else None,
        n=len(samples), metrics=metrics, generation_errors=generation_errors(samples, generations),
        judge_errors=judge_errors, identity={**identity, "judge": judge.identity() if judge else None},
        meanings={name: m.to_json() for name, m in task.metric_meanings(metrics).items()}, attack=key.attack,
    ).to_json()
    if verdicts is not None:  # what the judge cost: tokens, requests, verdicts from the cache
        record["identity"]["judge_tokens"] = verdict_tokens(verdicts.values())
    return record


def score_cell(cell: Cell, task: Task, judges: list[Judge], samples: list[Sample],
               generations: dict[str, Generation], identity: dict[str, Any],
               progress: bool | RunProgress = False, retry_errors: bool = True) -> list[dict[str, Any]]:
    """Judge (if the task needs a judge) and score one cell: one record per judge, or one
    judge-less record for a task that scores answers itself."""
    key = CellKey(cell.model, cell.defense, cell.task, cell.attack)
    if not task.needs_judge:
        return [result_record(key, task, None, samples, generations, None, identity)]
    if not judges:
        log.warning("task %s needs a judge and none was given: no metrics for it", task.spec)
    return [
        result_record(key, task, judge, samples, generations,
                      judge_cell(cell, judge, samples, generations, progress, retry_errors), identity)
        for judge in judges
    ]


def merge_record(records: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Replace the record of the same (model, attack, defense, task, judge), or append it."""
    key = record_key(record)
    for i, rec in enumerate(records):
        if record_key(rec) == key:
            records[i] = record
            return
    records.append(record)
