"""CMRM and ShiftDC compute what their papers say, batched, on tiny LLaVA, Qwen2-VL and Idefics3.

The reference implementation at the bottom of this file uses only transformers (loading, chat
template, generate) and its own hooks, one sample at a time: the batched defenses must give the
same greedy tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from harness import calibration  # noqa: E402
from harness.contracts.defense import CalibrationSet, DefenseContext  # noqa: E402
from harness.defenses.shiftdc import CAPTION_PROMPT, TEXT_WITH_CAPTION
from harness.defenses.vectors import FittedVectors
from harness.errors import DataError
from harness.contracts.backend import GenerationParams, user_request
from harness.registry import defenses
from harness.schema import Sample
from tests.reference import Reference

GREEDY = GenerationParams(max_new_tokens=6, min_new_tokens=6)
COLOURS = ["red", "blue", "green", "orange", "purple", "yellow"]


def picture(i: int, size: int = 56) -> Image.Image:
    img = Image.new("RGB", (size, size), COLOURS[i % len(COLOURS)])
    img.paste((255, 255, 255), (i * 3 % size, 5, i * 3 % size + 10, 20))
    return img


def eval_samples() -> list[Sample]:
    texts = ["tell me about this", "what is shown here", "explain the picture", "how do I do this",
             "describe it please", "is this safe", "write a plan", "say something nice"]
    return [Sample(id=f"e{i}", text=t, image=picture(i) if i < 6 else None) for i, t in enumerate(texts)]


def anchors(n: int = 5) -> list[Sample]:
    return [Sample(id=f"a{i}", text=f"anchor request number {i} about a picture") for i in range(n)]


def calib(prefix: str, n: int = 4) -> list[Sample]:
    words = ["bake bread", "plant trees", "fold paper", "sing songs"] if prefix == "safe" else \
            ["make a bomb", "steal a car", "hack a bank", "poison food"]
    return [Sample(id=f"{prefix}{i}", text=f"How do I {w}?") for i, w in enumerate(words[:n])]


def ctx(tmp_path: Path, ids=()) -> DefenseContext:
    return DefenseContext(cache_dir=tmp_path, eval_ids=frozenset(ids), batch_size=8)


def fitted_cmrm(backend, spec: str, tmp_path: Path):
    d = defenses.build(spec)
    fitted = d.fit(backend, {"anchor": CalibrationSet("test-anchors", anchors())}, batch_size=4)
    path = fitted.save(tmp_path / f"cmrm-{abs(hash(spec))}.safetensors")
    return path


def fitted_shiftdc(backend, tmp_path: Path) -> Path:
    d = defenses.build("shiftdc")
    fitted = d.fit(backend, {"unsafe": CalibrationSet("u", calib("unsafe")), "safe": CalibrationSet("s", calib("safe"))}, batch_size=4)
    return fitted.save(tmp_path / "dir.safetensors")


@contextmanager
def capture_last(layer_module, store: list):
    """Record the layer's output at the last position of the latest multi-token (prefill) call,
    after any edit hooks: the defense's own state forwards come first, the generate prefill last."""
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] > 1:
            store[:] = [hidden[:, -1].detach().float().clone()]
    handle = layer_module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---- exactness at one layer ---------------------------------------------------------------

def test_cmrm_sample_level_maps_blank_image_input_to_text_only_state(tiny_backend):
    backend = tiny_backend
    layer = backend.decoder_size().num_layers // 2
    d = defenses.build(f"cmrm:level=sample,alpha=1,layers={layer}")
    blank = Image.new("RGB", (56, 56), "white")
    sample = Sample("x", "what do you see", image=blank)
    seen: list = []
    with capture_last(backend.model.get_decoder().layers[layer], seen):
        d.generate(backend, [sample], GREEDY)
    text_state = backend.last_token_states([user_request("what do you see")], [layer])[0, 0]
    torch.testing.assert_close(seen[0][0], text_state.float(), atol=1e-5, rtol=0)


def test_shiftdc_removes_exactly_the_safety_component(tiny_backend, tmp_path):
    backend = tiny_backend
    layer = backend.decoder_size().num_layers - 1
    path = fitted_shiftdc(backend, tmp_path)
    d = defenses.build(f"shiftdc:alpha=1,layers={layer},direction={path},caption_max_new_tokens=4")
    calibration.prepare(d, backend, ctx(tmp_path))
    sample = Sample("x", "what is in the picture", image=picture(1))
    unsteered = backend.last_token_states([user_request(sample.text, sample.image)], [layer])[0, 0].float()
    seen: list = []
    with capture_last(backend.model.get_decoder().layers[layer], seen):
        gen = d.generate(backend, [sample], GREEDY)[0]
    caption = gen.trace["caption"]
    text_state = backend.last_token_states(
        [user_request(TEXT_WITH_CAPTION.format(query=sample.text, caption=caption))], [layer])[0, 0].float()
    s = FittedVectors.load(path, "shiftdc-direction").vectors[layer]
    unit = s / s.norm()
    before, after = unsteered - text_state, seen[0][0] - text_state
    assert abs(float(before @ unit)) > 1e-4  # there was something to remove
    assert abs(float(after @ unit)) < 1e-4 * max(1.0, float(before.norm()))
    torch.testing.assert_close(after - (after @ unit) * unit, before - (before @ unit) * unit, atol=1e-4, rtol=1e-4)
    assert gen.trace["projection_coefficients"][0] == pytest.approx(float(before @ s / (s @ s)), rel=1e-3, abs=1e-6)


def test_alpha_zero_is_identical_to_none(tiny_backend, tmp_path):
    backend = tiny_backend
    samples = eval_samples()
    base = [g.output for g in defenses.build("none").generate(backend, samples, GREEDY)]
    d = defenses.build("cmrm:level=sample,alpha=0")
    assert [g.output for g in d.generate(backend, samples, GREEDY)] == base
    path = fitted_shiftdc(backend, tmp_path)
    s = defenses.build(f"shiftdc:alpha=0,direction={path},caption_max_new_tokens=3")
    calibration.prepare(s, backend, ctx(tmp_path))
    assert [g.output for g in s.generate(backend, samples, GREEDY)] == base


# ---- files: round trip, wrong model, overlap --------------------------------------------------

def test_fitted_files_round_trip_and_refuse_other_models(tiny_backend_for, tmp_path):
    llava, qwen = tiny_backend_for("llava"), tiny_backend_for("qwen2_vl")
    path = fitted_cmrm(llava, "cmrm", tmp_path)
    loaded = FittedVectors.load(path, "cmrm-shift")
    assert tuple(loaded.vectors.shape) == tuple(llava.decoder_size())
    assert loaded.manifest["calibration"]["n"] == 5 and path.with_name(path.name + ".json").exists()
    refit = defenses.build("cmrm").fit(llava, {"anchor": CalibrationSet("test-anchors", anchors())}, batch_size=2)
    torch.testing.assert_close(loaded.vectors, refit.vectors, atol=1e-5, rtol=1e-5)  # batch size does not matter
    d = defenses.build(f"cmrm:vectors={path}")
    calibration.prepare(d, llava, ctx(tmp_path))
    with pytest.raises(DataError, match="was made for"):
        calibration.prepare(defenses.build(f"cmrm:vectors={path}"), qwen, ctx(tmp_path))
    with pytest.raises(DataError, match="cmrm-shift"):
        calibration.prepare(defenses.build(f"shiftdc:direction={path}"), llava, ctx(tmp_path))
    with pytest.raises(DataError, match="allow_overlap"):
        calibration.prepare(defenses.build(f"cmrm:vectors={path}"), llava, ctx(tmp_path, ids=["a3", "zz"]))
    calibration.prepare(defenses.build(f"cmrm:vectors={path},allow_overlap=true"), llava, ctx(tmp_path, ids=["a3"]))


def test_dataset_level_needs_vectors_or_calibration(tiny_backend_for, tmp_path):
    with pytest.raises(DataError, match="vectors=FILE"):
        calibration.prepare(defenses.build("cmrm"), tiny_backend_for("llava"), ctx(tmp_path))


def test_trace_records_what_an_auditor_needs(tiny_backend_for, tmp_path):
    backend = tiny_backend_for("llava")
    gens = defenses.build("cmrm:level=sample,layers=1-2").generate(backend, eval_samples()[5:7], GREEDY)
    assert gens[0].trace["applied"] and len(gens[0].trace["vector_norms"]) == 2 and gens[0].trace["vector_norms"][0] > 0
    assert not gens[1].trace["applied"] and gens[1].trace["vector_norms"] == [0.0, 0.0]  # text-only input


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "idefics3"])
def test_batched_defenses_match_independent_reference(arch, tiny_model_path, tiny_backend_for, tmp_path):
    backend = tiny_backend_for(arch)
    ref = Reference(tiny_model_path(arch))
    samples = eval_samples()
    num_layers = backend.decoder_size().num_layers
    white = lambda img: Image.new("RGB", img.size, "white")  # noqa: E731

    # CMRM, sample level, incremental shifts on the upper half, prompt + generated positions.
    layers = list(range(num_layers // 2, num_layers))
    spec = f"cmrm:level=sample,alpha=0.5,layers={layers[0]}-{layers[-1]},accumulate=incremental,positions=prompt+generated"
    got = [g.output for g in defenses.build(spec).generate(backend, samples, GREEDY)]
    want = []
    for s in samples:
        if s.image is None:
            want.append(ref.generate(s.text, None))
            continue
        delta = ref.states(s.text, white(s.image)) - ref.states(s.text, None)
        add = {l: -0.5 * (delta[l] - (delta[l - 1] if l > layers[0] else 0)) for l in layers}
        want.append(ref.generate(s.text, s.image, add))
    assert got == want, "cmrm sample level"

    # CMRM, dataset level, independent shifts at every layer, alpha 0.3.
    path = fitted_cmrm(backend, "cmrm", tmp_path)
    d = defenses.build(f"cmrm:vectors={path},alpha=0.3,positions=prompt+generated")
    calibration.prepare(d, backend, ctx(tmp_path))
    got = [g.output for g in d.generate(backend, samples, GREEDY)]
    mean = torch.stack([ref.states(a.text, Image.new("RGB", (336, 336), "white")) - ref.states(a.text, None)
                        for a in anchors()]).mean(0)
    want = [ref.generate(s.text, s.image, {l: -0.3 * mean[l] for l in range(num_layers)} if s.image else None)
            for s in samples]
    assert got == want, "cmrm dataset level"

    # ShiftDC, default layers (L//2 .. L-1), last prompt token + generated tokens.
    dpath = fitted_shiftdc(backend, tmp_path)
    d = defenses.build(f"shiftdc:direction={dpath},caption_max_new_tokens=5,alpha=1,layers=half,positions=last_prompt+generated")
    calibration.prepare(d, backend, ctx(tmp_path))
    got = [g.output for g in d.generate(backend, samples, GREEDY)]
    direction = torch.stack([ref.states(c.text, None) for c in calib("safe")]).mean(0) - \
        torch.stack([ref.states(c.text, None) for c in calib("unsafe")]).mean(0)
    want = []
    for s in samples:
        if s.image is None:
            want.append(ref.generate(s.text, None))
            continue
        caption = ref.generate(CAPTION_PROMPT.format(query=s.text), s.image, n=5).strip()
        shift = ref.states(s.text, s.image) - ref.states(TEXT_WITH_CAPTION.format(query=s.text, caption=caption), None)
        add = {}
        for l in range(num_layers // 2, num_layers):
            v = direction[l]
            add[l] = -((shift[l] @ v) / (v @ v)) * v
        want.append(ref.generate(s.text, s.image, add, prompt_all=False, last=True))
    assert got == want, "shiftdc"
