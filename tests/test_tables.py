"""Tables that fit the terminal: `realign report` split per (task, judge) under headings, wrapped
and split to the width on a terminal, markdown (one heading per table) in a pipe."""

from __future__ import annotations

from harness.analysis.report import markdown_table, report_tables
from harness.cli import main
from harness.tables import TextTable, split, terminal
from tests.synthetic_runs import LONG_DEFENSES, metric, organism_records, record, write_run


def _records() -> list[dict]:
    recs = organism_records(LONG_DEFENSES[:6])
    recs += [record("organisms/seed0", d, "mme", None, {"perception": metric(1200.0, 1100.0, 1300.0),
                                                        "score/OCR": metric(150.0, 140.0, 160.0)})
             for d in LONG_DEFENSES[:6]]
    for r in recs[:6]:
        r["metrics"]["refused_exposed/shape"] = metric(0.5, 0.4, 0.6)
    return recs


def test_report_has_a_table_per_task_with_headings():
    text = markdown_table(_records(), detail=True)
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    organism = "### organism:templates=1,images=none+shape | judge keywords:preset=organism"
    assert headings == [f"{organism} (n=196, no generation or judge errors)",
                        f"{organism} | per category (n=196, no generation or judge errors)",
                        "### mme | no judge (n=100, no generation or judge errors)",
                        "### mme | no judge | per category (n=100, no generation or judge errors)"]
    mme = text.split("### mme | no judge (")[1].split("###")[0]
    assert "perception" in mme and "refused_shape" not in mme and "score/OCR" not in mme  # detail is its own table
    assert "| model | defense | refused_none |" in text


def test_terminal_tables_fit_the_width_and_keep_every_value():
    tables = report_tables(_records(), detail=True)
    for width in (80, 100, 160):
        out = terminal(tables, width)
        assert max(len(line.rstrip()) for line in out.splitlines()) <= width
        for name in ("refused_shape", "helpful_shape", "picture_qa", "perception", "score/OCR", "refused_exposed/shape"):
            assert name in out, (width, name)
        assert out.count("1.000 [0.88, 1.00]") == 6  # refused_none of every defense, in some split table
    narrow = terminal(tables, 80)
    assert "part 1/" in narrow and "part 2/" in narrow  # split, each part titled with its columns
    assert "\nshiftdc:" not in narrow and " shiftdc: " in narrow  # long specs wrapped at separators
    assert "cmrm:calibration=organism:" in terminal(tables, 120)


def test_split_repeats_the_label_columns():
    t = TextTable("t", ["model", "defense", "a", "b", "c"], [["m", "d", "x" * 30, "y" * 30, "z" * 30]], labels=2)
    parts = split(t, 60)
    assert len(parts) == 3 and all(p.head[:2] == ["model", "defense"] for p in parts)
    assert [p.head[2] for p in parts] == ["a", "b", "c"]


def test_report_command_prints_markdown_into_a_pipe(tmp_path, capsys):
    run = write_run(tmp_path / "run", _records())
    assert main(["report", str(run), "--detail"]) == 0
    out = capsys.readouterr().out
    assert out.count("### ") == 4 and "| organisms/seed0 | none | 1.000 [0.88, 1.00] |" in out


def test_counts_stay_columns_when_they_differ():
    recs = _records()[:2]
    recs[1]["n"], recs[1]["judge_errors"] = 150, 2
    (table,) = report_tables(recs)
    assert table.head[-3:] == ["n", "gen err", "judge err"] and table.rows[1][-3:] == ["150", "0", "2"]
