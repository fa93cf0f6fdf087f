"""The attack x defense matrix (`realign report DIR --matrix`).

A defense is only as good as the attacks it was tried against, and an attack only as strong as
the defenses it beat: one number per (attack, defense) pair, read across a row (what each defense
does against one attack) and down a column (which attack breaks one defense), is the summary the
attack axis exists for. One table per (model, task, judge), rows = attacks, columns = defenses;
each cell holds the task's headline safety metric (what its record declares: attack success rate,
or the share of harmful requests refused) with its 95% interval, read straight from results.json,
so the matrix and the per-cell records can never disagree.

Rows and columns keep the run's order, `none` first (the undefended model, the task as released).
A (model, task, judge) with no headline safety metric (a utility task) has no matrix. When white-box
attacks ran, each table also gets the per-defense regime summary (no attack, transfer, adaptive:
harness.analysis.regimes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from harness.analysis import regimes
from harness.analysis.leaderboard import clean_metric
from harness.analysis.meanings import meaning_of
from harness.analysis.report import fmt_metric
from harness.contracts.meaning import MetricMeaning
from harness.schema import record_attack

#: Preferred headline when a task declares several safety headlines.
PREFERRED = ("asr",)
NONE = "none"


@dataclass
class MatrixTable:
    """One (model, task, judge): `cells[attack][defense]` = {value, low, high, n} of `metric`."""

    model: str
    task: str
    judge: str | None
    metric: str
    meaning: MetricMeaning
    attacks: list[str] = field(default_factory=list)
    defenses: list[str] = field(default_factory=list)
    cells: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: per defense and white-box attack: the metric with no attack, under transfer and adaptive
    regimes: list[dict[str, Any]] = field(default_factory=list)

    def cell(self, attack: str, defense: str) -> dict[str, Any] | None:
        return self.cells.get(attack, {}).get(defense)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "judge": self.judge, "metric": self.metric,
                "kind": self.meaning.kind, "better": self.meaning.better, "scale": self.meaning.scale,
                "attacks": self.attacks, "defenses": self.defenses, "cells": self.cells,
                **({"regimes": self.regimes} if self.regimes else {})}


def _ordered(values: list[str]) -> list[str]:
    """Unique values in first-seen order, `none` first."""
    out = list(dict.fromkeys(values))
    return ([NONE] if NONE in out else []) + [v for v in out if v != NONE]


def safety_headline(records: list[dict[str, Any]]) -> tuple[str, MetricMeaning] | None:
    """The headline safety metric the records of one (model, task, judge) declare: `asr` when it is
    one, else the first (by name) ranked headline safety metric; None for a utility task."""
    found: dict[str, MetricMeaning] = {}
    for rec in records:
        for name in rec.get("metrics") or {}:
            meaning = meaning_of(rec, name)
            if meaning.kind == "safety" and meaning.headline and meaning.ranked:
                found.setdefault(name, meaning)
    if not found:
        return None
    name = next((p for p in PREFERRED if p in found), min(found))
    return name, found[name]


def build_matrix(records: list[dict[str, Any]]) -> tuple[list[MatrixTable], list[str]]:
    """The matrices of a run's result records, and the (model | task | judge) groups skipped for
    lack of a headline safety metric."""
    groups: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["model"], rec["task"], rec["judge"]), []).append(rec)
    tables: list[MatrixTable] = []
    skipped: list[str] = []
    for (model, task, judge), recs in groups.items():
        headline = safety_headline(recs)
        if headline is None:
            skipped.append(f"{model} | {task} | {judge or '-'}")
            continue
        metric, meaning = headline
        table = MatrixTable(model, task, judge, metric, meaning,
                            _ordered([record_attack(r) for r in recs]), _ordered([r["defense"] for r in recs]))
        for rec in recs:
            value = (rec.get("metrics") or {}).get(metric)
            if isinstance(value, dict):
                table.cells.setdefault(record_attack(rec), {})[rec["defense"]] = clean_metric(value)
        if regimes.has_regimes(recs):
            table.regimes = [{k: clean_metric(v) if k in regimes.REGIMES and v else v for k, v in row.items()}
                             for row in regimes.regime_rows(recs, metric)]
        tables.append(table)
    return tables, skipped


def matrix_json(tables: list[MatrixTable], skipped: list[str]) -> dict[str, Any]:
    """The document `--matrix` writes: every table, and what had no matrix."""
    return {"tables": [t.to_json() for t in tables], "skipped": skipped}


def encode(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(tables: list[MatrixTable], skipped: list[str]) -> str:
    """One markdown table per (model, task, judge): attacks down, defenses across."""
    if not tables:
        return "no headline safety metric in these results: no attack x defense matrix" + (
            f" (skipped: {'; '.join(skipped)})" if skipped else "")
    parts = []
    for t in tables:
        better = f"{t.meaning.better} is better" if t.meaning.better else "not ranked"
        lines = [f"{t.model} | {t.task} | judge {t.judge or '-'}: {t.metric} ({better}), 95% interval", "",
                 "| attack \\ defense | " + " | ".join(_escape(d) for d in t.defenses) + " |",
                 "|" + "---|" * (len(t.defenses) + 1)]
        for attack in t.attacks:
            row = [fmt_metric(t.cell(attack, d)) if t.cell(attack, d) else "-" for d in t.defenses]
            lines.append(f"| {_escape(attack)} | " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
        if t.regimes:
            parts.append(regimes.markdown(t.regimes, t.metric))
    if skipped:
        parts.append(f"(no headline safety metric, no matrix: {'; '.join(skipped)})")
    return "\n\n".join(parts)
