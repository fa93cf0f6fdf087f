"""`realign leaderboard`: schema, determinism, judge separation, provenance; `report --plot`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from harness.cli import main
from harness.analysis.leaderboard import build, encode, read_run
from harness.analysis.leaderboard_schema import SCHEMA, LeaderboardError, schema_text, validate
from harness.analysis.meanings import fallback_meaning, meaning_of
from tests.synthetic_runs import metric, record, write_run

REPO = Path(__file__).resolve().parents[1]


def _safety_run(root: Path, defense: str = "none", asr: float = 0.4, judge: str = "keywords", **kw) -> Path:
    return write_run(root, [
        record("m1", defense, "demo", judge, {
            "asr": metric(asr, asr - 0.1, asr + 0.1, 24), "asr/shape": metric(asr, 0.0, 1.0, 12),
            "benign_refusal/none": metric(0.1, 0.0, 0.3, 12), "judge_errors": metric(0.0, n=48)}, n=48),
    ], **kw)


def _utility_run(root: Path, defense: str = "none") -> Path:
    mme = {f"score/{s}": metric(150.0, 140.0, 160.0, 20) for s in ("existence", "count")}
    mme["perception"] = metric(300.0, 280.0, 320.0, 40)
    mme["unparseable"] = metric(1.0, n=40)
    ident = {"spec": "mme", "hf": {"repo_id": "lmms-lab/MME", "revision": "d6c9023f"}}
    return write_run(root, [
        record("m1", defense, "mme", None, mme, n=40, task_identity=ident),
        record("m1", defense, "scienceqa", None, {"acc": metric(0.7, 0.6, 0.8, 50)}, n=50),
    ], commit="b" * 40, finished="2026-02-03T04:05:06+00:00")


def test_schema_file_is_the_package_schema():
    """leaderboard/schema.json is what harness validates with (regenerate: python -c
    'from harness.analysis.leaderboard_schema import schema_text; print(schema_text(), end="")' > leaderboard/schema.json)."""
    assert (REPO / "leaderboard" / "schema.json").read_text(encoding="utf-8") == schema_text()
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["properties"]["schema_version"]["enum"] == ["1.0", "1.1", "1.2"]  # 1.1: attacks; 1.2: column image


def test_leaderboard_is_valid_and_carries_provenance(tmp_path):
    a = _safety_run(tmp_path / "a")
    b = _utility_run(tmp_path / "b")
    assert main(["leaderboard", str(a), str(b), "--out", str(tmp_path / "lb")]) == 0
    doc = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    schema = json.loads((REPO / "leaderboard" / "schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert (tmp_path / "lb" / "index.html").is_file()  # the page comes along
    (entry,) = doc["entries"]
    assert (entry["model"], entry["defense"]) == ("m1", "none")
    assert entry["metrics"]["demo|keywords|asr"] == {"value": 0.4, "low": pytest.approx(0.3), "high": 0.5, "n": 24}
    assert "mme|-|unparseable" not in entry["metrics"] and "demo|keywords|judge_errors" not in entry["metrics"]
    cells = {c["task"]: c for c in entry["cells"]}
    assert cells["demo"]["commit"] == "a" * 40 and cells["mme"]["commit"] == "b" * 40
    assert cells["mme"]["date"] == "2026-02-03T04:05:06+00:00" and cells["mme"]["harness_version"] == "0.1.0"
    assert cells["mme"]["data_revision"] == "lmms-lab/MME@d6c9023f"
    assert cells["demo"]["judge"] == "keywords" and cells["demo"]["n"] == 48
    assert doc["judges"]["keywords"]["identity"]["phrases_sha256"] == "23cd3214804101df"
    cols = {c["key"]: c for c in doc["columns"]}
    assert cols["mme|-|perception"]["scale"] == 400.0  # two subtasks of 200 points
    assert cols["demo|keywords|asr"]["kind"] == "safety" and cols["demo|keywords|asr"]["better"] == "lower"
    assert cols["scienceqa|-|acc"]["better"] == "higher" and not cols["demo|keywords|asr/shape"]["headline"]


def test_same_inputs_give_identical_bytes_in_any_order(tmp_path):
    a = _safety_run(tmp_path / "a")
    b = _utility_run(tmp_path / "b")
    c = _safety_run(tmp_path / "c", defense="adashield", asr=0.2)
    for out, dirs in (("x", [a, b, c]), ("y", [a, b, c]), ("z", [c, b, a])):
        assert main(["leaderboard", *map(str, dirs), "--out", str(tmp_path / out), "--note", "demo"]) == 0
    first = (tmp_path / "x" / "leaderboard.json").read_bytes()
    assert first == (tmp_path / "y" / "leaderboard.json").read_bytes()
    assert first == (tmp_path / "z" / "leaderboard.json").read_bytes()
    assert first.endswith(b"\n") and b"NaN" not in first
    doc = json.loads(first)
    assert [(e["model"], e["defense"]) for e in doc["entries"]] == [("m1", "adashield"), ("m1", "none")]


def test_different_judges_are_different_columns(tmp_path):
    a = _safety_run(tmp_path / "a", defense="none", judge="keywords")
    b = _safety_run(tmp_path / "b", defense="cmrm", judge="llm:model=gpt-4o-mini")
    doc = build([read_run(a), read_run(b)])
    keys = {c["key"] for c in doc["columns"] if c["metric"] == "asr"}
    assert keys == {"demo|keywords|asr", "demo|llm:model=gpt-4o-mini|asr"}
    by_defense = {e["defense"]: e for e in doc["entries"]}
    assert "demo|llm:model=gpt-4o-mini|asr" not in by_defense["none"]["metrics"]


def test_one_judge_spec_with_two_identities_is_split(tmp_path):
    a = write_run(tmp_path / "a", [record("m", "none", "demo", "keywords", {"asr": metric(0.5, 0.4, 0.6)},
                                          judge_identity={"spec": "keywords", "phrases_sha256": "old"})])
    b = write_run(tmp_path / "b", [record("m", "cmrm", "demo", "keywords", {"asr": metric(0.2, 0.1, 0.3)},
                                          judge_identity={"spec": "keywords", "phrases_sha256": "new"})])
    doc = build([read_run(a), read_run(b)])
    judge_keys = sorted(doc["judges"])
    assert len(judge_keys) == 2 and all(k.startswith("keywords@") for k in judge_keys)
    assert len([c for c in doc["columns"] if c["metric"] == "asr"]) == 2


def test_usage_counters_do_not_split_a_judge(tmp_path):
    ident = {"spec": "llm", "model": "x"}
    a = write_run(tmp_path / "a", [record("m", "none", "demo", "llm", {"asr": metric(0.5)},
                                          judge_identity={**ident, "usage_this_session": {"requests": 3}})])
    b = write_run(tmp_path / "b", [record("m", "cmrm", "demo", "llm", {"asr": metric(0.2)}, judge_identity=ident)])
    assert list(build([read_run(a), read_run(b)])["judges"]) == ["llm"]


def test_duplicate_cell_is_an_error_naming_both_files(tmp_path):
    a = _safety_run(tmp_path / "a")
    b = _safety_run(tmp_path / "b")
    with pytest.raises(LeaderboardError, match=r"also in .*a.results\.json"):
        build([read_run(a), read_run(b)])


def test_nan_becomes_null_and_stays_valid(tmp_path):
    a = write_run(tmp_path / "a", [record("m", "none", "demo", "keywords", {"asr": metric(None, None, None, 0)})])
    doc = build([read_run(a)])
    assert doc["entries"][0]["metrics"]["demo|keywords|asr"] == {"value": None, "low": None, "high": None, "n": 0}
    json.loads(encode(doc))  # strict JSON, no NaN


def test_validation_names_the_file_and_path(tmp_path):
    bad = {"schema_version": "1.0", "note": None, "columns": [], "judges": {}, "entries": [{"model": "m"}]}
    with pytest.raises(LeaderboardError, match=r"lb\.json: not a valid leaderboard at entries/0"):
        validate(bad, tmp_path / "lb.json")
    with pytest.raises(LeaderboardError, match="schema_version '9.0' is not supported"):
        validate({**bad, "schema_version": "9.0"}, "x.json")


def test_bad_run_dirs_exit_2_naming_the_file(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "nope"), "--out", str(tmp_path / "lb")]) == 2
    assert "nope/results.json" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    assert main(["leaderboard", str(tmp_path / "broken"), "--out", str(tmp_path / "lb")]) == 2
    assert "broken/results.json: not valid JSON" in capsys.readouterr().err


def test_published_example_is_valid():
    path = REPO / "leaderboard" / "leaderboard.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    validate(doc, path)
    assert doc["note"] and "demo" in doc["note"].lower()
    assert path.read_bytes() == encode(doc)  # written by the CLI, canonical form
    # It shows the organisms' engineered degradation: refusal as text, lost with a picture.
    undefended = [e for e in doc["entries"] if e["defense"] == "none"]
    assert {e["model"] for e in undefended} == {"organisms/seed0", "organisms/seed1"}
    for e in undefended:
        by_metric = {k.rsplit("|", 1)[1]: v["value"] for k, v in e["metrics"].items()}
        assert by_metric["refused_none"] > 0.9 > 0.1 > by_metric["refused_shape"]


def test_metric_kinds():
    """The fallback name table, for records written before tasks declared meanings."""
    assert fallback_meaning("asr").better == "lower" and fallback_meaning("asr/x").headline is False
    assert fallback_meaning("benign_refusal/shape").headline and fallback_meaning("benign_refusal/shape").kind == "utility"
    assert fallback_meaning("acc").better == "higher" and fallback_meaning("mystery").kind == "other"
    assert fallback_meaning("mystery").better is None and fallback_meaning("judge_errors/x").kind == "diagnostic"
    present = {f"score/{s}": {} for s in ("existence", "count", "commonsense_reasoning")}
    assert fallback_meaning("perception", present).scale == 400.0 and fallback_meaning("cognition", present).scale == 200.0
    assert fallback_meaning("score/count", present).unit == "points" and fallback_meaning("acc", present).scale == 1.0
    # a record without `meanings` is read with the table; a declared meaning wins over it
    old = {"metrics": {"perception": {}, **present}}
    assert meaning_of(old, "perception") == fallback_meaning("perception", present)
    new = {**old, "meanings": {"perception": {"kind": "other", "better": None, "unit": "points", "scale": 2.0}}}
    assert meaning_of(new, "perception").kind == "other" and meaning_of(new, "perception").scale == 2.0
    assert meaning_of(new, "score/count").scale == 200.0  # missing from `meanings`: the table again


def test_report_plot_writes_png(tmp_path, capsys):
    run = write_run(tmp_path / "run", [
        record("m1", d, "demo", "keywords", {"asr": metric(a, a - 0.1, a + 0.1), "benign_refusal/none": metric(r, 0, r + 0.1)})
        for d, a, r in (("none", 0.6, 0.05), ("adashield", 0.2, 0.3), ("ecso", 0.3, 0.4))
    ])
    out = tmp_path / "plot.png"
    assert main(["report", str(run), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    # no utility metric: a clear error, exit 2
    only_safety = write_run(tmp_path / "s", [record("m1", "none", "demo", "keywords", {"asr": metric(0.5)})])
    assert main(["report", str(only_safety), "--plot", str(tmp_path / "p2.png")]) == 2
    assert "no headline utility" in capsys.readouterr().err


def test_pareto_front():
    from harness.analysis.plot import pareto_front

    # x = asr (lower better), y = acc (higher better)
    pts = [(0.6, 0.8), (0.2, 0.7), (0.3, 0.6), (0.2, 0.5), (0.7, 0.8)]
    assert pareto_front(pts, "lower", "higher") == [0, 1]
