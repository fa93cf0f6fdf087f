"""Scoring realign generations with lm-eval's own code, for the `lm_eval` task (tasks.lm_eval_task).

The numbers must be lm-eval's, not a reimplementation that drifts: each answer is cut at the task's
stop strings and put into an lm-eval `Instance` as the model's response; the task's own filters run
(`apply_filters`), then its `process_results` per document, then lm-eval's post-processing
(`lm_eval.evaluator_utils._process_results`, the function `simple_evaluate` ends with) computes each
task's aggregation, its stderr and every group's aggregate. A generation error answers "" (scored
wrong, as in every realign utility task).

Metric names: `<task>/<metric>` for lm-eval's default filter (`none`), `<task>/<metric>/<filter>`
otherwise; the 95% interval is lm-eval's stderr times 1.96 either side (none when lm-eval gives none).
A group is scored only when all of its tasks are in the cell (a `--limit` may cut some out).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from harness.contracts.meaning import MetricMeaning, points, rate
from harness.errors import DataError
from harness.lm_eval_shared import cut_at_stops, sample_id
from harness.schema import Generation, MetricValue, Sample

log = logging.getLogger(__name__)

#: lm-eval metrics on a 0-100 scale (sacrebleu's); every other metric is read as a 0-1 rate.
POINTS_100 = ("bleu", "chrf", "chrf++", "ter")
#: A metric lm-eval gives no direction for: shown, never ranked.
UNKNOWN = MetricMeaning("other", None)
Z95 = 1.959963984540054


@dataclass
class Scored:
    metrics: dict[str, MetricValue]
    #: {metric: {sample id: per-document value}} for metrics lm-eval aggregates by the mean
    per_sample: dict[str, dict[str, float]]


def metric_name(task: str, metric: str, filter_key: str) -> str:
    return f"{task}/{metric}" if filter_key == "none" else f"{task}/{metric}/{filter_key}"


_cache: dict[str, Scored] = {}


def score(state: Any, params: Any, samples: list[Sample], generations: dict[str, Generation]) -> Scored:
    """lm-eval's metrics over the cell's answers (memoised on the answers: metrics and per-sample
    outcomes of one cell are asked for separately and a bootstrap is not free)."""
    entries = {sample_id(e.task, e.doc_id): e for e in state.entries}
    rows: dict[str, list[tuple[Any, str, str]]] = {}
    for s in samples:
        entry = entries.get(s.id)
        if entry is None:
            raise DataError(f"lm_eval: sample {s.id!r} is not a document of tasks {'+'.join(params.tasks)}")
        gen = generations.get(s.id)
        answer = "" if gen is None or gen.error else cut_at_stops(gen.output, entry.settings.get("until", []))
        rows.setdefault(entry.task, []).append((entry, answer, s.id))
    key = hashlib.sha256(repr((id(state), params.bootstrap_iters, sorted(rows.items(), key=lambda kv: kv[0]),
                               )).encode()).hexdigest()
    if key not in _cache:
        _cache.clear()
        _cache[key] = _score(state, params.bootstrap_iters, rows)
    return _cache[key]


def _score(state: Any, bootstrap_iters: int, rows: dict[str, list[tuple[Any, str, str]]]) -> Scored:
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import mean
    from lm_eval.evaluator_utils import _process_results

    accumulated: dict[str, Any] = {}
    per_sample: dict[str, dict[str, float]] = {}
    for name, task_rows in rows.items():
        obj, docs = state.tasks[name], state.docs[name]
        instances = []
        for entry, answer, _ in task_rows:
            inst = Instance(request_type="generate_until", doc=docs[entry.doc_id],
                            arguments=(entry.context, entry.settings), idx=0, metadata=(name, entry.doc_id, 1))
            inst.resps.append(answer)
            instances.append(inst)
        obj._instances = instances
        obj.apply_filters()
        aggregations = obj.aggregation()
        raw: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for filter_key in instances[0].filtered_resps:
            for (_, _, sid), inst in zip(task_rows, instances):
                for metric, value in obj.process_results(inst.doc, [inst.filtered_resps[filter_key]]).items():
                    raw[(metric, filter_key)].append(value)
                    if aggregations.get(metric) is mean and _is_number(value):
                        per_sample.setdefault(metric_name(name, metric, filter_key), {})[sid] = float(value)
        obj._instances = None
        accumulated[name] = {"task": obj, "raw_metrics": raw, "logged_samples": []}
    groups = {}
    for gname, group in state.groups.items():
        if all(t.task_name in accumulated for t in group.get_all_tasks()):
            groups[gname] = group
        else:
            log.info("lm_eval: group %s is not scored: not all of its tasks are in this cell", gname)
    results = _process_results(accumulated, groups, bootstrap_iters)._to_eval_results()["results"]
    return Scored(metrics=_metric_values(results), per_sample=per_sample)


def _metric_values(results: dict[str, dict[str, Any]]) -> dict[str, MetricValue]:
    """lm-eval's result rows (`acc,none`, `acc_stderr,none`, `sample_len`) as realign metrics."""
    out: dict[str, MetricValue] = {}
    for name, row in results.items():
        n = int(row.get("sample_len") or 0)
        for key, value in row.items():
            metric, sep, filter_key = key.partition(",")
            if not sep or metric.endswith("_stderr") or not _is_number(value):
                continue
            value = float(value)
            stderr = row.get(f"{metric}_stderr,{filter_key}")
            half = Z95 * float(stderr) if _is_number(stderr) and math.isfinite(float(stderr)) else None
            low, high = (None, None) if half is None else _clip(metric, value, value - half, value + half)
            out[metric_name(name, metric, filter_key)] = MetricValue(value=value, low=low, high=high, n=n)
    return out


def _clip(metric: str, value: float, low: float, high: float) -> tuple[float, float]:
    """The normal interval kept inside the metric's range (0-1, or 0-100 for POINTS_100) when the
    value itself lies inside it: a share of documents is never below 0 or above 1."""
    top = 100.0 if metric in POINTS_100 else 1.0
    return (max(low, 0.0), min(high, top)) if 0.0 <= value <= top else (low, high)


def meanings(state: Any, requested: list[str]) -> dict[str, MetricMeaning]:
    """Name patterns -> meaning, from lm-eval's `higher_is_better` (a group takes its tasks'
    directions, as lm-eval's results do). Top-level tasks and groups are headlines; a group's
    members are detail."""
    from lm_eval.evaluator_utils import _collect_groups_bottom_up, _propagate_higher_is_better

    directions = {name: dict(obj.higher_is_better() or {}) for name, obj in state.tasks.items()}
    _propagate_higher_is_better(_collect_groups_bottom_up(state.groups), directions)
    members = {child for g in state.groups.values() for child in g.child_names}
    table: dict[str, MetricMeaning] = {}
    for name, metrics in directions.items():
        for metric, higher in metrics.items():
            meaning = _meaning(metric, higher, headline=name not in members)
            table[f"{name}/{metric}"] = meaning
            table[f"{name}/{metric}/*"] = meaning
    return table


def _meaning(metric: str, higher: bool | None, headline: bool) -> MetricMeaning:
    if higher is None:
        return MetricMeaning("other", None, headline=headline)
    better = "higher" if higher else "lower"
    if metric in POINTS_100:
        return points("utility", better, 100, headline=headline)
    return rate("utility", better, headline=headline)


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float)) or type(value).__module__ == "numpy" and hasattr(value, "__float__")
