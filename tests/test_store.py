"""Run-directory storage: append-only JSONL, torn lines, atomic JSON, config checks."""

from __future__ import annotations

import json
import logging

import pytest

from harness.errors import RunDirError
from harness.store import RunDir, append_jsonl, read_jsonl, slug


def test_append_and_read(tmp_path):
    path = tmp_path / "a.jsonl"
    append_jsonl(path, [{"sample_id": "1"}, {"sample_id": "2"}])
    append_jsonl(path, [{"sample_id": "3"}])
    assert [r["sample_id"] for r in read_jsonl(path)] == ["1", "2", "3"]


def test_torn_last_line_dropped_with_warning_and_repaired_on_append(tmp_path, caplog):
    path = tmp_path / "g.jsonl"
    append_jsonl(path, [{"sample_id": "1"}])
    with open(path, "a") as fh:
        fh.write('{"sample_id": "2", "out')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING):
        assert [r["sample_id"] for r in read_jsonl(path)] == ["1"]
    assert "torn" in caplog.text
    append_jsonl(path, [{"sample_id": "2"}])
    assert [r["sample_id"] for r in read_jsonl(path)] == ["1", "2"]
    assert path.read_text().count("\n") == 2


def test_corrupt_middle_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(RunDirError, match="line 2"):
        read_jsonl(path)


def test_run_dir_refuses_other_config(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.check_compatible({"models": ["a"]}) is None
    rd.write_run_info({"generation_identity": {"models": ["a"], "seed": 0}})
    rd.check_compatible({"models": ["a"], "seed": 0})
    # A run that generated nothing (it failed at setup) does not block a corrected configuration...
    assert rd.check_compatible({"models": ["a"], "seed": 1}) is None
    # ...but once a generation is on disk, another configuration is refused.
    rd.cell("a", "none", "demo").append_generations([{"sample_id": "s1", "output": "x"}])
    with pytest.raises(RunDirError, match="differs in: seed"):
        rd.check_compatible({"models": ["a"], "seed": 1})
    assert json.loads((tmp_path / "run" / "run.json").read_text())["generation_identity"]["seed"] == 0


def test_non_empty_foreign_dir_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        RunDir(tmp_path).check_compatible({})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_slug_is_safe_and_distinct():
    a, b = slug("figstep:subset=tiny,data_dir=/x/y"), slug("figstep:subset=full,data_dir=/x/y")
    assert "/" not in a and ":" not in a and a != b
    assert slug("none") == "none"
    assert len(slug("x" * 300)) <= 80
