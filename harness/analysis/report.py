"""Human-readable tables of results.json records.

One table per (task, judge) under a heading naming both, since each task has its own metrics: a
single table with a column for every metric of every task was too wide to read. Which metrics a
table shows follows what each record declares (harness.analysis.meanings): headline metrics, plus
overall counts such as MME's `unparseable`; `--detail` adds a per-category table under its own
heading. Judge errors have their own column. harness.tables fits them to the terminal.
"""

from __future__ import annotations

import json
import math
from typing import Any

from harness.analysis.meanings import meaning_of
from harness.tables import TextTable, markdown


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fmt_metric(metric: Any) -> str:
    """A metric as `value [low, high]`; something that is not a number is shown as `?`, never a
    crash (the CLI refuses such a results.json before rendering; the Python API may not)."""
    metric = metric if isinstance(metric, dict) else {"value": metric}
    value = metric.get("value")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not _number(value):
        return "?"
    low, high = metric.get("low"), metric.get("high")
    if not (_number(low) and _number(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def _shown(record: dict[str, Any], key: str) -> bool:
    """Headline metrics, and counts that are not a per-category breakdown (`name/...`)."""
    try:
        meaning = meaning_of(record, key)
    except ValueError:  # an unreadable declared meaning: show the metric rather than fail
        return True
    return meaning.headline or (meaning.kind == "diagnostic" and "/" not in key)


def _metrics(record: Any) -> dict[str, Any]:
    metrics = record.get("metrics") if isinstance(record, dict) else None
    return metrics if isinstance(metrics, dict) else {}


def metric_keys(records: list[dict[str, Any]], detail: bool) -> list[str]:
    """Metric names in first-seen order: the shown ones (detail False) or the per-category rest."""
    keys: list[str] = []
    for rec in records:
        for key in _metrics(rec):
            if key == "judge_errors" or _shown(rec, key) == detail:
                continue
            if key not in keys:
                keys.append(key)
    return keys


def _attack(rec: dict[str, Any]) -> str:
    return str(rec.get("attack") or "none")  # records written before attacks existed: the task as released


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Records by (task, judge), in first-seen order: one table each, since metrics differ by task."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        rec = rec if isinstance(rec, dict) else {}
        out.setdefault((str(rec.get("task", "?")), str(rec.get("judge") or "-")), []).append(rec)
    return out


def _count(rec: dict[str, Any], key: str) -> str:
    return str(rec.get(key, "?") if key == "n" else rec.get(key) or 0)


def _table(title: str, recs: list[dict[str, Any]], keys: list[str], attacked: bool) -> TextTable:
    """Rows of `recs`. Columns that would repeat one value in every row move into the title: `n`
    when all rows have the same, the error counts when all are zero."""
    counts = [("n", "n"), ("gen err", "generation_errors"), ("judge err", "judge_errors")]
    same_n = len({_count(r, "n") for r in recs}) == 1
    no_errors = all(_count(r, k) == "0" for r in recs for k in ("generation_errors", "judge_errors"))
    shown = [(h, k) for h, k in counts if not (k == "n" and same_n) and not (k != "n" and no_errors)]
    notes = [f"n={_count(recs[0], 'n')}"] if same_n else []
    notes += ["no generation or judge errors"] if no_errors else []
    head = ["model", *(["attack"] if attacked else []), "defense", *keys, *[h for h, _ in shown]]
    rows = []
    for rec in recs:
        metrics = _metrics(rec)
        rows.append([
            str(rec.get("model", "?")), *([_attack(rec)] if attacked else []), str(rec.get("defense", "?")),
            *[fmt_metric(metrics[k]) if k in metrics else "" for k in keys], *[_count(rec, k) for _, k in shown],
        ])
    return TextTable(f"{title} ({', '.join(notes)})" if notes else title, head, rows, labels=3 if attacked else 2)


def report_tables(records: list[dict[str, Any]], detail: bool = False) -> list[TextTable]:
    """One table per (task, judge) of the headline metrics, each under a heading naming both; with
    `detail`, each followed by its per-category table. The attack column appears when some record
    was made under an attack."""
    attacked = any(isinstance(r, dict) and _attack(r) != "none" for r in records)
    tables = []
    for (task, judge), recs in _groups(records).items():
        title = f"{task} | judge {judge}" if judge != "-" else f"{task} | no judge"
        tables.append(_table(title, recs, metric_keys(recs, False), attacked))
        extra = metric_keys(recs, True)
        if detail and extra:
            tables.append(_table(f"{title} | per category", recs, extra, attacked))
    return tables


def markdown_table(records: list[dict[str, Any]], detail: bool = False) -> str:
    """The report as markdown: a `###` heading and a table per (task, judge), metrics with their
    95% bootstrap intervals."""
    return markdown(report_tables(records, detail))


def render(records: list[dict[str, Any]], fmt: str = "md", detail: bool = False) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2, sort_keys=True)
    return markdown_table(records, detail)
