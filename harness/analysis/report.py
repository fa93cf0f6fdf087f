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


def _fmt(metric: dict[str, Any]) -> str:
    value = metric.get("value")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    low, high = metric.get("low"), metric.get("high")
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def _shown(record: dict[str, Any], key: str) -> bool:
    """Headline metrics, and counts that are not a per-category breakdown (`name/...`)."""
    meaning = meaning_of(record, key)
    return meaning.headline or (meaning.kind == "diagnostic" and "/" not in key)


def headline_keys(records: list[dict[str, Any]], detail: bool) -> list[str]:
    keys: list[str] = []
    for rec in records:
        for key in rec["metrics"]:
            if key == "judge_errors" or not (detail or _shown(rec, key)):
                continue
            if key not in keys:
                keys.append(key)
    return keys


def markdown_table(records: list[dict[str, Any]], detail: bool = False) -> str:
    """One row per (model, defense, task, judge); metrics with their 95% bootstrap intervals."""
    keys = headline_keys(records, detail)
    head = ["model", "defense", "task", "judge", "n", *keys, "gen err", "judge err"]
    rows = [head, ["---"] * len(head)]
    for rec in records:
        metrics = rec["metrics"]
        rows.append([
            rec["model"], rec["defense"], rec["task"], rec["judge"] or "-", str(rec["n"]),
            *[_fmt(metrics[k]) if k in metrics else "" for k in keys],
            str(rec.get("generation_errors", 0)), str(rec.get("judge_errors", 0)),
        ])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def render(records: list[dict[str, Any]], fmt: str = "md", detail: bool = False) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2, sort_keys=True)
    return markdown_table(records, detail)
