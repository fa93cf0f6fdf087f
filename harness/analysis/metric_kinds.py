"""The fallback for older results: what a metric *name* meant before tasks declared meanings.

Tasks now declare what their metrics mean (Task.meanings) and every result record written since
carries that declaration (`record["meanings"]`); analysis reads it from there
(harness.analysis.meanings). Records written before have no `meanings`, and a hand-written
results.json may lack some: for those, and only those, this table of name patterns says what the
built-in tasks' metrics meant, so older results still rank and gate exactly as they did. It is
frozen history: a new task declares its meanings in its own file and is never added here.
Names not listed are `other` (shown, never ranked or gated). Whether a metric was measured with an
image is read from the mode its name ends in (`_shape`, `/none`), as the built-in tasks declare it.

Nothing here imports a task: MME's group totals are scaled from the `score/<subtask>` names in the
same record, with the subtask groups MME had when records carried no meanings.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from harness.contracts.meaning import COUNT, Better, Kind, MetricMeaning, points, rate

#: Counts and diagnostics, not rates: kept out of leaderboard columns and the gate.
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
#: MME's subtask groups as older records name them (`score/<subtask>`); tasks/mme.py is the source
#: for new records, which carry their totals' scale themselves.
MME_GROUPS: dict[str, tuple[str, ...]] = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


def _headline(name: str) -> bool:
    """Overall metrics (no `/`), plus the demo task's per-mode benign refusal rates: that task has
    no overall one."""
    return "/" not in name or name.startswith("benign_refusal/")


#: Metrics whose every sample carries an image, by name: MME's scores and totals, ScienceQA's
#: IMG-Accuracy, the organism's picture questions.
IMAGE_NAMES = ("picture_qa", "perception", "cognition", "acc_img", "score/*", "acc_plus/*")


def _image(name: str) -> bool | None:
    """Whether `name` was measured with an image, as the built-in tasks name their modes: a last
    part `shape` or `blank` (organism, demo) is with one, `none` is text only; else not said."""
    if any(fnmatch.fnmatchcase(name, p) for p in IMAGE_NAMES):
        return True
    last = name.replace("/", "_").rsplit("_", 1)[-1]
    return {"shape": True, "blank": True, "none": False}.get(last) if last != name else None


def _scale(name: str, metrics: Mapping[str, object]) -> float:
    """The value a perfect score has: 1 for rates, 200 for an MME subtask score, 200 per subtask
    present in the same record (`metrics`) for MME's perception and cognition totals."""
    if name.startswith("score/"):
        return MME_SUBTASK_POINTS
    if name in MME_GROUPS:
        count = sum(1 for s in MME_GROUPS[name] if f"score/{s}" in metrics)
        return MME_SUBTASK_POINTS * max(count, 1)
    return 1.0


def fallback_meaning(name: str, metrics: Mapping[str, object]) -> MetricMeaning:
    """What `name` meant by this table, within a record whose metric names are `metrics`."""
    if any(fnmatch.fnmatchcase(name, p) for p in COUNT_PATTERNS):
        return COUNT
    headline = _headline(name)
    for pattern, kind, better in RULES:
        if fnmatch.fnmatchcase(name, pattern):
            scale = _scale(name, metrics)
            if scale != 1.0:
                return points(kind, better, scale, headline, _image(name))
            return rate(kind, better, headline, _image(name))
    return MetricMeaning("other", None, "rate", 1.0, headline)
