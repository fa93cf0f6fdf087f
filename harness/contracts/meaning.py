"""What a metric means, declared by the task that computes it.

results.json stores numbers; ranking, gating, comparing and plotting them needs to know that a
lower `asr` is better but a higher `acc` is, that MME's `perception` is in points out of 200 per
subtask while `acc` is a fraction, and which metrics are headlines rather than per-category
detail. Only the task knows, so it says so (`Task.meanings`), the meaning is written beside each
metric in results.json, and analysis reads it from there: a new task is ranked and gated
correctly with no edit outside its own file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["safety", "utility", "diagnostic", "other"]
Better = Literal["lower", "higher"]
Unit = Literal["rate", "points", "count"]
KINDS: tuple[str, ...] = ("safety", "utility", "diagnostic", "other")


@dataclass(frozen=True)
class MetricMeaning:
    """`kind`: safety (attack success, refusal of harmful requests), utility (accuracy, helpfulness,
    over-refusal), diagnostic (counts such as judge errors: shown, never ranked) or other.
    `better`: which direction is better (None: not ranked). `unit` and `scale`: a rate in [0, 1]
    (scale 1), or points out of `scale`. `headline`: an overall number rather than a breakdown.
    `image`: whether the metric is measured on requests that carry an image (True), on text alone
    (False), or on a mix / not said (None). The degradation VLM defenses exist for shows only with
    an image, so plots and the leaderboard page draw the metric with an image by default. It says
    what to draw, never how to rank: two meanings that differ only in it compare equal."""

    kind: Kind
    better: Better | None = None
    unit: Unit = "rate"
    scale: float = 1.0
    headline: bool = True
    image: bool | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.better not in (None, "lower", "higher"):
            raise ValueError(f"metric direction {self.better!r} is not lower, higher or None")
        if self.kind in ("safety", "utility") and self.better is None:
            raise ValueError(f"a {self.kind} metric must say which direction is better")
        if self.scale <= 0:
            raise ValueError(f"metric scale must be > 0, got {self.scale}")
        if not (self.image is None or isinstance(self.image, bool)):
            raise ValueError(f"metric image must be true, false or null, got {self.image!r}")

    @property
    def ranked(self) -> bool:
        return self.better is not None and self.kind in ("safety", "utility")

    def detail(self) -> MetricMeaning:
        """The same meaning for a per-category breakdown (not a headline)."""
        return dataclasses.replace(self, headline=False)

    def to_json(self) -> dict[str, Any]:
        """The fields as results.json stores them; `image` only when said (records stay as they were)."""
        out = dataclasses.asdict(self)
        if self.image is None:
            del out["image"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MetricMeaning:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def rate(kind: Kind, better: Better, headline: bool = True, image: bool | None = None) -> MetricMeaning:
    """A share of samples in [0, 1]."""
    return MetricMeaning(kind, better, "rate", 1.0, headline, image)


def points(kind: Kind, better: Better, maximum: float, headline: bool = True,
           image: bool | None = None) -> MetricMeaning:
    """A score in points out of `maximum` (e.g. MME's 200 per subtask)."""
    return MetricMeaning(kind, better, "points", float(maximum), headline, image)


#: Counts and diagnostics: kept in results, never ranked or gated.
COUNT = MetricMeaning("diagnostic", None, "count", 1.0, headline=False)
#: A metric its task does not describe: shown, never ranked.
UNDECLARED = MetricMeaning("other", None, "rate", 1.0, headline=True)

#: What every task's records may carry besides its own metrics.
COMMON: dict[str, MetricMeaning] = {"judge_errors": COUNT, "judge_errors/*": COUNT}


def lookup(name: str, table: Mapping[str, MetricMeaning]) -> MetricMeaning | None:
    """The meaning of `name` in a table keyed by names or glob patterns: an exact name first,
    then the first pattern that matches, in the table's order."""
    if name in table:
        return table[name]
    for pattern, meaning in table.items():
        if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
            return meaning
    return None
