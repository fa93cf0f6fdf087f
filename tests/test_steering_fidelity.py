"""What the steering defenses compute where papers and public code are specific:

- layer specs relative to depth, so a default chosen on the 4-layer organism means the same share
  of a 32-layer model;
- CMRM's `blank=mean` uses the loaded processor's own normalisation mean (not always CLIP's);
- ShiftDC's safety direction is fitted on the same text-only form as the modality shift's text side
  (query + the model's own caption), as in the paper and its public code.
The reference (tests/reference.py) uses transformers and hand-written hooks only.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from harness import calibration
from harness.calibration import cache_path
from harness.contracts.defense import CalibrationSet, DefenseContext
from harness.defenses.layers import parse_layers
from harness.defenses.shiftdc import CAPTION_PROMPT, TEXT_WITH_CAPTION
from harness.errors import DataError
from harness.registry import defenses
from harness.schema import Sample
from harness.spec import SpecError
from tests.reference import Reference


# ---- layers relative to depth -------------------------------------------------------------------
@pytest.mark.parametrize("spec, four, thirty_two", [
    ("all", [0, 1, 2, 3], list(range(32))),
    ("last", [3], [31]),
    ("half", [2, 3], list(range(16, 32))),
    ("top:0.25", [3], list(range(24, 32))),
    ("bottom:0.5", [0, 1], list(range(16))),
    ("depth:0.3125-1", [1, 2, 3], list(range(10, 32))),
    ("top:0.25+0", [0, 3], [0, *range(24, 32)]),
])
def test_depth_relative_layer_specs(spec, four, thirty_two):
    assert parse_layers(spec, 4) == four and parse_layers(spec, 32) == thirty_two


def test_top_fraction_rounds_half_up_and_keeps_one_layer():
    assert parse_layers("top:0.25", 10) == [7, 8, 9]  # 2.5 layers -> 3, not banker's 2
    assert parse_layers("top:0.01", 32) == [31]


@pytest.mark.parametrize("bad", ["top:1.5", "top:x", "depth:0.5", "depth:0.8-0.2", "middle", "3-1"])
def test_bad_layer_specs_are_refused_when_the_defense_is_built(bad):
    with pytest.raises(SpecError):
        defenses.build(f"shiftdc:layers={bad}")


def test_defaults_are_stated_relative_to_depth():
    assert defenses.build("shiftdc").params.layers == "top:0.25"
    assert defenses.build("cmrm").params.layers == "all"


# ---- CMRM blank=mean: the processor's own mean ---------------------------------------------------
def test_cmrm_mean_image_uses_the_loaded_processors_mean(tiny_backend_for, tiny_model_path):
    backend = tiny_backend_for("idefics3")
    ref = Reference(tiny_model_path("idefics3"))
    mean = tuple(float(x) for x in ref.processor.image_processor.image_mean)
    assert backend.image_mean() == mean and mean != (0.48145466, 0.4578275, 0.40821073)  # not CLIP's
    sample = Sample("x", "what is shown", image=Image.new("RGB", (40, 40), "red"))
    gen = defenses.build("cmrm:level=sample,blank=mean,alpha=1,layers=all").generate(
        backend, [sample], _params())[0]
    colour = tuple(int(round(255 * c)) for c in mean)
    with_mean = ref.states(sample.text, Image.new("RGB", (40, 40), colour))
    text_only = ref.states(sample.text, None)
    want = [round(float(x), 6) for x in (with_mean - text_only).norm(dim=-1)]
    assert gen.trace["vector_norms"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    clip_colour = ref.states(sample.text, Image.new("RGB", (40, 40), (123, 117, 104)))
    assert (clip_colour - text_only).norm(dim=-1).tolist() != pytest.approx(want, rel=1e-3)  # the old bug shows


# ---- ShiftDC direction input ---------------------------------------------------------------------
def _calibration(kind: str) -> list[Sample]:
    words = ["bake bread", "plant trees", "fold paper"] if kind == "safe" else ["make a bomb", "steal a car", "hack a bank"]
    colours = ["red", "blue", "green"]
    return [Sample(f"{kind}{i}", f"How do I {w}?", Image.new("RGB", (48, 48), colours[i]) if i < 2 else None)
            for i, w in enumerate(words)]


def test_shiftdc_direction_is_fitted_on_query_plus_own_caption(tiny_model_path, tiny_backend_for):
    backend = tiny_backend_for("llava")
    d = defenses.build("shiftdc:caption_max_new_tokens=4")
    sets = {k: CalibrationSet(k, _calibration(k)) for k in ("unsafe", "safe")}
    fitted = d.fit(backend, sets, batch_size=2)
    ref = Reference(tiny_model_path("llava"))
    means = {}
    for kind, cs in sets.items():
        forms = []
        for s in cs.samples:
            if s.image is None:
                forms.append(s.text)
                continue
            caption = ref.generate(CAPTION_PROMPT.format(query=s.text), s.image, n=4, exact_length=False).strip()
            assert fitted.manifest["captions"][s.id] == caption
            forms.append(TEXT_WITH_CAPTION.format(query=s.text, caption=caption))
        means[kind] = torch.stack([ref.states(t, None) for t in forms]).mean(0)
    torch.testing.assert_close(fitted.vectors, means["safe"] - means["unsafe"], atol=1e-4, rtol=1e-4)
    assert fitted.manifest["params"] == {"direction_input": "query_caption", "caption_max_new_tokens": 4}
    bare = defenses.build("shiftdc:direction_input=query").fit(backend, sets, batch_size=2)
    assert not torch.allclose(bare.vectors, fitted.vectors) and bare.manifest["captions"] == {}


def test_shiftdc_refuses_a_direction_fitted_on_another_input_form(tiny_backend_for, tmp_path):
    backend = tiny_backend_for("llava")
    sets = {k: CalibrationSet(k, _calibration(k)) for k in ("unsafe", "safe")}
    path = defenses.build("shiftdc:direction_input=query").fit(backend, sets).save(tmp_path / "q.safetensors")
    context = DefenseContext(cache_dir=tmp_path)
    with pytest.raises(DataError, match="direction_input=query"):
        calibration.prepare(defenses.build(f"shiftdc:direction={path}"), backend, context)
    calibration.prepare(defenses.build(f"shiftdc:direction={path},direction_input=query"), backend, context)


def test_the_direction_cache_depends_on_the_input_form(tiny_backend_for, tmp_path):
    backend = tiny_backend_for("llava")
    spec = "calibration_unsafe=organism:split=calibration_harmful,calibration_safe=organism:split=calibration_benign"
    a = defenses.build(f"shiftdc:{spec}")
    b = defenses.build(f"shiftdc:{spec},direction_input=query")
    assert cache_path(a, a.calibration(), backend, tmp_path) != cache_path(b, b.calibration(), backend, tmp_path)


# ---- helpers -----------------------------------------------------------------------------------
def _params():
    from harness.contracts.backend import GenerationParams

    return GenerationParams(max_new_tokens=3, min_new_tokens=3)


def test_reference_helpers_agree_with_the_backend(tiny_backend_for, tiny_model_path):
    """The reference reads the same states as the backend (so the tests compare like with like)."""
    from harness.contracts.backend import user_request

    backend = tiny_backend_for("llava")
    mine = backend.last_token_states([user_request("hello there")], list(range(4)))[0]
    ref = Reference(tiny_model_path("llava")).states("hello there", None)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)

