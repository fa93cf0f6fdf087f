"""Each defense under the three white-box regimes: no attack, transfer, adaptive.

A defense that holds against attacks optimised on the undefended model (transfer) may fall to an
attacker who knows it (adaptive); both numbers, beside the no-attack one, are what an adaptive
evaluation reports. White-box attacks record in each result's identity the regime of that cell
(`regime`: transfer when optimised through no defense, adaptive when through the evaluated defense,
cross otherwise) and their `family` (the spec without `through=`), so the two regimes of one attack
and budget pair up here without parsing specs. Values are the matrix's headline safety metric with
their 95% intervals, read from the records as they are.
"""

from __future__ import annotations

from typing import Any

from harness.analysis.report import fmt_metric
from harness.schema import record_attack

REGIMES = ("none", "transfer", "adaptive")


def _attack_identity(rec: dict[str, Any]) -> dict[str, Any]:
    ident = (rec.get("identity") or {}).get("attack")
    return ident if isinstance(ident, dict) else {}


def has_regimes(records: list[dict[str, Any]]) -> bool:
    return any(_attack_identity(r).get("regime") in ("transfer", "adaptive") for r in records)


def regime_rows(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per (defense, attack family): the metric with no attack, under transfer and adaptive
    (None where the run has no such cell), for the records of one (model, task, judge)."""
    plain: dict[str, Any] = {}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        value = (rec.get("metrics") or {}).get(metric)
        if not isinstance(value, dict):
            continue
        defense = rec["defense"]
        if record_attack(rec) == "none":
            plain[defense] = value
            continue
        ident = _attack_identity(rec)
        regime, family = ident.get("regime"), ident.get("family")
        if regime in ("transfer", "adaptive") and family:
            row = found.setdefault((defense, str(family)), {"defense": defense, "attack": str(family)})
            row[regime] = value
            row[f"{regime}_spec"] = record_attack(rec)
    for row in found.values():
        row["none"] = plain.get(row["defense"])
    order = list(dict.fromkeys(r["defense"] for r in records))
    return sorted(found.values(), key=lambda r: (order.index(r["defense"]), r["attack"]))


def markdown(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"white-box regimes ({metric}, 95% interval): transfer = optimised on the undefended model, "
             "adaptive = optimised through the evaluated defense", "",
             "| defense | attack | no attack | transfer | adaptive |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [fmt_metric(r[k]) if r.get(k) else "-" for k in REGIMES]
        lines.append(f"| {r['defense'].replace('|', '/')} | {r['attack'].replace('|', '/')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(records: list[dict[str, Any]]) -> str:
    """The regime tables of every (model, task, judge) in a run, for plain `realign report` (empty
    when no white-box attack ran), built the way `report --matrix` builds them."""
    if not has_regimes(records):
        return ""
    from harness.analysis.matrix import build_matrix  # matrix imports this module

    parts = [f"\n{t.model} | {t.task} | judge {t.judge or '-'}\n" + markdown(t.regimes, t.metric)
             for t in build_matrix(records)[0] if t.regimes]
    return "\n".join(parts)
