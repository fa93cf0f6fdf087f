"""Progress of a run: the overall line (cell i/N, samples, elapsed, ETA) above the cell's bar on a
terminal, the same facts as timestamped log lines elsewhere, and `--quiet` silent but for errors."""

from __future__ import annotations

import io
import re

from harness.cli import main
from harness.progress import RunProgress, cell_label, clock, short_spec
from harness.quiet import quiet
from harness.runner import run
from harness.schema import RunConfig
from tests import test_runner  # noqa: F401 - registers the scripted-test backend


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_short_labels():
    assert short_spec("organisms/seed0") == "seed0" and short_spec("llava-hf/llava-1.5-7b-hf") == "llava-1.5-7b-hf"
    label = cell_label("organisms/seed0", "shiftdc:calibration_unsafe=organism:split=calibration_harmful_shape",
                       "organism:templates=1,images=none+shape", attack="none")
    assert label == "seed0 \u00b7 shiftdc:calibration_uns\u2026 \u00b7 organism:templates=1,im\u2026"
    assert len(label) < 80 and clock(3725) == "1:02:05" and clock(None) == "?"


def test_overall_line_counts_cells_samples_and_eta():
    now = FakeClock()
    p = RunProgress(["a", "b", "a", "b"], enabled=True, stream=io.StringIO(), now=now)
    p.start_cell("m \u00b7 none \u00b7 a", "a", 100, 0)
    assert p.eta() is None and "ETA ?" in p.overall()
    with p.stage("generate", 100, 0) as advance:
        now.t += 50
        advance(100)
    p.end_cell(100)
    # b's size is unknown yet: counted as the mean of the sizes seen (100)
    assert p.overall() == "cell 1/4 \u00b7 100/400 samples \u00b7 elapsed 0:00:50 \u00b7 ETA 0:02:30"
    p.start_cell("m \u00b7 none \u00b7 b", "b", 300, 100)  # 100 of 300 done in an earlier session
    assert p.total() == 100 + 300 + 100 + 300 and p.done() == 200
    assert p.overall().startswith("cell 2/4 \u00b7 200/800 samples")
    assert p.eta() == (800 - 200) * 0.5


def test_log_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    config = RunConfig(models=["scripted-test:tag=a"], defenses=["none", "adashield"], tasks=["demo"],
                       judges=["keywords"], batch_size=8)
    run(config, tmp_path / "r", progress=True)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and all(re.match(r"\[\d\d:\d\d:\d\d\] realign: cell \d/2 \u00b7 \d+/\d+ samples \u00b7 elapsed ", line)
                         for line in lines), err
    assert any("| generate scripted-test:tag=a \u00b7 none \u00b7 demo 0/48" in line for line in lines)
    assert any("| judge keywords scripted-test:tag=a \u00b7 adashield \u00b7 demo 48/48 finished" in line for line in lines)
    assert any(line.startswith("[") and "cell 2/2 \u00b7 96/96 samples" in line and "| done" in line for line in lines)
    assert "\r" not in err and max(len(line) for line in lines) < 200


def test_terminal_draws_the_overall_line_above_the_bar():
    stream = Tty()
    p = RunProgress(["demo"], enabled=True, stream=stream)
    assert p.terminal
    p.start_cell("m \u00b7 none \u00b7 demo", "demo", 10, 0)
    bar = p.bar("generate", 10, 0)
    bar.update(4)
    p.close()
    p.end_cell(10)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    assert "cell 1/1 \u00b7 4/10 samples" in text and "generate m \u00b7 none \u00b7 demo" in text
    assert "\u2713 cell 1/1 \u00b7 10/10 samples" in text


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    p = RunProgress(["demo"], enabled=False, stream=stream)
    p.start_cell("x", "demo", 5, 0)
    with p.stage("generate", 5, 0) as advance:
        advance(5)
    p.end_cell(5)
    assert stream.getvalue() == ""


def test_quiet_run_prints_only_results(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", "--model", "scripted-test:tag=a", "--task", "demo", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "refused" not in captured.err and "| model | defense |" in captured.out
    assert main(["judge", str(out), "--judge", "keywords:preset=organism", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_quiet_silences_the_libraries_and_restores_them():
    """(The test session itself runs with the hub's bars off, conftest.py: restored means as before.)"""
    import logging
    import warnings

    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    before = (hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled(), hf_logging.get_verbosity())
    with quiet():
        assert not hf_logging.is_progress_bar_enabled()  # the weights-loading bar
        assert hub.are_progress_bars_disabled()
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("noise", UserWarning)
        assert logging.getLogger().level == logging.ERROR and seen == []
    assert (hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled(), hf_logging.get_verbosity()) == before
