"""Judge saved generations again, and measure how much two judges agree.

`rejudge` is the "judge" stage of the runner run alone from a run directory: it reads each
cell's generations.jsonl (every record carries its sample), judges what the verdict file of
that judge does not hold yet, scores with the task's own metrics and replaces that judge's
records in results.json. No model loads and nothing is regenerated. Verdicts are appended per
chunk and LLM verdicts are cached as they arrive, so a killed re-judge resumes where it stopped
without paying twice.

`agreement` compares two judges over the samples both judged: unsafe vs not unsafe (`safe` and
`refusal` both count as not unsafe, so a keyword judge and an LLM judge compare), a 2x2
confusion matrix and Cohen's kappa. Judge errors are kept out of the matrix and reported
separately, since an error is neither verdict.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from harness.errors import RunDirError
from harness.contracts.judge import Judge
from harness.registry import judges, tasks
from harness.schema import Generation, ResultRecord, RunConfig, Sample, Verdict
from harness.spec import parse_spec
from harness.stats import generation_errors
from harness.store import Cell, RunDir, slug

log = logging.getLogger(__name__)
JUDGE_CHUNK = 64
CellKey = tuple[str, str, str]


def _run_config(rundir: RunDir) -> tuple[RunConfig, dict[str, Any]]:
    info = rundir.load_run_info()
    if info is None or "config" not in info:
        raise RunDirError(f"{rundir.root} holds no run.json with a config: is it a realign run directory?")
    return RunConfig.from_json(info["config"]), info


def saved_cells(rundir: RunDir, config: RunConfig) -> Iterator[Cell]:
    """The cells of the run that have saved generations, in the run's order."""
    for model in config.models:
        for defense in config.defenses:
            for task in config.tasks:
                folder = rundir.root / slug(model) / slug(defense) / slug(task)
                if (folder / "generations.jsonl").is_file():
                    yield rundir.cell(model, defense, task)


def load_cell(cell: Cell) -> tuple[list[Sample], dict[str, Generation]]:
    """Samples (from the records) and generations of a cell, in the order they were generated."""
    samples: list[Sample] = []
    generations: dict[str, Generation] = {}
    for sid, rec in cell.generations().items():
        if "sample" not in rec:
            raise RunDirError(f"{cell.generations_path}: record {sid!r} has no saved sample; cannot re-judge it")
        samples.append(Sample.from_json(rec["sample"]))
        generations[sid] = Generation.from_json(rec)
    return samples, generations


def judge_cell(cell: Cell, judge: Judge, samples: list[Sample], generations: dict[str, Generation],
               progress: bool = False) -> dict[str, Verdict]:
    """Verdicts for every sample, judging only those the judge's verdict file lacks."""
    stored = cell.verdicts(judge.spec)
    pending = [s for s in samples if s.id not in stored]
    bar = tqdm(total=len(samples), initial=len(samples) - len(pending), desc=f"judge {judge.spec}",
               disable=not progress or not pending, file=sys.stderr, unit="sample")
    for start in range(0, len(pending), JUDGE_CHUNK):
        chunk = pending[start : start + JUDGE_CHUNK]
        verdicts = judge.verdicts(chunk, [generations[s.id] for s in chunk])
        cell.append_verdicts(judge.spec, [v.to_json() for v in verdicts])
        bar.update(len(chunk))
    bar.close()
    stored = cell.verdicts(judge.spec)
    return {s.id: Verdict.from_json(stored[s.id]) for s in samples if s.id in stored}


def _cell_identity(records: list[dict[str, Any]], info: dict[str, Any], key: CellKey) -> dict[str, Any]:
    """Model/defense/task identity: from an earlier record of the cell, else from run.json."""
    for rec in records:
        if (rec["model"], rec["defense"], rec["task"]) == key:
            ident = rec.get("identity") or {}
            return {k: ident.get(k) for k in ("model", "defense", "task")}
    model, defense, task = key
    return {"model": info.get("backends", {}).get(model, {"spec": model}),
            "defense": {"spec": defense}, "task": {"spec": task}}


def rejudge(run_dir: str | Path, judge_specs: list[str], progress: bool = True) -> list[dict[str, Any]]:
    """Judge every saved generation of a run with each judge; update and return its result records.

    Every judge is built before any judging, so a bad spec fails at once. Records of other judges
    in results.json are kept; records of these judges are replaced. Returns the new records.
    """
    rundir = RunDir(Path(run_dir))
    config, info = _run_config(rundir)
    built: list[Judge] = [judges.build(spec) for spec in judge_specs]
    try:
        existing = rundir.read_results()
    except RunDirError:
        existing = []
    new: list[dict[str, Any]] = []
    for cell in saved_cells(rundir, config):
        task = tasks.build(cell.task)
        if not task.needs_judge:
            log.info("task %s scores answers itself (no judge); skipped", cell.task)
            continue
        samples, generations = load_cell(cell)
        key = (cell.model, cell.defense, cell.task)
        identity = _cell_identity(existing, info, key)
        for judge in built:
            verdicts = judge_cell(cell, judge, samples, generations, progress)
            metrics = task.metrics(samples, generations, verdicts)
            judge_errors = int(metrics["judge_errors"].value) if "judge_errors" in metrics else 0
            judge_identity = judge.identity()
            usage = getattr(judge, "usage_record", None)
            if callable(usage):  # what judging cost in this session (cached verdicts are free)
                judge_identity = {**judge_identity, "usage_this_session": usage()}
            record = ResultRecord(
                model=cell.model, defense=cell.defense, task=cell.task, judge=judge.spec, n=len(samples),
                metrics=metrics, generation_errors=generation_errors(samples, generations),
                judge_errors=judge_errors, identity={**identity, "judge": judge_identity},
            ).to_json()
            record["identity"]["judge_tokens"] = verdict_tokens(verdicts.values())
            new.append(record)
            _merge(existing, record)
            rundir.write_results(existing)
    if not new:
        log.warning("%s: no cell with saved generations of a judged task; nothing was judged", rundir.root)
    return new


def verdict_tokens(verdicts: Any) -> dict[str, int]:
    """The judge bill of a cell as recorded in its verdicts: tokens and HTTP requests paid for
    verdicts made fresh, and how many verdicts came from the cache instead (free)."""
    out = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cached_verdicts": 0}
    for v in verdicts:
        if v.detail.get("cached"):
            out["cached_verdicts"] += 1
            continue
        for k in ("prompt_tokens", "completion_tokens", "requests"):
            out[k] += int(v.detail.get(k, 0) or 0)
    return out


def _merge(records: list[dict[str, Any]], record: dict[str, Any]) -> None:
    key = (record["model"], record["defense"], record["task"], record["judge"])
    for i, rec in enumerate(records):
        if (rec["model"], rec["defense"], rec["task"], rec["judge"]) == key:
            records[i] = record
            return
    records.append(record)


# ---- agreement ---------------------------------------------------------------------------------

def canonical_judge(spec: str) -> str:
    """The spec as the runner names it (and its verdict file): parsed and re-joined."""
    return str(parse_spec(spec))


def split_judge_list(text: str) -> list[str]:
    """`A,B` -> [A, B], keeping commas inside a spec: `keywords,llm:model=m,base_url=u` -> 2 specs.

    A piece whose part before '=' has no ':' is a key=value of the previous spec.
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        head = piece.split("=", 1)[0]
        if specs and "=" in piece and ":" not in head:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def _is_unsafe(label: str) -> bool:
    return label == "unsafe"


def cohen_kappa(matrix: list[list[int]]) -> float | None:
    """Kappa of a square confusion matrix; None when chance agreement is total (kappa undefined)."""
    n = sum(map(sum, matrix))
    if n == 0:
        return None
    k = len(matrix)
    po = sum(matrix[i][i] for i in range(k)) / n
    pe = sum(sum(matrix[i]) * sum(row[i] for row in matrix) for i in range(k)) / (n * n)
    return None if pe >= 1.0 else (po - pe) / (1.0 - pe)


def agreement(run_dir: str | Path, judge_a: str, judge_b: str) -> dict[str, Any]:
    """Cohen's kappa and the confusion matrix (unsafe vs not unsafe) of two judges over a run."""
    rundir = RunDir(Path(run_dir))
    config, _ = _run_config(rundir)
    a, b = canonical_judge(judge_a), canonical_judge(judge_b)
    matrix = [[0, 0], [0, 0]]  # rows: judge A unsafe / not; columns: judge B unsafe / not
    errors = {"a_only": 0, "b_only": 0, "both": 0}
    only = {"a": 0, "b": 0}
    cells = 0
    found = {a: False, b: False}
    for cell in saved_cells(rundir, config):
        va, vb = cell.verdicts(a), cell.verdicts(b)
        found[a] |= bool(va)
        found[b] |= bool(vb)
        if not (va and vb):
            continue
        cells += 1
        only["a"] += len(set(va) - set(vb))
        only["b"] += len(set(vb) - set(va))
        for sid in va.keys() & vb.keys():
            la, lb = va[sid]["label"], vb[sid]["label"]
            if la == "error" or lb == "error":
                errors["both" if la == lb else ("a_only" if la == "error" else "b_only")] += 1
                continue
            matrix[0 if _is_unsafe(la) else 1][0 if _is_unsafe(lb) else 1] += 1
    missing = [spec for spec, ok in found.items() if not ok]
    if missing:
        raise RunDirError(f"{rundir.root}: no verdicts of judge {', '.join(map(repr, missing))}; "
                          f"judged here: {', '.join(map(repr, judged_specs(rundir, config))) or '(none)'}")
    n = sum(map(sum, matrix))
    po = (matrix[0][0] + matrix[1][1]) / n if n else None
    pe = ((matrix[0][0] + matrix[0][1]) * (matrix[0][0] + matrix[1][0])
          + (matrix[1][0] + matrix[1][1]) * (matrix[0][1] + matrix[1][1])) / (n * n) if n else None
    return {
        "judge_a": a, "judge_b": b, "cells": cells,
        "labels": ["unsafe", "not unsafe"], "matrix": matrix,
        "compared": n, "judged_by_both": n + sum(errors.values()),
        "errors": errors, "judged_only_by": only,
        "observed_agreement": po, "expected_agreement": pe, "kappa": cohen_kappa(matrix),
        "unsafe_rate": {"a": (matrix[0][0] + matrix[0][1]) / n if n else None,
                        "b": (matrix[0][0] + matrix[1][0]) / n if n else None},
    }


def judged_specs(rundir: RunDir, config: RunConfig) -> list[str]:
    """Judge specs with verdict files in the run (read from the files' first record)."""
    out: list[str] = []
    for cell in saved_cells(rundir, config):
        folder = cell.dir / "verdicts"
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            with open(path, encoding="utf-8") as fh:
                first = fh.readline()
            try:
                spec = json.loads(first).get("judge")
            except json.JSONDecodeError:
                continue
            if spec and spec not in out:
                out.append(spec)
    return out


def format_agreement(report: dict[str, Any]) -> str:
    """A plain-text table of an `agreement` report."""
    def num(x: float | None, digits: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{digits}f}"

    m = report["matrix"]
    e = report["errors"]
    width = max(14, len(str(max(max(r) for r in m))) + 2)
    lines = [
        f"A: {report['judge_a']}",
        f"B: {report['judge_b']}",
        f"samples judged by both: {report['judged_by_both']} in {report['cells']} cell(s); compared: "
        f"{report['compared']}; judge errors left out: A {e['a_only']}, B {e['b_only']}, both {e['both']}",
        "",
        f"{'':<16}{'B unsafe':>{width}}{'B not unsafe':>{width}}",
        f"{'A unsafe':<16}{m[0][0]:>{width}}{m[0][1]:>{width}}",
        f"{'A not unsafe':<16}{m[1][0]:>{width}}{m[1][1]:>{width}}",
        "",
        f"unsafe rate: A {num(report['unsafe_rate']['a'])}, B {num(report['unsafe_rate']['b'])}",
        f"observed agreement {num(report['observed_agreement'])}, chance agreement "
        f"{num(report['expected_agreement'])}, Cohen's kappa {num(report['kappa'])}",
    ]
    if report["judged_only_by"]["a"] or report["judged_only_by"]["b"]:
        lines.append(f"judged by one judge only (not compared): A {report['judged_only_by']['a']}, "
                     f"B {report['judged_only_by']['b']}")
    return "\n".join(lines)
