"""The existing safety releases as plain-request seed sets: SafeBench against the real FigStep release
in the shared data (skipped, with where it looked, only when that copy is absent) and MM-SafetyBench's
questions on synthetic files in the release's and the hub mirror's layouts."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from harness.errors import DataError
from harness.registry import tasks
from harness.schema import Sample, Verdict
from tasks.figstep import RELEASE_COMMIT

try:
    from datadirs import figstep_dir
    from fixtures_benchmarks import MMSB_TINY, mmsb_record, write_mmsb_hub, write_mmsb_release
except ImportError:  # tests/ collected as a package
    from tests.datadirs import figstep_dir
    from tests.fixtures_benchmarks import MMSB_TINY, mmsb_record, write_mmsb_hub, write_mmsb_release


def samples(spec: str) -> list[Sample]:
    return list(tasks.build(spec).samples())


# -- SafeBench (the real release) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def figstep() -> Path:
    return figstep_dir()


def test_safebench_tiny_is_the_figstep_tasks_fifty_requests(figstep):
    items = samples(f"safebench:path={figstep}")
    assert len(items) == 50 and Counter(s.category for s in items) == Counter({c: 5 for c in set(s.category for s in items)})
    released = {s.meta["task_id"] + 100 * s.meta["category_id"]: s for s in samples(f"figstep:data_dir={figstep},images=render")}
    for s in items:
        assert s.image is None and s.text == s.query == s.meta["query"]
        twin = released[s.meta["task_id"] + 100 * s.meta["category_id"]]
        assert s.id == twin.id.replace("figstep/", "safebench/")
        # the question is the plain request; the instruction is what FigStep typesets
        assert (s.text, s.meta["instruction"], s.category) == (twin.meta["question"], twin.meta["instruction"], twin.category)
    first = items[0]
    assert first.id == "safebench/1_1" and first.meta["instruction"].endswith(".")


def test_safebench_full_and_categories(figstep):
    full = samples(f"safebench:path={figstep},subset=full")
    assert len(full) == 500 and len({s.category for s in full}) == 10
    two = samples(f"safebench:path={figstep},subset=full,categories=1+hate_speech")
    assert len(two) == 100 and {s.category for s in two} == {"Illegal Activity", "Hate Speech"}


def test_safebench_csv_file_and_identity(figstep, tmp_path):
    csv_file = figstep / "safebench.csv"
    task = tasks.build(f"safebench:path={csv_file}")
    assert len(list(task.samples())) == 500  # a file is read as it is
    ident = task.identity()
    assert ident["csv_matches_release"] is True and ident["licence"] == "MIT" and ident["licence_verified"] is True
    tiny = tasks.build(f"safebench:path={figstep}").identity()
    assert tiny["file"] == str((figstep / "SafeBench-Tiny.csv").resolve()) and tiny["csv_matches_release"] is True
    copy = tmp_path / "data" / "question"
    copy.mkdir(parents=True)
    shutil.copy(figstep / "SafeBench-Tiny.csv", copy)
    assert samples(f"safebench:path={tmp_path}") == samples(f"safebench:path={figstep}")  # the release repository's layout


def test_safebench_without_data_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"safebench reads the FigStep release's SafeBench questions: pass path="):
        tasks.build("safebench")
    with pytest.raises(DataError, match=r"FigStep question file not found: .*SafeBench-Tiny.csv"):
        samples(f"safebench:path={tmp_path}")
    assert RELEASE_COMMIT in tasks.build(f"safebench:source=release,cache_dir={tmp_path}").params.release_url


def test_safebench_empty_question_names_the_line(tmp_path):
    path = tmp_path / "SafeBench-Tiny.csv"
    path.write_text("dataset,category_id,task_id,category_name,question,instruction\n"
                    "ForbidQI,1,1,Made up,How would one do a made-up deed?,Steps to do a made-up deed.\n"
                    "ForbidQI,1,2,Made up,,Steps to do another made-up deed.\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: empty question"):
        samples(f"safebench:path={path}")


# -- MM-SafetyBench questions ----------------------------------------------------------------------

SCENARIOS = "scenarios=1+8+10"


@pytest.fixture(scope="module")
def mmsb_release(tmp_path_factory) -> Path:
    return write_mmsb_release(tmp_path_factory.mktemp("mmsb-release"))


def test_mmsb_questions_from_the_release_once_each_without_pictures(mmsb_release):
    task = tasks.build(f"mmsb_questions:source=dir,path={mmsb_release},{SCENARIOS}")
    items = list(task.samples())
    assert len(items) == 9 and len({s.id for s in items}) == 9  # 3 scenarios x 3 questions, one sample each
    lobbying = next(s for s in items if s.id == "mmsb_questions/08-Political_Lobbying/1")
    record = mmsb_record("08-Political_Lobbying", 1)
    assert lobbying.image is None and lobbying.text == lobbying.query == record["Question"]
    assert lobbying.category == "08-Political_Lobbying" and lobbying.meta["judge_group"] == "lobbying"
    assert lobbying.meta["text_field"] == "Question"
    assert (lobbying.meta["key_phrase"], lobbying.meta["phrase_type"], lobbying.meta["rephrased_question"],
            lobbying.meta["rephrased_question_sd"]) == (record["Key Phrase"], record["Phrase Type"],
                                                       record["Rephrased Question"], record["Rephrased Question(SD)"])
    ident = task.identity()
    assert ident["task"] == "mmsb_questions" and ident["scenarios"] == ["01-Illegal_Activitiy", "08-Political_Lobbying",
                                                                          "10-Legal_Opinion"]
    assert ident["licence_verified"] is False and "CC-BY-NC-4.0" in ident["licence"]


def test_mmsb_questions_tiny_subset_and_metrics_by_scenario(mmsb_release):
    task = tasks.build(f"mmsb_questions:source=dir,path={mmsb_release},{SCENARIOS},subset=tiny")
    items = list(task.samples())
    assert sorted(s.id for s in items) == sorted(f"mmsb_questions/{k}/{q}" for k, v in MMSB_TINY.items() for q in v)
    verdicts = {s.id: Verdict(s.id, "unsafe" if s.category == "01-Illegal_Activitiy" else "refusal", "k") for s in items}
    metrics = task.metrics(items, {}, verdicts)
    assert metrics["asr"].value == 0.5 and metrics["asr/01-Illegal_Activitiy"].value == 1.0
    assert metrics["refused/10-Legal_Opinion"].value == 1.0 and metrics["judge_errors"].value == 0


def test_mmsb_questions_from_the_hub_copy_carry_the_changed_question(tmp_path):
    hub = write_mmsb_hub(tmp_path / "hub")
    items = samples(f"mmsb_questions:path={hub},scenarios=10")
    record = mmsb_record("10-Legal_Opinion", 2)
    last = items[-1]
    assert [s.id for s in items] == [f"mmsb_questions/10-Legal_Opinion/{i}" for i in range(3)]
    assert last.text == last.query == record["Changed Question"] and last.meta["text_field"] == "Changed Question"
    assert "key_phrase" not in last.meta  # the mirror keeps only the text


def test_mmsb_questions_errors_are_the_release_tasks(tmp_path):
    with pytest.raises(DataError, match=r"mmsb_questions: source=dir needs path=<the release folder holding data/>"):
        tasks.build("mmsb_questions:source=dir")
    with pytest.raises(DataError, match=r"no data/processed_questions/ under"):
        samples(f"mmsb_questions:source=dir,path={tmp_path}")
