"""The adaptive loss is the defended forward pass, and its gradient reaches the pixels through each
defense's edits: autograd agrees with finite differences (float64 tiny LLaVA) on a few pixels, the
defense changes the gradient, and teacher-forcing the defense's own greedy answer reproduces it
token by token (so the loss scores what the defended model would generate)."""

from __future__ import annotations

import pytest
import torch

from harness.contracts.backend import GenerationParams
from harness.whitebox import teacher
from harness.whitebox.objectives import objective_for, placeholder
from harness.whitebox.pixels import to_image
from tests.whitebox_fixtures import SPECS, assert_finite_differences, float64_backend, install, samples

PIXELS = [(0, 0, 3, 5), (1, 2, 14, 20)]  # (image, channel, row, column)


@pytest.fixture(scope="module")
def backend(tiny_model_path):
    return float64_backend(tiny_model_path("llava"))


def setup(backend, spec):
    defense = None if spec == "none" else install(backend, spec)
    obj = objective_for(backend, defense, {"refresh": 5, "hd_weight": 3.0, "hd_margin": 0.0})
    ss = samples(2)
    u = torch.stack([obj.pipeline.initial(backend, s.image) for s in ss])
    texts = [s.text for s in ss]
    obj.begin(texts, u)
    obj.refresh({0: 0, 1: 0}, texts, u)
    rows = [teacher.Row(i, obj.text(s.text), "Sure, here is how", "target") for i, s in enumerate(ss)]
    rows.append(teacher.Row(1, obj.text(ss[1].text), "I'm sorry", "refusal"))
    batch = teacher.build(backend, rows, placeholder(obj.pipeline))
    x = u.double() / 255

    def loss(z):
        row_loss, _ = obj.losses(z, batch)
        return row_loss.double().sum()

    return obj, x, loss


def gradient(loss, x):
    z = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss(z), z)
    return g


@pytest.mark.parametrize("spec", ["none", *SPECS])
def test_autograd_matches_finite_differences_through_the_defense(backend, spec):
    obj, x, loss = setup(backend, spec)
    g = gradient(loss, x)
    assert_finite_differences(loss, x, g, PIXELS, spec)
    assert float(g.abs().sum()) > 0


@pytest.mark.parametrize("spec", list(SPECS))
def test_the_defense_changes_the_gradient(backend, spec):
    _, x, plain = setup(backend, "none")
    _, _, defended = setup(backend, spec)
    if spec.startswith("hiddendetect"):  # the answer path is the plain model's; only the penalty differs
        obj, _, _ = setup(backend, spec)
    assert not torch.allclose(gradient(plain, x), gradient(defended, x), rtol=1e-3, atol=1e-9), spec


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith("hiddendetect")])
def test_teacher_forcing_the_defenses_own_answer_reproduces_it(backend, spec, monkeypatch):
    """The defense generates greedily with its own hooks; the whitebox forward, fed that answer,
    predicts each of its tokens (argmax), so positions and edits are the generation's."""
    defense = install(backend, spec)
    obj = objective_for(backend, defense, {"refresh": 1})
    decode, answers = backend.tokenizer.decode, []  # record the generated ids (a random model's text may not re-encode)

    def recording(ids, **kw):
        answers.append(tuple(int(i) for i in ids))
        return decode(ids, **kw)

    monkeypatch.setattr(backend.tokenizer, "decode", recording)
    ss = samples(2)
    u = torch.stack([obj.pipeline.initial(backend, s.image) for s in ss])

    sent = [type(s)(id=s.id, text=s.text, image=to_image(u[i])) for i, s in enumerate(ss)]
    defense.generate(backend, sent, GenerationParams(max_new_tokens=5, min_new_tokens=5))
    generated = answers[-2:]  # the answers (a ShiftDC caption is decoded before them)
    texts = [s.text for s in ss]
    obj.begin(texts, u)
    obj.refresh({0: 0, 1: 0}, texts, u)
    for i, answer in enumerate(generated):
        rows = [teacher.Row(i, obj.text(ss[i].text), answer)]
        batch = teacher.build(backend, rows, placeholder(obj.pipeline))
        with torch.no_grad():
            logits, _ = obj.logits(batch, obj.pipeline(u.double() / 255))
        n = int(batch.target_mask.sum())
        assert torch.equal(logits[0, :n].argmax(-1), batch.target_ids[0, :n]), (spec, answer)
