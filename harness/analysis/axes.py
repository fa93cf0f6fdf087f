"""Which two metrics a safety-vs-utility picture draws, chosen from what the tasks declare.

The plot used to take the first safety and the first utility column in name order; on the model
organism that is text-only refusal against text-only helpfulness, the one pair on which every
defense looks alike, because the degradation VLM defenses exist for appears only once a picture
is attached. Tasks declare whether a metric was measured with an image (MetricMeaning.image), so
the default is the headline safety metric *with an image* (attack success, or refusal, with a
picture) against the headline utility metric, also preferring one with an image; a metric that
does not say (a mix of inputs) comes next, text-only ones last. `--x` / `--y` pick others by
column key or by an unambiguous part of it (`refused_none`, `mme|-|cognition`). The leaderboard
page (index.html) applies the same rule in its scatter.
"""

from __future__ import annotations

from typing import Any

from harness.errors import RealignError

_IMAGE_ORDER = {True: 0, None: 1, False: 2}


def default_column(columns: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The headline ranked column of `kind` measured with an image, else a mixed one, else text
    only; the document's column order breaks ties."""
    cands = [c for c in columns if c["kind"] == kind and c["headline"] and c["better"]]
    return min(cands, key=lambda c: _IMAGE_ORDER[c.get("image")], default=None)


def find_column(columns: list[dict[str, Any]], wanted: str, axis: str) -> dict[str, Any]:
    """The column whose key is `wanted`, else the only one whose metric name is `wanted` or whose
    key ends with `|wanted` or starts with `wanted|`; several candidates are listed."""
    exact = [c for c in columns if c["key"] == wanted]
    found = exact or [c for c in columns if c["metric"] == wanted or c["key"].endswith("|" + wanted)
                      or c["key"].startswith(wanted + "|")]
    if len(found) == 1:
        return found[0]
    if not found:
        raise RealignError(f"--{axis} {wanted!r} names no column; columns: {', '.join(c['key'] for c in columns)}")
    raise RealignError(f"--{axis} {wanted!r} is ambiguous; give one of: {', '.join(c['key'] for c in found)}")


def pick_axes(doc: dict[str, Any], x: str | None = None, y: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(x column, y column): those named, else the defaults above (safety on x, utility on y)."""
    cols = doc["columns"]
    cx = find_column(cols, x, "x") if x else default_column(cols, "safety")
    cy = find_column(cols, y, "y") if y else default_column(cols, "utility")
    if cx is None or cy is None:
        missing = "safety (e.g. asr of a judged task)" if cx is None else "utility (mme, scienceqa, benign refusal)"
        raise RealignError(f"cannot plot safety vs utility: the results hold no headline {missing} metric; "
                           "name the axes with --x and --y")
    return cx, cy


def axis_title(col: dict[str, Any]) -> tuple[str, str]:
    """(metric with its direction, where it comes from): two lines of an axis label."""
    better = f"{col['better']} is better" if col["better"] else "not ranked"
    image = {True: ", with image", False: ", text only"}.get(col.get("image"), "")
    return f"{col['metric']} ({better}{image})", f"{col['task']} | judge {col['judge'] or '-'}"
