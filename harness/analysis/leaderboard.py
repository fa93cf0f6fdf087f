"""`realign leaderboard`: merge the results of run directories into one leaderboard.json.

One entry per (model, attack, defense spec); one column per (task, judge, metric). The judge is part of
the column key because safety numbers are only comparable under the same judge: two judges never
share a column, and one judge spec that resolves to two different judge identities (another
phrase list, another template) gets two keys (`spec@hash`) instead of being merged silently.

The file is a pure function of its inputs: everything is sorted, the only dates are those the
runs recorded, no paths of the inputs are written, so the same run directories always give the
same bytes (a published leaderboard can be rebuilt and diffed).

Attacks: an entry names its attack when some record of the inputs was made under one (schema
1.1); inputs all under attack `none` (or written before attacks existed) give exactly the 1.0
document they always gave, so published boards rebuild unchanged and 1.0 readers still read them.
A column says whether its metric was measured with an image when its task declares it (schema 1.2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import harness
from harness.analysis.leaderboard_schema import (ATTACK_SCHEMA_VERSION, IMAGE_SCHEMA_VERSION, SCHEMA_VERSION,
                                                 LeaderboardError, validate)
from harness.analysis.meanings import check_meanings, column_fields, declared_meaning, in_columns, meaning_of
from harness.schema import dumps, record_attack, record_key

KIND_ORDER = {"safety": 0, "utility": 1, "other": 2}
#: Identity fields that describe a session (cost, usage), not the judge: ignored when comparing.
VOLATILE_IDENTITY_KEYS = frozenset({"usage_this_session", "usage"})
PAGE_FILES = ("index.html",)


@dataclass
class RunResults:
    """The result records of one run directory and its run.json (None when absent)."""

    source: Path  # the results.json read (named in errors only, never written out)
    records: list[dict[str, Any]]
    info: dict[str, Any] | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LeaderboardError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeaderboardError(f"{path}: not valid JSON ({exc})") from None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _record_problem(rec: Any) -> str | None:
    """Why one results.json record cannot be read as numbers (None when it can): the report, the
    leaderboard and the gate all compute with these fields, so a hand-edited `"value": "high"`
    must stop here with its name rather than as a TypeError deep inside a table or a comparison."""
    missing = [k for k in ("model", "defense", "task", "judge", "n", "metrics") if not isinstance(rec, dict) or k not in rec]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key in ("model", "defense", "task"):
        if not isinstance(rec[key], str):
            return f"{key} must be a string, got {rec[key]!r}"
    if rec["judge"] is not None and not isinstance(rec["judge"], str):
        return f"judge must be a string or null, got {rec['judge']!r}"
    for key in ("n", "generation_errors", "judge_errors"):  # the error counts may be absent or null
        value = rec["n"] if key == "n" else rec.get(key) or 0
        if not (_is_number(value) and math.isfinite(value) and value >= 0 and value == int(value)):
            return f"{key} must be a count (an integer >= 0), got {value!r}"
    if not isinstance(rec["metrics"], dict):
        return "has malformed metrics (an object of metric -> {value, low, high, n})"
    for name, m in rec["metrics"].items():
        if not isinstance(m, dict) or "value" not in m:
            return f"metric {name!r} is malformed (it needs value, low, high, n)"
        for key in ("value", "low", "high", "n"):
            if m.get(key) is not None and not _is_number(m[key]):
                return f"metric {name!r}: {key} {m[key]!r} is not a number"
    return check_meanings(rec)


def check_records(records: Any, where: Path) -> list[dict[str, Any]]:
    """Result records of a results.json, or an error naming the file and the record at fault."""
    if not isinstance(records, list):
        raise LeaderboardError(f"{where}: expected {{\"results\": [...]}}, a realign results.json")
    for i, rec in enumerate(records):
        problem = _record_problem(rec)
        if problem:
            raise LeaderboardError(f"{where}: result {i} {problem}" if problem.startswith(("lacks", "has ")) else
                                   f"{where}: result {i}: {problem}")
    return records


def read_run(path: str | Path) -> RunResults:
    """A run directory (or its results.json) with its run.json, checked enough to merge."""
    path = Path(path)
    results = path if path.is_file() else path / "results.json"
    if not results.is_file():
        raise LeaderboardError(f"{results}: not found (is {path} a finished realign run directory?)")
    data = _read_json(results)
    records = check_records(data.get("results") if isinstance(data, dict) else None, results)
    run_json = results.parent / "run.json"
    info = _read_json(run_json) if run_json.is_file() else None
    return RunResults(results, records, info if isinstance(info, dict) else None)


def clean_number(x: Any) -> float | None:
    """JSON-safe number: NaN and infinities (an empty rate) become null."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(x)


def clean_metric(m: dict[str, Any]) -> dict[str, Any]:
    return {"value": clean_number(m.get("value")), "low": clean_number(m.get("low")),
            "high": clean_number(m.get("high")), "n": int(m.get("n") or 0)}


def stable_identity(identity: Any) -> dict[str, Any]:
    if not isinstance(identity, dict):
        return {}
    return {k: v for k, v in identity.items() if k not in VOLATILE_IDENTITY_KEYS}


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(dumps(identity).encode()).hexdigest()[:8]


def data_revision(task_identity: Any) -> str | None:
    """The most specific data version a task recorded: hub revision, release commit, file hash."""
    if not isinstance(task_identity, dict):
        return None
    hf = task_identity.get("hf")
    if isinstance(hf, dict) and hf.get("revision"):
        return f"{hf.get('repo_id', 'hf')}@{hf['revision']}"
    for key in ("commit", "csv_sha256", "sha256", "data_sha256", "revision"):
        if task_identity.get(key):
            return f"{key}:{task_identity[key]}" if key != "commit" else str(task_identity[key])
    return None


def provenance(info: dict[str, Any] | None) -> dict[str, Any]:
    """Harness version, commit and finish date of a run, from its run.json."""
    info = info or {}
    git = info.get("git") or {}
    sessions = info.get("sessions") or []
    finished = [s.get("finished_at") for s in sessions if isinstance(s, dict) and s.get("finished_at")]
    return {
        "harness_version": (info.get("versions") or {}).get("harness"),
        "commit": git.get("commit"),
        "dirty": git.get("dirty"),
        "date": max(finished) if finished else info.get("created_at"),
    }


def column_key(task: str, judge: str | None, metric: str) -> str:
    return f"{task}|{judge or '-'}|{metric}"


def _judge_keys(runs: list[RunResults]) -> tuple[dict[tuple[str, str], str], dict[str, dict[str, Any]]]:
    """Key per (judge spec, identity hash), and the judges table. A spec is its own key unless the
    inputs hold it with two identities; then every variant gets `spec@hash`."""
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        for rec in run.records:
            if rec["judge"] is None:
                continue
            ident = stable_identity((rec.get("identity") or {}).get("judge")) or {"spec": rec["judge"]}
            variants.setdefault(rec["judge"], {})[identity_hash(ident)] = ident
    keys: dict[tuple[str, str], str] = {}
    table: dict[str, dict[str, Any]] = {}
    for spec, by_hash in variants.items():
        for h, ident in by_hash.items():
            key = spec if len(by_hash) == 1 else f"{spec}@{h}"
            keys[(spec, h)] = key
            table[key] = {"spec": spec, "identity": ident}
    return keys, table


def _ranking(fields: dict[str, Any]) -> tuple[Any, ...]:
    """What two records must agree on to share a column (the scale may differ: the larger wins,
    as when MME ran more subtasks in one run than in another)."""
    return (fields["kind"], fields["better"], fields["headline"])


def build(runs: Iterable[RunResults], note: str | None = None) -> dict[str, Any]:
    """The leaderboard document (validated) for these runs. Each column's kind, direction and
    scale come from what the records declare (harness.analysis.meanings); where two records
    disagree, a declared meaning wins over the fallback table's, and two declarations that
    disagree are an error."""
    runs = list(runs)
    judge_keys, judges = _judge_keys(runs)
    seen: dict[tuple[str, str, str, str, str | None], Path] = {}
    entries: dict[tuple[str, str, str], dict[str, Any]] = {}
    attacked = any(record_attack(rec) != "none" for run in runs for rec in run.records)
    columns: dict[str, dict[str, Any]] = {}
    column_source: dict[str, tuple[Path, bool]] = {}  # where a column's meaning came from, declared or not
    for run in runs:
        prov = provenance(run.info)
        for rec in run.records:
            cell_key = record_key(rec)
            if cell_key in seen:
                raise LeaderboardError(
                    f"{run.source}: model {rec['model']!r}, attack {record_attack(rec)!r}, defense {rec['defense']!r}, "
                    f"task {rec['task']!r}, judge {rec['judge']!r} is also in {seen[cell_key]}; pass only one run of each cell")
            seen[cell_key] = run.source
            identity = rec.get("identity") or {}
            judge = None
            if rec["judge"] is not None:
                ident = stable_identity(identity.get("judge")) or {"spec": rec["judge"]}
                judge = judge_keys[(rec["judge"], identity_hash(ident))]
            entry = entries.setdefault((rec["model"], record_attack(rec), rec["defense"]), {
                "model": rec["model"], "defense": rec["defense"], **({"attack": record_attack(rec)} if attacked else {}),
                "defense_identity": identity.get("defense"), "metrics": {}, "cells": [],
            })
            entry["cells"].append({
                "task": rec["task"], "judge": judge, "n": int(rec["n"]),
                "generation_errors": int(rec.get("generation_errors") or 0),
                "judge_errors": int(rec.get("judge_errors") or 0),
                "data_revision": data_revision(identity.get("task")),
                "task_identity": identity.get("task"), "model_identity": identity.get("model"),
                **prov,
            })
            for name, metric in rec["metrics"].items():
                meaning = meaning_of(rec, name)
                if not in_columns(meaning):
                    continue
                key = column_key(rec["task"], judge, name)
                entry["metrics"][key] = clean_metric(metric)
                declared = declared_meaning(rec, name) is not None
                if key not in columns:
                    columns[key] = {"key": key, "task": rec["task"], "judge": judge, "metric": name,
                                    **column_fields(meaning)}
                    column_source[key] = (run.source, declared)
                    continue
                col = columns[key]
                scale = max(col["scale"], meaning.scale)
                if _ranking(col) != _ranking(column_fields(meaning)):
                    first, first_declared = column_source[key]
                    if declared and first_declared:
                        raise LeaderboardError(
                            f"{run.source}: task {rec['task']!r} declares metric {name!r} as {_ranking(column_fields(meaning))}"
                            f" but {first} as {_ranking(col)} (kind, better, headline); one column cannot rank both")
                    if declared:  # a task's declaration outranks the name table's guess for older records
                        col.update(column_fields(meaning))
                        column_source[key] = (run.source, True)
                if "image" not in col and meaning.image is not None:
                    col["image"] = meaning.image
                col["scale"] = scale
    for entry in entries.values():
        entry["cells"].sort(key=lambda c: (c["task"], c["judge"] or ""))
    imaged = any("image" in c for c in columns.values())
    doc = {
        "schema_version": IMAGE_SCHEMA_VERSION if imaged else ATTACK_SCHEMA_VERSION if attacked else SCHEMA_VERSION,
        "note": note,
        "columns": sorted(columns.values(), key=lambda c: (
            KIND_ORDER[c["kind"]], not c["headline"], c["task"], c["judge"] or "", c["metric"])),
        "judges": judges,
        "entries": [entries[k] for k in sorted(entries)],
    }
    validate(doc)
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    """Canonical bytes: sorted keys, two-space indent, UTF-8, newline at the end."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def page_source_dir() -> Path:
    """Where the leaderboard page ships: inside the package (harness/web, a link to the
    repository's published leaderboard/index.html), so an installed realign copies it too."""
    return Path(harness.__file__).resolve().parent / "web"


def write(doc: dict[str, Any], out: str | Path, with_page: bool = True) -> Path:
    """Write leaderboard.json into folder `out` (or to `out` itself if it names a .json file).

    The page (index.html) is copied beside it when missing, so the folder can be served as is;
    an existing page is never overwritten.
    """
    out = Path(out)
    target = out if out.suffix == ".json" else out / "leaderboard.json"
    if out.is_file() and target != out:
        raise LeaderboardError(f"--out {out} is a file; give a folder, or a file name ending in .json")
    if target.is_dir():
        raise LeaderboardError(f"--out {target} is a folder; give a folder to write leaderboard.json into, "
                               "or a file name ending in .json")
    data = encode(doc)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(target)  # atomic: an existing leaderboard.json is whole before and after
        source = page_source_dir()
        if with_page and source.resolve() != target.parent.resolve():
            for name in PAGE_FILES:
                if (source / name).is_file() and not (target.parent / name).exists():
                    shutil.copyfile(source / name, target.parent / name)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise LeaderboardError(f"--out {out}: cannot write ({exc.strerror or exc}"
                               f"{': ' + str(exc.filename) if exc.filename else ''})") from None
    return target


def leaderboard(run_dirs: list[str | Path], out: str | Path, note: str | None = None) -> Path:
    """Read the runs, build and validate the leaderboard, write it; return the written path."""
    if not run_dirs:
        raise LeaderboardError("no run directories given")
    return write(build([read_run(d) for d in run_dirs], note), out)


def summary(doc: dict[str, Any]) -> str:
    heads = [c for c in doc["columns"] if c["headline"] and c["kind"] != "other"]
    kind = "model x attack x defense" if any("attack" in e for e in doc["entries"]) else "model x defense"
    return (f"{len(doc['entries'])} entries ({kind}), {len(heads)} headline columns, "
            f"judges: {', '.join(sorted(doc['judges'])) or '(none)'}")
