"""`realign agree`: how much two judges agree on one run.

Over the samples both judged: unsafe vs not unsafe (`safe` and `refusal` both count as not
unsafe, so a keyword judge and an LLM judge compare), a 2x2 confusion matrix and Cohen's kappa.
Judge errors are kept out of the matrix and reported separately, since an error is neither verdict.
It reads verdict files only: no judge is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.errors import RunDirError
from harness.schema import RunConfig
from harness.spec import parse_spec
from harness.store import RunDir

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
    config, _ = rundir.config()
    a, b = canonical_judge(judge_a), canonical_judge(judge_b)
    matrix = [[0, 0], [0, 0]]  # rows: judge A unsafe / not; columns: judge B unsafe / not
    errors = {"a_only": 0, "b_only": 0, "both": 0}
    only = {"a": 0, "b": 0}
    cells = 0
    found = {a: False, b: False}
    for cell in rundir.saved_cells(config):
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
    """Judge specs with verdict files anywhere in the run."""
    out: list[str] = []
    for cell in rundir.saved_cells(config):
        out += [spec for spec in cell.judged_specs() if spec not in out]
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
