"""The attack x defense matrix from result records (tables, JSON, heatmap), and the analysis keyed by
attack: the leaderboard (schema 1.1 entries), the gate against a leaderboard baseline, compare's
pairing of two attacks. Hand-written run directories (tests/synthetic_runs.py): no model."""

from __future__ import annotations

import json

import pytest

from harness.analysis.leaderboard import build, read_run
from harness.analysis.matrix import build_matrix, markdown, matrix_json
from harness.analysis.matrix_plot import plot_matrix, wrap
from harness.cli import main
from tests.synthetic_runs import demo_samples, metric, record, write_cell, write_run

ATTACKS = ("none", "figstep", "qr:images=SD+TYPO,rewriter=rule")
DEFENSES = ("none", "adashield:placement=append", "ecso")
ASR = {("none", "none"): 0.5, ("none", "adashield:placement=append"): 0.2, ("none", "ecso"): 0.3,
       ("figstep", "none"): 0.9, ("figstep", "adashield:placement=append"): 0.4, ("figstep", "ecso"): 0.6,
       ("qr:images=SD+TYPO,rewriter=rule", "none"): 0.7, ("qr:images=SD+TYPO,rewriter=rule", "ecso"): 0.5}


def _records() -> list[dict]:
    recs = []
    for attack in ATTACKS:
        for defense in DEFENSES:
            if (attack, defense) in ASR:
                a = ASR[(attack, defense)]
                recs.append(record("m1", defense, "jbb", "keywords", {
                    "asr": metric(a, a - 0.1, a + 0.1, 50), "asr/fraud": metric(a, 0.0, 1.0, 10),
                    "judge_errors": metric(0.0, n=50)}, n=50, attack=attack))
    recs.append(record("m1", "none", "mme", None, {"acc": metric(0.8, 0.7, 0.9, 40)}, n=40))
    return recs


def test_matrix_tables_follow_the_records():
    tables, skipped = build_matrix(_records())
    (t,) = tables
    assert (t.model, t.task, t.judge, t.metric, t.meaning.better) == ("m1", "jbb", "keywords", "asr", "lower")
    assert t.attacks == list(ATTACKS) and t.defenses == list(DEFENSES)
    for (attack, defense), value in ASR.items():
        assert t.cell(attack, defense) == {"value": value, "low": pytest.approx(value - 0.1),
                                           "high": pytest.approx(value + 0.1), "n": 50}
    assert t.cell("qr:images=SD+TYPO,rewriter=rule", "adashield:placement=append") is None  # not run
    assert skipped == ["m1 | mme | -"]  # a utility task has no matrix
    text = markdown(tables, skipped)
    assert "| attack \\ defense | none | adashield:placement=append | ecso |" in text
    assert "| figstep | 0.900 [0.80, 1.00] | 0.400 [0.30, 0.50] | 0.600 [0.50, 0.70] |" in text
    assert "| qr:images=SD+TYPO,rewriter=rule | 0.700 [0.60, 0.80] | - | 0.500 [0.40, 0.60] |" in text
    doc = json.loads(json.dumps(matrix_json(tables, skipped)))
    assert doc["tables"][0]["cells"]["figstep"]["ecso"]["value"] == 0.6 and doc["skipped"] == skipped


def test_refusal_headline_and_old_records():
    """A task whose headline is a refusal rate (higher is better) gets that; records without an
    attack field (written before attacks) are the `none` row."""
    recs = [record("m", d, "organism", "keywords", {"refused_shape": metric(v, v - 0.1, v + 0.1)})
            for d, v in (("none", 0.1), ("cmrm", 0.8))]
    (t,), _ = build_matrix(recs)
    assert t.metric == "refused_shape" and t.meaning.better == "higher" and t.attacks == ["none"]
    assert t.cell("none", "cmrm")["value"] == 0.8


def test_cli_matrix_json_and_heatmap(tmp_path, capsys):
    run = write_run(tmp_path / "run", _records())
    assert main(["report", str(run), "--matrix", "--plot", str(tmp_path / "heat.png")]) == 0
    out = capsys.readouterr()
    assert "m1 | jbb | judge keywords: asr (lower is better)" in out.out and "matrix.json" in out.err
    doc = json.loads((run / "matrix.json").read_text())  # the default place: beside results.json
    assert doc["tables"][0]["attacks"] == list(ATTACKS)
    png = (tmp_path / "heat.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert main(["report", str(run), "--matrix", "--format", "json", "--json", str(tmp_path / "x.json")]) == 0
    assert json.loads(capsys.readouterr().out) == doc == json.loads((tmp_path / "x.json").read_text())
    assert main(["report", str(run), "--json", str(tmp_path / "y.json")]) == 2
    assert "--matrix" in capsys.readouterr().err
    only_utility = write_run(tmp_path / "u", [record("m1", "none", "mme", None, {"acc": metric(0.8)})])
    assert main(["report", str(only_utility), "--matrix", "--plot", str(tmp_path / "none.png")]) == 2
    assert "no attack x defense matrix" in capsys.readouterr().err


def test_labels_wrap_at_spec_separators():
    assert wrap("adashield:placement=append,mode=static") == "adashield:\nplacement=append,\nmode=static"
    assert wrap("x" * 40) == "x" * 16 + "\n" + "x" * 16 + "\n" + "x" * 8
    assert wrap("none") == "none" and wrap("qr:images=SD+TYPO,rewriter=rule") == "qr:images=SD+\nTYPO,\nrewriter=rule"


def test_heatmap_of_many_cells_stays_legible(tmp_path):
    recs = [record("a-rather-long/model-name-for-testing", f"defense-{d}:alpha=0.{d},layers=8-15", "jbb", "keywords",
                   {"asr": metric(0.1 * d, None, None)}, attack=f"attack-{a}:mode=base64") for a in range(5) for d in range(6)]
    tables, _ = build_matrix(recs)
    path = plot_matrix(tables, tmp_path / "big.png")
    from PIL import Image

    width, height = Image.open(path).size
    assert width >= 1300 and height >= 500  # grows with the grid instead of squeezing labels


def test_leaderboard_entries_and_gate_keyed_by_attack(tmp_path, capsys):
    run = write_run(tmp_path / "run", _records())
    doc = build([read_run(run)])
    assert doc["schema_version"] == "1.1"
    keys = [(e["model"], e["attack"], e["defense"]) for e in doc["entries"]]
    assert len(keys) == len(set(keys)) == 8  # the 8 jbb cells; mme's record joins the (none, none) entry
    figstep_none = next(e for e in doc["entries"] if e["attack"] == "figstep" and e["defense"] == "none")
    assert figstep_none["metrics"]["jbb|keywords|asr"]["value"] == 0.9
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb")]) == 0
    baseline = tmp_path / "lb" / "leaderboard.json"
    gate = ["--max-asr-increase", "5"]
    assert main(["gate", "--baseline", str(baseline), "--run", str(run), *gate]) == 0
    worse = [dict(r) for r in _records()]
    for r in worse:  # only the figstep / ecso cell gets worse: the gate names that cell, attack included
        if r.get("attack") == "figstep" and r["defense"] == "ecso":
            r["metrics"] = {**r["metrics"], "asr": metric(0.9, 0.8, 1.0, 50)}
    bad = write_run(tmp_path / "bad", worse)
    capsys.readouterr()
    assert main(["gate", "--baseline", str(baseline), "--run", str(bad), *gate]) == 1
    failed = capsys.readouterr().out.split("FAILED")[1]
    assert "1 regression(s)" in failed and failed.count("[regression]") == 1 and "[m1 | figstep | ecso]" in failed


def test_compare_two_attacks_pairs_each_defense_with_itself(tmp_path, capsys):
    samples = demo_samples(10)
    run = tmp_path / "run"
    recs = []
    for attack, unsafe in (("none", 2), ("figstep", 7)):
        for defense in ("none", "ecso"):
            recs.append(record("m", defense, "demo", "keywords", {"asr": metric(unsafe / 10)}, attack=attack))
            labels = {s.id: "unsafe" if i < unsafe - (defense == "ecso") else "refusal" for i, s in enumerate(samples)}
            write_cell(run, "m", defense, "demo", samples, {s.id: "..." for s in samples}, labels, attack=attack)
    write_run(run, recs)
    assert main(["compare", str(run), str(run), "--attack-a", "none", "--attack-b", "figstep", "--format", "json"]) == 0
    found = json.loads(capsys.readouterr().out)
    asr = {(c["a"]["defense"], c["b"]["defense"]): c for c in found if c["metric"] == "asr"}
    assert set(asr) == {("none", "none"), ("ecso", "ecso")}
    assert asr[("none", "none")]["b"]["attack"] == "figstep" and "attack" not in asr[("none", "none")]["a"]
    assert asr[("none", "none")]["diff"] == pytest.approx(0.5) and asr[("ecso", "ecso")]["diff"] == pytest.approx(0.5)
    assert main(["compare", str(run), str(run), "--attack-a", "none", "--attack-b", "figstep"]) == 0
    assert "m · figstep · ecso" in capsys.readouterr().out
    assert main(["compare", str(run), str(run), "--attack-b", "nope"]) == 2
    assert "attack='nope'" in capsys.readouterr().err


def test_plain_report_shows_each_defense_in_the_three_regimes(tmp_path, capsys):
    """`realign report` (no --matrix) prints, below the results tables, the safety metric per
    defense with no attack, under transfer and adaptive, with intervals."""
    recs = [record("m1", d, "jbb", "keywords", {"asr": metric(a, a - 0.1, a + 0.1, 20)}, n=20, attack="none")
            for d, a in (("none", 0.6), ("cmrm", 0.3))]
    for attack, defense, regime, a in (("pgd:eps=16", "none", "transfer", 0.9), ("pgd:eps=16", "cmrm", "transfer", 0.5),
                                       ("pgd:eps=16,through=cmrm", "cmrm", "adaptive", 0.8),
                                       ("pgd:eps=16,through=cmrm", "none", "cross", 0.7)):
        rec = record("m1", defense, "jbb", "keywords", {"asr": metric(a, a - 0.1, a + 0.1, 20)}, n=20, attack=attack)
        rec["identity"]["attack"].update(regime=regime, family="pgd:eps=16")
        recs.append(rec)
    run = write_run(tmp_path / "run", recs)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| defense | attack | no attack | transfer | adaptive |" in out
    assert "| cmrm | pgd:eps=16 | 0.300 [0.20, 0.40] | 0.500 [0.40, 0.60] | 0.800 [0.70, 0.90] |" in out
    assert "| none | pgd:eps=16 | 0.600 [0.50, 0.70] | 0.900 [0.80, 1.00] | - |" in out
    plain = write_run(tmp_path / "plain", _records())  # no white-box attack: no regime table
    assert main(["report", str(plain)]) == 0
    assert "no attack | transfer | adaptive" not in capsys.readouterr().out
