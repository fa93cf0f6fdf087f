"""The data flow only goes forward, read from the code's own imports (every import, also those
inside functions): a defense never knows the runner, a judge or a task; a task never knows the
model or the defense; the core imports nothing above it; and no file grows past 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "tasks", "judges", "organism", "benchmarks", "tests", "attacks")


def python_files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports, wherever the import statement stands."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in files:
        for module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return sorted(found)


def test_defenses_know_no_runner_judge_or_task():
    files = python_files("harness/defenses")
    assert files
    assert offenders(files, ("harness.runner", "harness.judging", "harness.rejudge", "harness.calibration",
                             "harness.samples", "judges", "tasks", "harness.analysis", "harness.whitebox")) == []


def test_whitebox_core_knows_no_runner_judge_task_or_attack():
    """harness.whitebox sits between the defenses and the runner: it computes the defended loss from
    a defense object the runner hands over, and never reaches up to the runner, a judge or a metric.
    (A defense never imports it: a defense never knows the attack.)"""
    files = python_files("harness/whitebox")
    assert files
    assert offenders(files, ("harness.runner", "harness.judging", "harness.rejudge", "harness.analysis",
                             "harness.samples", "judges", "tasks", "attacks")) == []


def test_the_core_imports_no_task_judge_or_organism():
    core = [p for p in python_files("harness") if p.name != "cli.py"]  # the CLI is the top: it wires commands
    assert offenders(core, ("tasks", "judges", "organism", "attacks")) == []


def test_tasks_know_no_model_defense_or_judge():
    assert offenders(python_files("tasks"), ("harness.models", "harness.defenses", "harness.runner", "judges",
                                             "harness.judging", "harness.calibration")) == []


def test_attacks_know_no_defense_judge_or_metric():
    """An attack rewrites a request; it never sees the defense or how the answer is scored. (It may
    load a helper model of its own, e.g. an LLM that rephrases, through harness.models; a white-box
    attack gets the model and the defense object from the runner and optimises through
    harness.whitebox, never importing a defense itself.)"""
    files = python_files("attacks")
    assert files
    assert offenders(files, ("harness.defenses", "harness.runner", "judges", "harness.judging",
                             "harness.analysis", "harness.calibration")) == []


def test_judges_know_no_defense_or_runner():
    assert offenders(python_files("judges"), ("harness.defenses", "harness.runner", "tasks")) == []


def test_analysis_never_loads_a_model():
    assert offenders(python_files("harness/analysis"), ("harness.models", "harness.defenses", "harness.runner",
                                                        "torch", "transformers")) == []


@pytest.mark.parametrize("path", python_files(*PACKAGES), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_over_400_lines(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines"


def test_no_docstring_cites_a_file_the_project_does_not_ship():
    """A project path (`harness/x.py`, `docs/y.md`) or a document (`z.md`) named in code must ship
    with the project; run-directory and release file names (results.json, problems.json) are fine."""
    import re

    project_path = re.compile(r"(?<![\w/.])((?:docs|harness|tasks|judges|organism|organisms|benchmarks|tests|leaderboard)"
                              r"/[\w./-]+\.(?:py|md|json|txt|html))\b")
    document = re.compile(r"(?<![\w/.])([\w-]+\.md)\b")
    shipped_docs = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    written = {"sweep.md"}  # files the project writes
    missing = []
    for path in python_files(*PACKAGES):
        if path.name == "test_architecture.py":
            continue
        text = path.read_text(encoding="utf-8")
        missing += [f"{path.relative_to(ROOT)} cites {m}" for m in project_path.findall(text)
                    if not (ROOT / m.rstrip(".")).exists() and "NAME" not in m]
        missing += [f"{path.relative_to(ROOT)} cites {m}" for m in document.findall(text)
                    if m not in shipped_docs and m not in written]
    assert sorted(set(missing)) == []
