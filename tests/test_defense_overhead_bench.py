"""The defense-overhead benchmark's bookkeeping on a tiny model: every row is timed, the forced
decision paths (ECSO, HiddenDetect, guard, protector, QGuard) take the calls they should, and
partial results are handed out as they come.
(No timing is asserted: speed is measured by the benchmark itself, not by tests.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import defense_overhead as bench  # noqa: E402
from harness.defenses import ecso as ecso_module  # noqa: E402
from harness.defenses import guard as guard_module  # noqa: E402
from harness.defenses.protector_models import Helper  # noqa: E402

FIRST_ROWS = "cmrm dataset,cmrm sample,shiftdc,adashield,ecso"
NEW_ROWS = "hiddendetect,jailguard,guard,protector,qguard"
THIRD_ROWS = "coca,refusal_dir,eta"


def test_rows_calls_and_partial_results(tiny_backend_for: Callable[[str], Any]) -> None:
    backend = tiny_backend_for("llava")
    seen: list[int] = []
    rows = bench.run(backend, [2], lambda b: 2, new_tokens=3, caption_tokens=2, repeats=1, image_size=28,
                     on_rows=lambda r: seen.append(len(r)), only=bench.parse_only(FIRST_ROWS))
    assert seen == [6, 12]  # after the benign group, then after the harmful one
    by = {(r["defense"], r["inputs"]): r for r in rows}
    assert set(by) == {(d, k) for d in ("none", "cmrm dataset", "cmrm sample", "shiftdc", "adashield", "ecso")
                       for k in ("benign", "harmful")}
    assert by[("none", "benign")]["ratio_to_none"] == 1.0
    assert all(r["completion_tokens_per_sample"] == 3 for r in rows if r["defense"] != "ecso")
    assert by[("ecso", "benign")]["model_calls_per_sample"] == 2  # answer, self-check
    assert by[("ecso", "harmful")]["model_calls_per_sample"] == 4  # + caption, text-only answer
    assert by[("shiftdc", "harmful")]["model_calls_per_sample"] == 2
    assert 0 < by[("shiftdc", "harmful")]["caption_tokens_per_sample"] <= 2
    assert by[("adashield", "benign")]["prompt_tokens_per_sample"] > by[("none", "benign")]["prompt_tokens_per_sample"]
    assert ecso_module.says_yes("yes") and not ecso_module.says_yes("no")  # the forced verdict was undone


def test_new_rows_take_the_forced_paths(tiny_backend_for: Callable[[str], Any]) -> None:
    """Benign inputs pass each new defense, harmful ones are flagged: the calls show which path ran."""
    rows = bench.run(tiny_backend_for("llava"), [2], lambda b: 2, new_tokens=3, caption_tokens=2, repeats=1,
                     image_size=28, only=bench.parse_only(NEW_ROWS))
    by = {(r["defense"], r["inputs"]): r for r in rows}
    calls = {k: (r["model_calls_per_sample"], r["extra_forward_passes_per_sample"]) for k, r in by.items()}
    assert calls == {
        ("none", "benign"): (1, 0), ("none", "harmful"): (1, 0),
        ("hiddendetect", "benign"): (1, 1), ("hiddendetect", "harmful"): (0, 1),  # scoring prefill; refused
        ("jailguard", "benign"): (9, 0), ("jailguard", "harmful"): (9, 0),  # original + 8 variants
        ("guard", "benign"): (2, 0), ("guard", "harmful"): (1, 0),  # guard (+ target when it passes)
        ("protector", "benign"): (2, 0), ("protector", "harmful"): (3, 0),  # target, detector (+ detoxifier)
        ("qguard", "benign"): (1, 35), ("qguard", "harmful"): (0, 35),  # 35 guard questions to the target
    }
    assert by[("hiddendetect", "harmful")]["completion_tokens_per_sample"] == 0
    assert "threshold=1e9" in by[("qguard", "benign")]["spec"] and "threshold=-1e9" in by[("qguard", "harmful")]["spec"]
    assert guard_module.first_line("unsafe\nS1") == "unsafe" and Helper.p_safe.__name__ == "p_safe"  # undone


def test_decoding_and_steering_rows_take_their_paths(tiny_backend_for: Callable[[str], Any]) -> None:
    """CoCA runs two streams; the refusal direction is fitted before timing and adds nothing to the
    calls; ETA keeps the first answer on benign inputs and runs best-of-N on harmful ones."""
    rows = bench.run(tiny_backend_for("llava"), [2], lambda b: 2, new_tokens=3, caption_tokens=2, repeats=1,
                     image_size=28, only=bench.parse_only(THIRD_ROWS))
    by = {(r["defense"], r["inputs"]): r for r in rows}
    assert by[("coca", "benign")]["model_calls_per_sample"] == 2 == by[("coca", "harmful")]["model_calls_per_sample"]
    assert by[("refusal_dir", "benign")]["model_calls_per_sample"] == 1
    assert by[("eta", "benign")]["model_calls_per_sample"] == 1 < by[("eta", "harmful")]["model_calls_per_sample"]
    assert "rm_threshold=1e9" in by[("eta", "harmful")]["spec"] and "rm_threshold=-1e9" in by[("eta", "benign")]["spec"]


def test_only_keeps_the_baseline_and_refuses_unknown_rows(tiny_backend_for: Callable[[str], Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.parse_only("adashield, cmrm sample") == ("none", "cmrm sample", "adashield")
    rows = bench.run(tiny_backend_for("llava"), [2], lambda b: 2, 2, 2, 1, 28, only=bench.parse_only("adashield"))
    assert {r["defense"] for r in rows} == {"none", "adashield"}
    with pytest.raises(SystemExit) as exit_info:  # refused before any model is built
        bench.main(["--only", "none,shiftcd"])
    assert exit_info.value.code == 2 and "unknown rows ['shiftcd']" in capsys.readouterr().err
