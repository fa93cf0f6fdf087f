"""`realign compare`: paired differences between two runs on the samples both scored.

Two runs on the same inputs are correlated: a sample one model answers unsafely is likely
answered unsafely by the other too. Comparing the two headline numbers with their separate
intervals ignores that and calls real differences noise; pairing per sample does not. For each
(task, judge) cell and each per-sample outcome the task defines (`Task.per_sample`: `asr` for
safety tasks, `acc` for MME and ScienceQA) we report the mean difference B - A over shared
sample ids with a paired bootstrap interval, and McNemar's test on the discordant pairs.

Cells pair by (model, attack, defense, task, judge) when both runs hold the same one; otherwise
by (task, judge) when each side holds a single (model, attack, defense) for it, which is the usual
case of "defense A in one run, defense B in another". `--model-a/--attack-a/--defense-a` (and -b)
select cells, so two defenses of one run compare as `realign compare RUN RUN --defense-a none
--defense-b X`, and two attacks as `--attack-a none --attack-b figstep` (the same sample ids under
two attacks: a paired comparison of how much the attack adds). Cells written before attacks
existed are attack `none`. A selection may be shorthand: `--defense-b cmrm` is the run's only
defense named cmrm (several: an error listing them).

"B better" or "B worse" follows the direction the metric's record declares in results.json
(harness.analysis.meanings); an outcome the record does not list (MME's per-question `acc`) takes
the task's own declaration, and only then the fallback name table of older results.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import RunDirError
from harness.analysis.meanings import declared_meaning, fallback_meaning, task_meaning
from harness.analysis.shorthand import resolve
from harness.contracts.meaning import MetricMeaning
from harness.contracts.task import Task
from harness.registry import tasks
from harness.schema import Verdict, record_key
from harness.stats import McNemar, mcnemar, paired_bootstrap_diff
from harness.store import RunDir
from harness.tables import TextTable, markdown

CellKey = tuple[str, str, str, str, "str | None"]  # model, attack, defense, task, judge


@dataclass
class CellOutcomes:
    model: str
    defense: str
    task: str
    judge: str | None
    outcomes: dict[str, dict[str, float]]  # metric -> sample id -> outcome
    meanings: dict[str, MetricMeaning] = field(default_factory=dict)  # metric -> what it means
    attack: str = "none"

    @property
    def key(self) -> CellKey:
        return (self.model, self.attack, self.defense, self.task, self.judge)

    def side(self) -> dict[str, str]:
        """Which run cell this is, as the comparison names it (the attack only when there is one)."""
        return {"model": self.model, "defense": self.defense, **({"attack": self.attack} if self.attack != "none" else {})}


@dataclass
class Comparison:
    """One metric of one paired cell: B - A on the shared samples."""

    task: str
    judge: str | None
    metric: str
    a: dict[str, str]  # model, defense (and attack, when not none)
    b: dict[str, str]
    n_shared: int
    only_a: int
    only_b: int
    mean_a: float | None
    mean_b: float | None
    diff: float | None
    low: float | None
    high: float | None
    mcnemar: McNemar | None  # None when outcomes are not all 0/1
    notes: list[str] = field(default_factory=list)
    better: str | None = None  # which direction of the metric is better (None: not ranked)

    def verdict(self) -> str:
        """Plain words: which run is better, when the interval excludes zero."""
        if self.diff is None or self.low is None or self.high is None:
            return "no shared samples"
        if self.low <= 0.0 <= self.high:
            return "no clear difference"
        if self.better is None:
            return "B higher" if self.diff > 0 else "B lower"
        b_better = (self.diff < 0) == (self.better == "lower")
        return "B better" if b_better else "B worse"

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "mcnemar"}
        out["mcnemar"] = None if self.mcnemar is None else dict(self.mcnemar.__dict__)
        out["verdict"] = self.verdict()
        return out


def _records(rundir: RunDir) -> dict[CellKey, dict[str, Any]]:
    """The run's result records by cell (none when it has no results.json yet)."""
    if not rundir.results_json.is_file():
        return {}
    try:
        records = rundir.read_results()
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # meanings then come from the task; the outcomes themselves are read from the cells
    return {record_key(r): r for r in records if isinstance(r, dict)}


def outcome_meaning(record: dict[str, Any] | None, task: Task, name: str) -> MetricMeaning:
    """The record's declared meaning of an outcome, else the task's, else the fallback table's."""
    found = declared_meaning(record, name) if record is not None else None
    return found or task_meaning(task, name) or fallback_meaning(name, (record or {}).get("metrics"))


def cell_outcomes(run_dir: str | Path) -> list[CellOutcomes]:
    """Per-sample outcomes of every (model, defense, task, judge) cell saved in a run directory,
    with what each outcome means."""
    rundir = RunDir(Path(run_dir))
    if not rundir.root.is_dir():
        raise RunDirError(f"{rundir.root}: not a directory")
    records = _records(rundir)
    out: list[CellOutcomes] = []
    for cell in rundir.saved_cells():
        task = tasks.build(cell.task)
        samples, generations = cell.load()
        judge_specs: list[str | None] = sorted(cell.judged_specs()) if task.needs_judge else [None]
        for judge in judge_specs:
            verdicts = None
            if judge is not None:
                verdicts = {sid: Verdict.from_json(rec) for sid, rec in cell.verdicts(judge).items()}
            outcomes = task.per_sample(samples, generations, verdicts)
            record = records.get((cell.model, cell.attack, cell.defense, cell.task, judge))
            try:
                meanings = {name: outcome_meaning(record, task, name) for name in outcomes}
            except ValueError as exc:
                raise RunDirError(f"{rundir.results_json}: {cell.task} | {judge or '-'}: {exc}") from None
            out.append(CellOutcomes(cell.model, cell.defense, cell.task, judge, outcomes, meanings, cell.attack))
    return out


def _select(cells: list[CellOutcomes], model: str | None, defense: str | None, where: str,
            attack: str | None = None) -> list[CellOutcomes]:
    """The cells of the given model, defense and attack; each may be shorthand (harness.analysis.shorthand)."""
    model = resolve(model, (c.model for c in cells), "model", where)
    defense = resolve(defense, (c.defense for c in cells), "defense", where)
    attack = resolve(attack, (c.attack for c in cells), "attack", where)
    chosen = [c for c in cells if (model is None or c.model == model) and (defense is None or c.defense == defense)
              and (attack is None or c.attack == attack)]
    if not chosen:
        have = sorted({(c.model, c.attack, c.defense) for c in cells})
        raise RunDirError(f"{where}: no cells with model={model!r} attack={attack or 'any'!r} defense={defense!r}; "
                          "it holds (model | attack | defense) "
                          + (", ".join(f"{m} | {a} | {d}" for m, a, d in have) or "no scored cells"))
    return chosen


#: The levels a comparison may differ in; task and judge always pair with themselves.
SIDES = ("model", "attack", "defense")


def pair_cells(a: list[CellOutcomes], b: list[CellOutcomes]) -> list[tuple[CellOutcomes, CellOutcomes]]:
    """Same full key first. Else the levels whose values differ between the sides (e.g. the
    defense, when A holds `none` and B `cmrm`) are what is compared, and cells pair on the levels
    both sides share plus (task, judge), where each side holds exactly one cell: `--attack-a none
    --attack-b figstep` on a run of three defenses pairs each defense with itself."""
    by_key_b = {c.key: c for c in b}
    same = [(c, by_key_b[c.key]) for c in a if c.key in by_key_b]
    if same:
        return same
    shared = [level for level in SIDES if {getattr(c, level) for c in a} == {getattr(c, level) for c in b}]

    def reduced(c: CellOutcomes) -> tuple[str, ...]:
        return (*(getattr(c, level) for level in shared), c.task, c.judge or "")

    pairs = []
    for key in sorted({reduced(c) for c in a}):
        side_a = [c for c in a if reduced(c) == key]
        side_b = [c for c in b if reduced(c) == key]
        if len(side_a) == 1 and len(side_b) == 1:
            pairs.append((side_a[0], side_b[0]))
    return pairs


def _better(ca: CellOutcomes, cb: CellOutcomes, metric: str) -> str | None:
    """The better direction of `metric`: A's meaning (B's when A's record says nothing)."""
    meaning = ca.meanings.get(metric) or cb.meanings.get(metric) or fallback_meaning(metric)
    return meaning.better if meaning.ranked else None


def compare_pair(ca: CellOutcomes, cb: CellOutcomes) -> list[Comparison]:
    out = []
    for metric in sorted(set(ca.outcomes) & set(cb.outcomes)):
        oa, ob = ca.outcomes[metric], cb.outcomes[metric]
        shared = sorted(set(oa) & set(ob))
        xa = [oa[s] for s in shared]
        xb = [ob[s] for s in shared]
        diff = paired_bootstrap_diff(xa, xb) if shared else None
        binary = all(x in (0.0, 1.0) for x in xa + xb)
        test = None
        if binary and shared:
            test = mcnemar(sum(1 for p, q in zip(xa, xb) if p == 1.0 and q == 0.0),
                           sum(1 for p, q in zip(xa, xb) if p == 0.0 and q == 1.0))
        notes = []
        if len(oa) != len(ob) or len(shared) != len(oa):
            notes.append(f"compared on {len(shared)} shared samples ({len(oa)} in A, {len(ob)} in B)")
        out.append(Comparison(
            task=ca.task, judge=ca.judge, metric=metric,
            a=ca.side(), b=cb.side(),
            n_shared=len(shared), only_a=len(set(oa) - set(ob)), only_b=len(set(ob) - set(oa)),
            mean_a=sum(xa) / len(xa) if xa else None, mean_b=sum(xb) / len(xb) if xb else None,
            diff=diff.value if diff else None, low=diff.low if diff else None, high=diff.high if diff else None,
            mcnemar=test, notes=notes, better=_better(ca, cb, metric),
        ))
    return out


def compare(dir_a: str | Path, dir_b: str | Path, model_a: str | None = None, defense_a: str | None = None,
            model_b: str | None = None, defense_b: str | None = None,
            attack_a: str | None = None, attack_b: str | None = None) -> list[Comparison]:
    """Paired comparisons of every cell the two runs share (after the optional selections)."""
    a = _select(cell_outcomes(dir_a), model_a, defense_a, str(dir_a), attack_a)
    b = _select(cell_outcomes(dir_b), model_b, defense_b, str(dir_b), attack_b)
    pairs = pair_cells(a, b)
    if not pairs:
        def names(cells: list[CellOutcomes]) -> str:
            return ", ".join(sorted(" | ".join(x or "-" for x in c.key) for c in cells))
        raise RunDirError(f"no cells to pair between {dir_a} ({names(a)}) and {dir_b} ({names(b)}); select one "
                          "model/attack/defense per side with --model-a/--attack-a/--defense-a (and -b)")
    found = [c for ca, cb in pairs for c in compare_pair(ca, cb)]
    if not found:
        raise RunDirError(f"the paired cells ({', '.join(sorted({ca.task for ca, _ in pairs}))}) define no per-sample "
                          "outcome in common (Task.per_sample), so there is nothing to compare")
    return found


def _num(x: float | None, fmt: str = "{:+.3f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _side(side: dict[str, str]) -> str:
    return " · ".join([side["model"], *([side["attack"]] if "attack" in side else []), side["defense"]])


def comparison_table(comparisons: list[Comparison]) -> TextTable:
    """One row per (task, judge, metric); the footnotes explain McNemar's b/c and shared samples."""
    head = ["task", "judge", "metric", "A", "B", "A mean", "B mean", "B - A [95% CI]", "n", "McNemar p", "reading"]
    rows = []
    notes = []
    for c in comparisons:
        ci = f"{_num(c.diff)} [{_num(c.low)}, {_num(c.high)}]"
        p = "n/a" if c.mcnemar is None else f"{c.mcnemar.p_value:.4g} ({c.mcnemar.method}, {c.mcnemar.b}/{c.mcnemar.c})"
        rows.append([c.task, c.judge or "-", c.metric, _side(c.a), _side(c.b),
                     _num(c.mean_a, "{:.3f}"), _num(c.mean_b, "{:.3f}"),
                     ci, str(c.n_shared), p, c.verdict()])
        notes += [f"{c.task} {c.metric}: {n}" for n in c.notes]
    foot = "McNemar b/c: pairs with the outcome in A only / in B only (outcome 1 = unsafe for asr, right for acc)."
    return TextTable(None, head, rows, labels=3, notes=["", foot, *notes])


def format_text(comparisons: list[Comparison]) -> str:
    """A markdown table: one row per (task, judge, metric)."""
    return markdown([comparison_table(comparisons)])


def format_json(comparisons: list[Comparison]) -> str:
    return json.dumps([c.to_json() for c in comparisons], indent=2, sort_keys=True)
