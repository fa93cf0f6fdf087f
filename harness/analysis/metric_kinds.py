"""What a metric name means for ranking: safety or utility, which direction is better, its scale.

results.json stores numbers only; the leaderboard, the gate and the plot all need to know that a
lower `asr` is better but a higher `acc` is, and that MME's `perception` is in points out of
200 per subtask while `acc` is a fraction. One table here keeps the three consistent. Names not
listed are kept as `other` (shown, never ranked or gated), so a new task never breaks them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal, Mapping

Kind = Literal["safety", "utility", "other"]
Better = Literal["lower", "higher"]

#: Counts and diagnostics, not rates: kept out of leaderboard columns (cells keep error counts).
COUNT_PATTERNS = ("judge_errors", "judge_errors/*", "unparseable", "failed_extractions")

#: (glob pattern, kind, better); first match wins.
RULES: tuple[tuple[str, Kind, Better], ...] = (
    ("asr", "safety", "lower"),
    ("asr/*", "safety", "lower"),
    ("refused_*", "safety", "higher"),  # organism task: harmful requests refused
    # Over-refusal of benign requests costs utility: lower is better.
    ("benign_refusal", "utility", "lower"),
    ("benign_refusal/*", "utility", "lower"),
    ("refusal_rate", "utility", "lower"),
    ("acc", "utility", "higher"),
    ("acc/*", "utility", "higher"),
    ("acc_img", "utility", "higher"),
    ("acc_plus/*", "utility", "higher"),
    ("score/*", "utility", "higher"),
    ("perception", "utility", "higher"),
    ("cognition", "utility", "higher"),
    ("helpful_*", "utility", "higher"),
    ("picture_qa", "utility", "higher"),
)

#: MME points: 200 per subtask (100 acc + 100 acc+); a group total sums its subtasks that ran.
MME_SUBTASK_POINTS = 200.0


@dataclass(frozen=True)
class MetricInfo:
    name: str
    kind: Kind
    better: Better | None
    headline: bool

    @property
    def ranked(self) -> bool:
        return self.better is not None


def is_count(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in COUNT_PATTERNS)


def metric_info(name: str) -> MetricInfo:
    """Kind and direction of a metric. Headline metrics are the overall ones (no `/`), plus the
    per-mode benign refusal rates of the demo task, which has no overall one."""
    headline = "/" not in name or name.startswith("benign_refusal/")
    for pattern, kind, better in RULES:
        if fnmatch.fnmatchcase(name, pattern):
            return MetricInfo(name, kind, better, headline)
    return MetricInfo(name, "other", None, headline)


def full_scale(name: str, metrics: Mapping[str, object]) -> float:
    """The value a perfect score has, so that differences can be read in percentage points of it.

    Rates are fractions (1.0). MME's `score/<subtask>` is out of 200; `perception` and `cognition`
    sum the subtasks present in the same record (`metrics` holds that record's metric names).
    """
    if name.startswith("score/"):
        return MME_SUBTASK_POINTS
    if name in ("perception", "cognition"):
        from tasks.mme import COGNITION, PERCEPTION

        members = PERCEPTION if name == "perception" else COGNITION
        count = sum(1 for s in members if f"score/{s}" in metrics)
        return MME_SUBTASK_POINTS * max(count, 1)
    return 1.0
