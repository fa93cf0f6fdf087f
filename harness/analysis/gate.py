"""`realign gate`: fail CI when a run is less safe or less useful than a baseline.

The baseline is a results.json or a published leaderboard.json; the run is a run directory.
Every headline safety metric (ASR, or refusal share where higher is better) and every headline
utility metric (accuracy, MME points, over-refusal of benign requests) of the baseline is
looked up in the run under the same (model, attack, defense, task, judge); records and
leaderboard entries written before attacks existed are attack `none`. What a metric is (safety or
utility, which direction is better, its scale, headline or detail) is what its record declares
(harness.analysis.meanings; the fallback name table for records written before), so a plugin
task's headline metrics are gated like the built-in ones. Thresholds are in percentage points of
the metric's full scale (1 for rates, 200 per MME subtask), so one number works for ASR and MME
alike.

A regression is a worsening beyond the threshold: by the point estimate (`--rule point`, the
default: simple and predictable) or only when the whole 95% interval of the difference is
beyond it (`--rule interval`: for small noisy suites). The interval of a difference between two
independent runs combines both sides' bootstrap intervals (harness.stats.difference_interval).
A baseline cell missing from the run, or scored by a judge with another identity, fails too: a
gate that passes because the measurement changed would be worse than none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.errors import RealignError
from harness.analysis.leaderboard import check_records, clean_metric, identity_hash, read_run, stable_identity
from harness.analysis.leaderboard_schema import SCHEMA_VERSION, LeaderboardError, validate
from harness.analysis.meanings import column_meaning, declared_meaning, meaning_of
from harness.contracts.meaning import MetricMeaning
from harness.schema import MetricValue, record_key
from harness.stats import difference_interval

ObsKey = tuple[str, str, str, str, "str | None", str]  # model, attack, defense, task, judge spec, metric
Rule = Literal["point", "interval"]


class GateError(RealignError):
    """The baseline or the run cannot be read (the message names the file)."""


@dataclass
class Observation:
    value: MetricValue
    meaning: MetricMeaning
    judge_hash: str | None  # identity hash of the judge, None for utility tasks
    #: False when the meaning is the fallback table's guess (a record written before meanings)
    declared: bool = True

    @property
    def scale(self) -> float:
        return self.meaning.scale


def _metric(m: dict[str, Any]) -> MetricValue:
    c = clean_metric(m)
    return MetricValue(value=c["value"], low=c["low"], high=c["high"], n=c["n"])  # type: ignore[arg-type]


def observations_from_records(records: list[dict[str, Any]]) -> dict[ObsKey, Observation]:
    out: dict[ObsKey, Observation] = {}
    for rec in records:
        judge_ident = stable_identity((rec.get("identity") or {}).get("judge")) or (
            {"spec": rec["judge"]} if rec["judge"] is not None else {})
        for name, m in rec["metrics"].items():
            meaning = meaning_of(rec, name)
            if meaning.kind == "diagnostic":
                continue  # counts are never gated
            out[(*record_key(rec), name)] = Observation(
                _metric(m), meaning, identity_hash(judge_ident) if rec["judge"] else None,
                declared_meaning(rec, name) is not None)
    return out


def observations_from_leaderboard(doc: dict[str, Any]) -> dict[ObsKey, Observation]:
    columns = {c["key"]: c for c in doc["columns"]}
    out: dict[ObsKey, Observation] = {}
    for entry in doc["entries"]:
        for key, m in entry["metrics"].items():
            col = columns.get(key)
            if col is None:
                raise LeaderboardError(f"entry {entry['model']!r} | {entry['defense']!r}: metric {key!r} has no column")
            judge = doc["judges"].get(col["judge"]) if col["judge"] else None
            if col["judge"] and judge is None:
                raise LeaderboardError(f"column {key!r}: judge {col['judge']!r} is not in the judges table")
            try:
                meaning = column_meaning(col)
            except ValueError as exc:
                raise LeaderboardError(f"column {key!r}: {exc}") from None
            out[(entry["model"], entry.get("attack") or "none", entry["defense"], col["task"],
                 judge["spec"] if judge else None, col["metric"])] = \
                Observation(_metric(m), meaning, identity_hash(judge["identity"]) if judge else None)
    return out


def load_baseline(path: str | Path) -> dict[ObsKey, Observation]:
    """Observations of a results.json or a leaderboard.json (told apart by their top-level keys)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GateError(f"baseline {path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GateError(f"baseline {path}: not valid JSON ({exc})") from None
    try:
        if isinstance(doc, dict) and "schema_version" in doc:
            validate(doc, path)
            return observations_from_leaderboard(doc)
        if isinstance(doc, dict) and "results" in doc:
            return observations_from_records(check_records(doc["results"], path))
    except LeaderboardError as exc:
        raise GateError(f"baseline {exc}" if str(exc).startswith(str(path)) else f"baseline {path}: {exc}") from None
    raise GateError(f"baseline {path}: neither a realign results.json ({{\"results\": [...]}}) nor a leaderboard.json "
                    f"(schema_version {SCHEMA_VERSION})")


@dataclass
class Check:
    """One gated metric: baseline vs run, worsening in percentage points with its interval."""

    key: ObsKey
    kind: str
    status: Literal["ok", "regression", "missing", "judge changed", "no value"]
    base: MetricValue | None
    run: MetricValue | None
    worse_pp: float | None = None  # positive = worse
    worse_low: float | None = None
    worse_high: float | None = None
    limit_pp: float = 0.0
    scale: float = 1.0
    better: str | None = None

    @property
    def failed(self) -> bool:
        return self.status != "ok"

    def describe(self) -> str:
        model, attack, defense, task, judge, metric = self.key
        under = "" if attack == "none" else f"{attack} | "
        where = f"{task} | {judge or '-'} | {metric}  [{model} | {under}{defense}]"
        if self.status == "missing":
            return f"{where}: in the baseline but not in the run"
        if self.status == "judge changed":
            return f"{where}: judged by another {judge!r} than the baseline's (identity differs); re-baseline"
        if self.status == "no value":
            return f"{where}: the run has no value (baseline {_v(self.base)})"
        ci = "" if self.worse_low is None else f", 95% CI [{self.worse_low:+.1f}, {self.worse_high:+.1f}]"
        better = self.better
        of = "" if self.scale == 1.0 else f" of {self.scale:g}"
        return (f"{where}: {_v(self.base)} -> {_v(self.run)} ({better} is better); worse by {self.worse_pp:+.1f} pp{of}"
                f"{ci}; limit {self.limit_pp:.1f} pp")


def _v(m: MetricValue | None) -> str:
    if m is None or m.value is None:
        return "n/a"
    f = "{:.1f}" if abs(m.value) >= 10 else "{:.3f}"
    if m.low is None or m.high is None:
        return f.format(m.value)
    return f"{f.format(m.value)} [{f.format(m.low)}, {f.format(m.high)}]"


@dataclass
class GateResult:
    checks: list[Check]
    ungated: list[ObsKey] = field(default_factory=list)  # in the run only

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)


def _worsening(base: MetricValue, run: MetricValue, better: str, scale: float) -> tuple[float, float | None, float | None]:
    """How much worse the run is, in percentage points of full scale (positive = worse)."""
    d = difference_interval(base, run)
    sign = 1.0 if better == "lower" else -1.0
    per = 100.0 / scale
    value = sign * d.value * per
    if d.low is None or d.high is None:
        return value, None, None
    ends = sorted((sign * d.low * per, sign * d.high * per))
    return value, ends[0], ends[1]


def gated_meaning(base: Observation, new: Observation | None) -> MetricMeaning:
    """The meaning a baseline metric is gated by: the baseline's (what the run is held to), unless
    only the run's record declares one (a baseline written before meanings were declared)."""
    if new is not None and new.declared and not base.declared:
        return new.meaning
    return base.meaning


def gate(baseline: dict[ObsKey, Observation], run: dict[ObsKey, Observation],
         max_asr_increase: float | None, max_utility_drop: float | None, rule: Rule = "point") -> GateResult:
    """Check every headline ranked metric of the baseline whose kind has a limit; limits are in
    percentage points of the metric's scale."""
    limits = {"safety": max_asr_increase, "utility": max_utility_drop}
    checks: list[Check] = []
    for key in sorted(baseline, key=lambda k: tuple(x or "" for x in k)):
        base, new = baseline[key], run.get(key)
        meaning = gated_meaning(base, new)
        limit = limits.get(meaning.kind)
        if limit is None or not meaning.headline or meaning.better is None:
            continue
        if base.value.value is None:
            continue  # nothing to hold the run to
        kind, better = meaning.kind, meaning.better
        if new is None:
            checks.append(Check(key, kind, "missing", base.value, None, limit_pp=limit, better=better))
            continue
        if base.judge_hash != new.judge_hash:
            checks.append(Check(key, kind, "judge changed", base.value, new.value, limit_pp=limit, better=better))
            continue
        if new.value.value is None:
            checks.append(Check(key, kind, "no value", base.value, new.value, limit_pp=limit, better=better))
            continue
        worse, low, high = _worsening(base.value, new.value, better, meaning.scale)
        decisive = worse if rule == "point" or low is None else low
        status = "regression" if decisive > limit + 1e-9 else "ok"
        checks.append(Check(key, kind, status, base.value, new.value, worse, low, high, limit, meaning.scale, better))
    ungated = sorted((k for k, obs in run.items() if k not in baseline and obs.meaning.headline and obs.meaning.ranked),
                     key=lambda k: tuple(x or "" for x in k))
    return GateResult(checks, ungated)


def run_gate(baseline_path: str | Path, run_dir: str | Path, max_asr_increase: float | None,
             max_utility_drop: float | None, rule: Rule = "point") -> GateResult:
    if max_asr_increase is None and max_utility_drop is None:
        raise GateError("nothing to gate: give --max-asr-increase and/or --max-utility-drop (percentage points)")
    for name, value in (("--max-asr-increase", max_asr_increase), ("--max-utility-drop", max_utility_drop)):
        if value is not None and value < 0:
            raise GateError(f"{name} must be >= 0 percentage points, got {value}")
    baseline = load_baseline(baseline_path)
    try:
        run = read_run(run_dir)
    except LeaderboardError as exc:
        raise GateError(f"run {exc}") from None
    result = gate(baseline, observations_from_records(run.records), max_asr_increase, max_utility_drop, rule)
    if not result.checks:
        raise GateError(f"baseline {baseline_path}: no headline metric of a gated kind to check "
                        "(safety needs --max-asr-increase, utility --max-utility-drop)")
    return result


def format_report(result: GateResult, baseline: str | Path, run_dir: str | Path, rule: Rule) -> str:
    failed = [c for c in result.checks if c.failed]
    lines = [f"realign gate: run {run_dir} against baseline {baseline} ({len(result.checks)} metrics, rule: {rule})"]
    for c in result.checks:
        lines.append(f"  {'FAIL' if c.failed else 'ok  '} {c.kind:<7} {c.describe()}")
    if result.ungated:
        lines.append(f"  (not in the baseline, not gated: {len(result.ungated)} metrics, e.g. "
                     f"{' | '.join(x or '-' for x in result.ungated[0])})")
    if failed:
        lines.append(f"FAILED: {len(failed)} regression(s):")
        lines += [f"  - [{c.status}] {c.describe()}" for c in failed]
    else:
        lines.append("PASSED: no metric worse than its limit")
    return "\n".join(lines)
