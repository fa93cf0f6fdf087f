"""Human-readable tables of results.json records.

Which metrics the default table shows follows what each record declares (harness.analysis.meanings):
headline metrics, plus overall counts such as MME's `unparseable`; `--detail` adds the per-category
breakdowns. Judge errors have their own column.
"""

from __future__ import annotations

import json
import math
from typing import Any

from harness.analysis.meanings import meaning_of


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


def headline_keys(records: list[dict[str, Any]], detail: bool) -> list[str]:
    keys: list[str] = []
    for rec in records:
        for key in _metrics(rec):
            if key == "judge_errors" or not (detail or _shown(rec, key)):
                continue
            if key not in keys:
                keys.append(key)
    return keys


def _attack(rec: dict[str, Any]) -> str:
    return str(rec.get("attack") or "none")  # records written before attacks existed: the task as released


def markdown_table(records: list[dict[str, Any]], detail: bool = False) -> str:
    """One row per (model, [attack,] defense, task, judge); metrics with their 95% bootstrap
    intervals. The attack column appears when some record was made under an attack."""
    keys = headline_keys(records, detail)
    attacked = any(isinstance(r, dict) and _attack(r) != "none" for r in records)
    head = ["model", *(["attack"] if attacked else []), "defense", "task", "judge", "n", *keys, "gen err", "judge err"]
    rows = [head, ["---"] * len(head)]
    for rec in records:
        rec = rec if isinstance(rec, dict) else {}
        metrics = _metrics(rec)
        rows.append([
            str(rec.get("model", "?")), *([_attack(rec)] if attacked else []),
            *[str(rec.get(k, "?")) for k in ("defense", "task")],
            str(rec.get("judge") or "-"), str(rec.get("n", "?")),
            *[fmt_metric(metrics[k]) if k in metrics else "" for k in keys],
            str(rec.get("generation_errors", 0)), str(rec.get("judge_errors", 0)),
        ])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def render(records: list[dict[str, Any]], fmt: str = "md", detail: bool = False) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2, sort_keys=True)
    return markdown_table(records, detail)
