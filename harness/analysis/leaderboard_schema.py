"""The JSON Schema of leaderboard.json, and its validation.

The schema lives here, inside the package, so an installed `realign` validates what it writes
without the repository checkout; leaderboard/schema.json is this dict written out (a test keeps
the two identical). Bump SCHEMA_VERSION's major number on any change a reader could trip on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import RealignError

SCHEMA_VERSION = "1.0"
#: 1.1 = 1.0 plus an optional `attack` on entries, written only when some entry has an attack other
#: than `none`; a 1.1 reader reads 1.0 documents (entries without `attack` are attack `none`), and
#: a 1.0 reader refuses a 1.1 document by its version rather than misread it.
ATTACK_SCHEMA_VERSION = "1.1"
#: 1.2 = 1.1 plus an optional `image` on columns (whether the metric was measured with an image, as
#: its task declares), written only when some column says it; the page draws those by default.
IMAGE_SCHEMA_VERSION = "1.2"
SUPPORTED_VERSIONS = (SCHEMA_VERSION, ATTACK_SCHEMA_VERSION, IMAGE_SCHEMA_VERSION)
SCHEMA_ID = "https://github.com/realign/realign/leaderboard/schema.json"

_NUM = {"type": ["number", "null"]}
_STR = {"type": ["string", "null"]}
_IDENTITY = {"type": ["object", "null"], "description": "component identity as recorded by the run"}

METRIC = {
    "type": "object",
    "description": "a metric value with its 95% bootstrap interval (null: not computable, e.g. no judged samples)",
    "required": ["value", "low", "high", "n"],
    "additionalProperties": False,
    "properties": {"value": _NUM, "low": _NUM, "high": _NUM, "n": {"type": "integer", "minimum": 0}},
}

COLUMN = {
    "type": "object",
    "required": ["key", "task", "judge", "metric", "kind", "better", "headline", "scale"],
    "additionalProperties": False,
    "properties": {
        "key": {"type": "string", "description": "task|judge|metric; judge is '-' for utility tasks"},
        "task": {"type": "string"},
        "judge": {**_STR, "description": "a key of `judges`; different judges are different columns"},
        "metric": {"type": "string"},
        "kind": {"enum": ["safety", "utility", "other"]},
        "better": {"enum": ["lower", "higher", None]},
        "headline": {"type": "boolean"},
        "scale": {"type": "number", "exclusiveMinimum": 0, "description": "value of a perfect score"},
        "image": {"type": "boolean", "description": "schema 1.2: measured with an image (true) or on text "
                  "alone (false), as the task declares; absent: a mix, or not said"},
    },
}

CELL = {
    "type": "object",
    "description": "one (task, judge) result of the entry, with where it came from",
    "required": ["task", "judge", "n", "generation_errors", "judge_errors", "data_revision", "task_identity",
                 "model_identity", "harness_version", "commit", "dirty", "date"],
    "additionalProperties": False,
    "properties": {
        "task": {"type": "string"},
        "judge": _STR,
        "n": {"type": "integer", "minimum": 0},
        "generation_errors": {"type": "integer", "minimum": 0},
        "judge_errors": {"type": "integer", "minimum": 0},
        "data_revision": {**_STR, "description": "dataset revision, release commit or file hash"},
        "task_identity": _IDENTITY,
        "model_identity": _IDENTITY,
        "harness_version": _STR,
        "commit": _STR,
        "dirty": {"type": ["boolean", "null"]},
        "date": {**_STR, "description": "when the run finished (from its run.json)"},
    },
}

ENTRY = {
    "type": "object",
    "required": ["model", "defense", "defense_identity", "metrics", "cells"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "attack": {"type": "string", "minLength": 1,
                   "description": "attack spec (schema 1.1); absent: none, the tasks' samples as released"},
        "defense": {"type": "string", "minLength": 1},
        "defense_identity": _IDENTITY,
        "metrics": {"type": "object", "additionalProperties": METRIC, "description": "column key -> metric"},
        "cells": {"type": "array", "items": CELL},
    },
}

JUDGE = {
    "type": "object",
    "required": ["spec", "identity"],
    "additionalProperties": False,
    "properties": {"spec": {"type": "string"}, "identity": {"type": "object"}},
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "realign leaderboard",
    "description": "One entry per (model, attack, defense spec); columns per (task, judge, metric).",
    "type": "object",
    "required": ["schema_version", "note", "columns", "judges", "entries"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"enum": list(SUPPORTED_VERSIONS)},
        "note": {**_STR, "description": "free text shown above the table (e.g. 'demo data')"},
        "columns": {"type": "array", "items": COLUMN},
        "judges": {"type": "object", "additionalProperties": JUDGE,
                   "description": "judge key (the spec, suffixed @hash when one spec names two judges) -> judge"},
        "entries": {"type": "array", "items": ENTRY},
    },
}


class LeaderboardError(RealignError):
    """A leaderboard file or its inputs are unusable (the message names the file)."""


def schema_text() -> str:
    """The schema as written to leaderboard/schema.json."""
    return json.dumps(SCHEMA, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def validate(doc: Any, where: str | Path = "leaderboard") -> None:
    """Raise LeaderboardError naming `where` and the first offending path if `doc` is invalid."""
    import jsonschema

    if isinstance(doc, dict) and "schema_version" in doc and doc["schema_version"] not in SUPPORTED_VERSIONS:
        raise LeaderboardError(f"{where}: schema_version {doc['schema_version']!r} is not supported "
                               f"(this realign reads {' and '.join(map(repr, SUPPORTED_VERSIONS))})")
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        first = errors[0]
        path = "/".join(map(str, first.absolute_path)) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise LeaderboardError(f"{where}: not a valid leaderboard at {path}: {first.message}{more}")


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a leaderboard.json."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LeaderboardError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeaderboardError(f"{path}: not valid JSON ({exc})") from None
    validate(doc, path)
    return doc
