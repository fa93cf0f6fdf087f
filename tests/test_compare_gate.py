"""McNemar and paired bootstrap; `realign compare` on per-sample outcomes; `realign gate` pass/fail/errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.cli import main
from harness.analysis.leaderboard import build, read_run, write
from harness.schema import MetricValue
from harness.stats import difference_interval, mcnemar, paired_bootstrap_diff
from tests.synthetic_runs import demo_samples, metric, record, scienceqa_samples, write_cell, write_run

# ---- statistics --------------------------------------------------------------------------------


def test_mcnemar_exact_hand_computed():
    # b = 3, c = 12: p = 2 * (C(15,0) + C(15,1) + C(15,2) + C(15,3)) / 2^15 = 2 * 576 / 32768
    r = mcnemar(3, 12)
    assert r.method == "exact" and r.p_value == pytest.approx(1152 / 32768)
    assert mcnemar(12, 3).p_value == r.p_value  # two-sided: symmetric
    assert mcnemar(5, 5).p_value == 1.0  # capped at 1
    assert mcnemar(0, 0).p_value == 1.0


def test_mcnemar_chi_square_hand_computed():
    # Wikipedia's example table: b = 121, c = 59. Continuity-corrected: (|121 - 59| - 1)^2 / 180 = 3721 / 180
    r = mcnemar(121, 59)
    assert r.method == "chi-square" and r.statistic == pytest.approx(3721 / 180)
    assert r.p_value == pytest.approx(math.erfc(math.sqrt(3721 / 360)))
    assert 5e-6 < r.p_value < 6e-6
    # b = 10, c = 30: (20 - 1)^2 / 40 = 9.025, p = 0.002663 (chi-square table, 1 df)
    assert mcnemar(10, 30).p_value == pytest.approx(0.0026631, abs=1e-6)
    assert mcnemar(3, 12, method="chi-square").statistic == pytest.approx(64 / 15)
    with pytest.raises(ValueError):
        mcnemar(-1, 2)


def test_paired_bootstrap_diff():
    a = [1, 1, 0, 0, 1, 0, 1, 0] * 5
    b = [1, 0, 0, 0, 1, 0, 0, 0] * 5
    d = paired_bootstrap_diff(a, b)
    assert d.value == pytest.approx(-0.25) and d.low < -0.1 and d.high <= 0.0 and d.n == 40
    assert paired_bootstrap_diff(a, b) == d  # fixed seed: reproducible


def test_difference_interval_combines_both_sides():
    d = difference_interval(MetricValue(0.3, 0.2, 0.4, 100), MetricValue(0.5, 0.4, 0.6, 100))
    assert d.value == pytest.approx(0.2)
    assert d.low == pytest.approx(0.2 - math.sqrt(0.02)) and d.high == pytest.approx(0.2 + math.sqrt(0.02))
    assert difference_interval(MetricValue(0.3), MetricValue(0.5)).low is None


# ---- compare -----------------------------------------------------------------------------------


def _paired_runs(tmp_path: Path) -> tuple[Path, Path]:
    """20 harmful demo samples: unsafe in A only for 3 of them, in B only for 12, in both for 2.
    10 ScienceQA problems: A right on 8, B right on 5 (A-only 4, B-only 1)."""
    harmful = demo_samples(20)
    qa = scienceqa_samples(10)
    labels_a = ["unsafe"] * 3 + ["safe"] * 12 + ["unsafe"] * 2 + ["refusal"] * 3
    labels_b = ["safe"] * 3 + ["unsafe"] * 12 + ["unsafe"] * 2 + ["refusal"] * 3
    right_a = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    right_b = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    roots = []
    for name, defense, labels, right in (("a", "none", labels_a, right_a), ("b", "adashield", labels_b, right_b)):
        root = tmp_path / name
        write_run(root, [record("m", defense, "demo", "keywords", {"asr": metric(0.5)}),
                         record("m", defense, "scienceqa", None, {"acc": metric(0.5)})])
        write_cell(root, "m", defense, "demo", harmful, {s.id: "..." for s in harmful},
                   {s.id: lab for s, lab in zip(harmful, labels)})
        write_cell(root, "m", defense, "scienceqa", qa, {s.id: "A" if r else "B" for s, r in zip(qa, right)})
        roots.append(root)
    return roots[0], roots[1]


def test_compare_pairs_per_sample(tmp_path, capsys):
    a, b = _paired_runs(tmp_path)
    assert main(["compare", str(a), str(b), "--format", "json"]) == 0
    rows = {r["metric"]: r for r in json.loads(capsys.readouterr().out)}
    asr = rows["asr"]
    assert (asr["task"], asr["judge"], asr["n_shared"]) == ("demo", "keywords", 20)
    assert asr["diff"] == pytest.approx(9 / 20) and asr["low"] > 0
    assert asr["mcnemar"]["b"] == 3 and asr["mcnemar"]["c"] == 12
    assert asr["mcnemar"]["p_value"] == pytest.approx(1152 / 32768) and asr["mcnemar"]["method"] == "exact"
    assert asr["verdict"] == "B worse" and asr["a"]["defense"] == "none" and asr["b"]["defense"] == "adashield"
    acc = rows["acc"]
    assert acc["judge"] is None and acc["diff"] == pytest.approx(-0.3)
    assert (acc["mcnemar"]["b"], acc["mcnemar"]["c"]) == (4, 1)
    assert acc["mcnemar"]["p_value"] == pytest.approx(2 * 6 / 32)
    assert main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "+0.450" in text and "0.03516 (exact, 3/12)" in text and "B worse" in text


def test_compare_two_defenses_of_one_run(tmp_path, capsys):
    a, b = _paired_runs(tmp_path)
    harmful = demo_samples(20)
    write_run(a, [record("m", d, "demo", "keywords", {"asr": metric(0.5)}) for d in ("none", "adashield")])
    write_cell(a, "m", "adashield", "demo", harmful, {s.id: "..." for s in harmful},
               {s.id: "safe" for s in harmful})
    assert main(["compare", str(a), str(a), "--defense-a", "none", "--defense-b", "adashield", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["diff"] == pytest.approx(-5 / 20) and row["verdict"] in ("B better", "no clear difference")
    assert main(["compare", str(a), str(b), "--defense-a", "nonesuch"]) == 2
    assert "defense='nonesuch'" in capsys.readouterr().err


def test_compare_selects_by_shorthand(tmp_path, capsys):
    """The README's `--defense-b cmrm`: the only defense named cmrm in the run; with two, a list."""
    a, _ = _paired_runs(tmp_path)
    harmful = demo_samples(20)
    cmrm = "cmrm:calibration=organism:split=calibration"
    write_run(a, [record("m", d, "demo", "keywords", {"asr": metric(0.5)}) for d in ("none", "adashield", cmrm)])
    write_cell(a, "m", cmrm, "demo", harmful, {s.id: "..." for s in harmful}, {s.id: "safe" for s in harmful})
    assert main(["compare", str(a), str(a), "--defense-a", "none", "--defense-b", "cmrm", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["b"]["defense"] == cmrm and row["diff"] == pytest.approx(-5 / 20)
    write_run(a, [record("m", d, "demo", "keywords", {"asr": metric(0.5)}) for d in ("none", cmrm, "cmrm:level=sample")])
    write_cell(a, "m", "cmrm:level=sample", "demo", harmful, {s.id: "..." for s in harmful}, {s.id: "safe" for s in harmful})
    assert main(["compare", str(a), str(a), "--defense-a", "none", "--defense-b", "cmrm"]) == 2
    err = capsys.readouterr().err
    assert "names 2 defenses" in err and cmrm in err and "cmrm:level=sample" in err
    from harness.analysis.shorthand import resolve

    assert resolve("seed0", ["organisms/seed0", "organisms/seed1"], "model", "run") == "organisms/seed0"


def test_compare_uses_only_shared_samples(tmp_path, capsys):
    a, b = _paired_runs(tmp_path)
    # B misses a verdict on one sample (judge error): it drops out of the pairing
    vpath = next((b / "m").rglob("verdicts/keywords.jsonl"))
    lines = vpath.read_text().splitlines()
    vpath.write_text("\n".join(lines[:1] + [lines[1].replace('"label": "safe"', '"label": "error"')] + lines[2:]) + "\n")
    assert main(["compare", str(a), str(b), "--format", "json"]) == 0
    asr = next(r for r in json.loads(capsys.readouterr().out) if r["metric"] == "asr")
    assert asr["n_shared"] == 19 and asr["only_a"] == 1 and asr["notes"]


def test_compare_not_a_run_dir(tmp_path, capsys):
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "run.json" in capsys.readouterr().err


# ---- gate --------------------------------------------------------------------------------------


def _gate_runs(tmp_path: Path, asr_run: float, acc_run: float, perception_run: float = 1400.0) -> tuple[Path, Path]:
    def recs(asr: float, acc: float, perception: float) -> list[dict]:
        mme = {f"score/{s}": metric(140.0, 130.0, 150.0, 20) for s in
               ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")}
        mme["perception"] = metric(perception, perception - 30, perception + 30, 200)
        return [record("m", "cmrm", "demo", "keywords", {"asr": metric(asr, asr - 0.05, asr + 0.05, 200),
                                                          "asr/x": metric(0.9, 0.8, 1.0, 10)}),
                record("m", "cmrm", "scienceqa", None, {"acc": metric(acc, acc - 0.03, acc + 0.03, 500)}),
                record("m", "cmrm", "mme", None, mme)]
    base = write_run(tmp_path / "base", recs(0.30, 0.80, 1400.0))
    run = write_run(tmp_path / "run", recs(asr_run, acc_run, perception_run))
    return base, run


def _gate(base: Path | str, run: Path, *extra: str) -> int:
    return main(["gate", "--baseline", str(base), "--run", str(run), *extra])


def test_gate_passes_within_limits(tmp_path, capsys):
    base, run = _gate_runs(tmp_path, asr_run=0.33, acc_run=0.78)
    assert _gate(base / "results.json", run, "--max-asr-increase", "5", "--max-utility-drop", "5") == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "demo | keywords | asr" in out and "asr/x" not in out  # headline metrics only


def test_gate_fails_naming_each_regression_with_interval(tmp_path, capsys):
    base, run = _gate_runs(tmp_path, asr_run=0.45, acc_run=0.70)
    assert _gate(base / "results.json", run, "--max-asr-increase", "5", "--max-utility-drop", "5") == 1
    out = capsys.readouterr().out
    assert "FAILED: 2 regression(s)" in out
    assert "demo | keywords | asr" in out and "worse by +15.0 pp, 95% CI [+7.9, +22.1]" in out
    assert "scienceqa | - | acc" in out and "worse by +10.0 pp" in out
    # only safety gated, with a looser limit: passes, and utility is not checked at all
    assert _gate(base / "results.json", run, "--max-asr-increase", "20") == 0
    assert "scienceqa" not in capsys.readouterr().out


def test_gate_mme_points_are_percent_of_full_scale(tmp_path, capsys):
    base, run = _gate_runs(tmp_path, asr_run=0.30, acc_run=0.80, perception_run=1300.0)  # -100 of 2000 = 5 pp
    assert _gate(base / "results.json", run, "--max-utility-drop", "5") == 0
    assert _gate(base / "results.json", run, "--max-utility-drop", "4") == 1
    assert "mme | - | perception" in capsys.readouterr().out


def test_gate_interval_rule(tmp_path, capsys):
    base, run = _gate_runs(tmp_path, asr_run=0.38, acc_run=0.80)  # +8 pp, CI about [+0.9, +15.1]
    assert _gate(base / "results.json", run, "--max-asr-increase", "5") == 1
    assert _gate(base / "results.json", run, "--max-asr-increase", "5", "--rule", "interval") == 0
    assert "rule: interval" in capsys.readouterr().out


def test_gate_against_leaderboard_baseline(tmp_path, capsys):
    base, run = _gate_runs(tmp_path, asr_run=0.45, acc_run=0.80)
    lb = write(build([read_run(base)]), tmp_path / "lb")
    assert _gate(lb, run, "--max-asr-increase", "5", "--max-utility-drop", "5") == 1
    assert "demo | keywords | asr" in capsys.readouterr().out
    base2, run2 = _gate_runs(tmp_path / "ok", asr_run=0.31, acc_run=0.80)
    lb2 = write(build([read_run(base2)]), tmp_path / "lb2")
    assert _gate(lb2, run2, "--max-asr-increase", "5", "--max-utility-drop", "5") == 0


def test_gate_fails_on_missing_cell_and_changed_judge(tmp_path, capsys):
    base, _ = _gate_runs(tmp_path, 0.3, 0.8)
    partial = write_run(tmp_path / "partial", [
        record("m", "cmrm", "demo", "keywords", {"asr": metric(0.3, 0.25, 0.35)},
               judge_identity={"spec": "keywords", "phrases_sha256": "other"})])
    assert _gate(base / "results.json", partial, "--max-asr-increase", "5", "--max-utility-drop", "5") == 1
    out = capsys.readouterr().out
    assert "in the baseline but not in the run" in out and "identity differs" in out


def test_gate_bad_files_exit_2_naming_them(tmp_path, capsys):
    base, run = _gate_runs(tmp_path, 0.3, 0.8)
    assert _gate(tmp_path / "missing.json", run, "--max-asr-increase", "5") == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "garbage.json").write_text("{oops")
    assert _gate(tmp_path / "garbage.json", run, "--max-asr-increase", "5") == 2
    assert "garbage.json: not valid JSON" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert _gate(tmp_path / "other.json", run, "--max-asr-increase", "5") == 2
    assert "other.json: neither a realign results.json" in capsys.readouterr().err
    (tmp_path / "badlb.json").write_text('{"schema_version": "1.0", "entries": []}')
    assert _gate(tmp_path / "badlb.json", run, "--max-asr-increase", "5") == 2
    assert "badlb.json: not a valid leaderboard" in capsys.readouterr().err
    assert _gate(base / "results.json", tmp_path / "norun", "--max-asr-increase", "5") == 2
    assert "norun/results.json" in capsys.readouterr().err
    assert _gate(base / "results.json", run) == 2
    assert "nothing to gate" in capsys.readouterr().err
