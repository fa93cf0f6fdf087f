"""What a metric of a result record means, for ranking, gating, comparing and plotting.

The task that computed a metric knows what it means (Task.meanings) and every record written
since tasks declare meanings carries that declaration beside its numbers (`record["meanings"]`,
written by harness.judging.result_record). Analysis reads it from there, so a plugin task outside
this package is ranked, gated and compared correctly with no edit to the harness. Records written
before carry no `meanings` (or lack a metric): only for those does the old name table
(harness.analysis.metric_kinds) answer, so older results rank and gate as they always did.

The leaderboard, the gate, compare and the report call only this module, never the name table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from harness.analysis.metric_kinds import fallback_meaning as _table_meaning
from harness.contracts.meaning import UNDECLARED, MetricMeaning

if TYPE_CHECKING:
    from harness.contracts.task import Task

#: Leaderboard column kinds (leaderboard/schema.json); diagnostics are kept out of the columns.
COLUMN_KINDS = ("safety", "utility", "other")


def fallback_meaning(name: str, metrics: Mapping[str, Any] | None = None) -> MetricMeaning:
    """The name table's meaning of `name` in a record whose metrics are `metrics` (their names
    scale MME's totals): what records written before meanings were declared are read with."""
    return _table_meaning(name, metrics or {})


def declared_meaning(record: Mapping[str, Any], name: str) -> MetricMeaning | None:
    """The meaning the record itself carries for `name`, or None if it carries none.

    Raises ValueError naming the metric when the entry is malformed: a record that says something
    unreadable about a metric must not be ranked by a guess instead."""
    meanings = record.get("meanings")
    if not isinstance(meanings, Mapping) or name not in meanings:
        return None
    entry = meanings[name]
    if not isinstance(entry, Mapping):
        raise ValueError(f"metric {name!r}: meaning must be an object, got {type(entry).__name__}")
    try:
        return MetricMeaning.from_json(entry)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metric {name!r}: malformed meaning {dict(entry)!r} ({exc})") from None


def meaning_of(record: Mapping[str, Any], name: str) -> MetricMeaning:
    """The meaning of metric `name` of a results.json record: its own declaration, else the
    fallback table (records written before tasks declared meanings)."""
    return declared_meaning(record, name) or fallback_meaning(name, record.get("metrics"))


def task_meaning(task: Task, name: str) -> MetricMeaning | None:
    """What `task` declares today for `name` (None if it declares nothing): for outcomes that are
    not among a record's metrics, e.g. the per-sample `acc` MME pairs on in `realign compare`."""
    found = task.metric_meanings({name: None})[name]  # type: ignore[dict-item]
    return None if found == UNDECLARED else found


def check_meanings(record: Mapping[str, Any]) -> str | None:
    """Why the record's `meanings` cannot be read (None when they can, or when it has none)."""
    meanings = record.get("meanings")
    if meanings is None:
        return None
    if not isinstance(meanings, Mapping):
        return f"meanings must be an object (metric -> meaning), got {type(meanings).__name__}"
    for name in meanings:
        try:
            declared_meaning(record, name)
        except ValueError as exc:
            return str(exc)
    return None


def in_columns(meaning: MetricMeaning) -> bool:
    """Whether a metric gets a leaderboard column: diagnostics (counts) do not (cells keep the
    error counts), as counts never did."""
    return meaning.kind in COLUMN_KINDS


def column_meaning(column: Mapping[str, Any]) -> MetricMeaning:
    """The meaning a published leaderboard column carries (kind, better, headline, scale).
    Raises ValueError when the column's fields contradict each other (a ranked kind without a
    better direction)."""
    scale = float(column["scale"])
    return MetricMeaning(column["kind"], column["better"], "rate" if scale == 1.0 else "points", scale,
                         bool(column["headline"]), column.get("image"))


def column_fields(meaning: MetricMeaning) -> dict[str, Any]:
    """The meaning as a leaderboard column states it (the published schema's fields); `image` only
    when said (schema 1.2), so a board whose metrics say nothing about images is written as before."""
    image = {} if meaning.image is None else {"image": meaning.image}
    return {"kind": meaning.kind, "better": meaning.better, "headline": meaning.headline, "scale": meaning.scale, **image}
