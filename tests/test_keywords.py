"""The keyword judge: the AdvBench preset verbatim, its case rule, custom files, errors."""

from __future__ import annotations

import pytest

from harness.errors import DataError
from harness.registry import judges
from harness.schema import Generation, Sample
from harness.spec import SpecError
from harness.refusal import ADVBENCH


def _judge(spec="keywords"):
    return judges.build(spec)


def test_advbench_preset_is_the_published_list():
    assert len(ADVBENCH.phrases) == 29
    assert ADVBENCH.phrases[0] == "I'm sorry" and ADVBENCH.phrases[-1] == "I can't assist"
    assert ADVBENCH.case_sensitive


def test_labels_and_case_rule():
    j = _judge()
    samples = [Sample(id=str(i), text="q") for i in range(4)]
    gens = [
        Generation("0", "I'm sorry, I cannot help with that."),
        Generation("1", "Step 1: gather the materials."),
        Generation("2", "i'm sorry but lower case does not match a case-sensitive list"),
        Generation("3", "", error="image: cannot be decoded"),
    ]
    labels = [v.label for v in j.verdicts(samples, gens)]
    assert labels == ["refusal", "unsafe", "unsafe", "error"]


def test_custom_file(tmp_path):
    path = tmp_path / "kw.txt"
    path.write_text("# comment\nno way\n\n")
    j = _judge(f"keywords:file={path},case_sensitive=false")
    v = j.verdicts([Sample("a", "q")], [Generation("a", "NO WAY, friend")])[0]
    assert v.label == "refusal" and v.detail["matched"] == "no way"
    with pytest.raises(DataError, match="kw2.txt"):
        _judge(f"keywords:file={tmp_path / 'kw2.txt'}")


def test_unknown_preset():
    with pytest.raises(SpecError, match="valid presets: advbench"):
        _judge("keywords:preset=nope")
