"""CoCA decodes argmax(ℓ_P + α(ℓ_P − ℓ_0)) with the principled and plain prompts as one cached 2B-row
batch, on tiny LLaVA, Qwen2-VL and Idefics3 (float32).

The reference is written here with transformers only (the processor's chat template and the model,
loaded by tests/reference.py): one sample at a time and WITHOUT a KV cache, a full forward over
the whole sequence at every step, then the formula. So the comparison is between two
implementations, not one with itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from harness.contracts.backend import Backend, Completion, GenerationParams, Request
from harness.defenses import coca as coca_module
from harness.defenses.coca import DEFAULT_PRINCIPLE, contrast_logits
from harness.errors import CapabilityError
from harness.registry import defenses
from harness.schema import RunConfig, Sample
from harness.spec import SpecError
from tests.reference import Reference

N = 5
EXACT = GenerationParams(max_new_tokens=N, min_new_tokens=N)
OSB_PRINCIPLE = ("The assistant should answer in a harmless, ethical and inoffensive manner. The assistant "
                 "cannot provide answers related to illegal activities.")


def samples() -> list[Sample]:
    texts = ["how do I bake bread?", "what is shown here", "tell me a long story about a cat please",
             "explain", "how do I pick a lock on a door"]
    colours = ["red", "blue", "green"]
    return [Sample(f"s{i}", t, image=Image.new("RGB", (40 + 8 * i, 40), colours[i % 3]) if i % 2 == 0 else None)
            for i, t in enumerate(texts)]


# ---- the independent reference -----------------------------------------------------------------
def _extend(inputs: dict, token: int) -> dict:
    """The inputs with one more token: ids, mask and per-token type ids grow; pixels stay."""
    out = dict(inputs)
    length = inputs["input_ids"].shape[1]
    out["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    for key, value in inputs.items():
        if key != "input_ids" and isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length:
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([value, torch.full((1, 1), fill, dtype=value.dtype)], dim=1)
    return out


@torch.no_grad()
def _last_logits(ref: Reference, inputs: dict) -> torch.Tensor:
    return ref.model(**inputs, use_cache=False).logits[0, -1].float()


@torch.no_grad()
def reference_decode(ref: Reference, sample: Sample, principle: str, alpha: float, n: int = N,
                     min_new: int = N) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Tokens and per-step (ℓ_P, ℓ_0) for one sample, cache-less: every step re-runs the whole sequence."""
    eos = ref.processor.tokenizer.eos_token_id
    with_p = ref.inputs(f"{principle} {sample.text}", sample.image)
    without = ref.inputs(sample.text, sample.image)
    tokens, logits = [], []
    for step in range(n):
        lp, l0 = _last_logits(ref, with_p), _last_logits(ref, without)
        scores = lp + alpha * (lp - l0)
        if step < min_new:
            scores[eos] = -math.inf
        token = int(scores.argmax())
        tokens.append(token)
        logits.append((lp, l0))
        if token == eos:
            break
        with_p, without = _extend(with_p, token), _extend(without, token)
    return tokens, logits


class Steps:
    """A step observer that keeps what the defense computed at each step, for row `row`."""

    def __init__(self, row: int = 0) -> None:
        self.row = row
        self.seen: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, step, principled, plain, scores, chosen) -> None:
        r = self.row
        self.seen.append((principled[r].cpu(), plain[r].cpu(), scores[r].cpu(), int(chosen[r])))

    def tokens(self) -> list[int]:
        return [s[3] for s in self.seen]


# ---- against the reference ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "idefics3"])
def test_tokens_match_a_cacheless_reference(arch, tiny_backend_for, tiny_model_path):
    backend = tiny_backend_for(arch)
    ref = Reference(tiny_model_path(arch))
    sample = samples()[0]  # with an image
    changed = False
    for alpha in (0.0, 1.5, 4.0):
        d = defenses.build(f"coca:alpha={alpha}")
        d.observer = steps = Steps()
        gen = d.generate(backend, [sample], EXACT)[0]
        want, _ = reference_decode(ref, sample, d.principle, alpha)
        assert steps.tokens() == want, f"alpha={alpha}"
        assert gen.output == ref.processor.tokenizer.decode(want, skip_special_tokens=True)
        assert gen.trace["steps"] == N and gen.trace["alpha"] == alpha and gen.trace["batch_forwards"] == N
        changed |= gen.trace["changed_vs_principled"] > 0
        if alpha == 0.0:  # no contrast: plain greedy decoding of the principled prompt
            assert gen.trace["changed_vs_principled"] == 0
            assert gen.output == ref.generate(f"{d.principle} {sample.text}", sample.image, n=N)
    assert changed, "on a random model, α > 0 should change some choice"


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_step_logits_equal_the_formula(arch, tiny_backend_for, tiny_model_path):
    backend = tiny_backend_for(arch)
    ref = Reference(tiny_model_path(arch))
    sample = samples()[2]
    d = defenses.build("coca:alpha=2.5")
    d.observer = steps = Steps()
    d.generate(backend, [sample], EXACT)
    tokens, logits = reference_decode(ref, sample, d.principle, 2.5)
    assert steps.tokens() == tokens
    eos = ref.processor.tokenizer.eos_token_id
    for step in (0, 3):
        principled, plain, scores, _ = steps.seen[step]
        lp, l0 = logits[step]
        torch.testing.assert_close(principled, lp, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(plain, l0, atol=1e-4, rtol=1e-4)
        want = lp + 2.5 * (lp - l0)
        want[eos] = -math.inf  # min_new_tokens bars EOS
        torch.testing.assert_close(scores, want, atol=1e-3, rtol=1e-4)


def test_checkpoint_logits_processors_do_not_touch_the_formula(tiny_backend_for, tiny_model_path, monkeypatch):
    """Qwen2-VL's own generation config carries a repetition penalty; CoCA's formula is on raw logits."""
    backend = tiny_backend_for("qwen2_vl")
    monkeypatch.setattr(backend.model.generation_config, "repetition_penalty", 3.0)
    ref = Reference(tiny_model_path("qwen2_vl"))
    sample = samples()[0]
    d = defenses.build("coca:alpha=1")
    d.observer = steps = Steps()
    d.generate(backend, [sample], EXACT)
    assert steps.tokens() == reference_decode(ref, sample, d.principle, 1.0)[0]


def test_contrast_options():
    lp = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    l0 = torch.tensor([[2.5, 0.0, 0.0, -3.0]])
    torch.testing.assert_close(contrast_logits(lp, l0, 4.0), torch.tensor([[0.0, 5.0, 0.0, -3.0]]))
    torch.testing.assert_close(contrast_logits(lp, l0, 4.0, base="plain"), torch.tensor([[0.5, 4.0, 0.0, -3.0]]))
    torch.testing.assert_close(contrast_logits(lp, l0, 0.0), lp)
    # β = 0.3: p_P of token 1 is e^-1 ≈ 0.37 of the top one (kept), token 2 e^-2 ≈ 0.14 (dropped)
    masked = contrast_logits(lp, l0, 4.0, plausibility=0.3)
    assert masked[0, :2].tolist() == [0.0, 5.0] and masked[0, 2:].tolist() == [-math.inf, -math.inf]
    # a banned token takes no part in the plausibility maximum: token 1 becomes the top one
    banned = contrast_logits(lp, l0, 4.0, plausibility=0.3, banned=[0])
    assert banned[0].tolist() == [-math.inf, 5.0, 0.0, -math.inf]


# ---- batching, EOS, inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_batched_equals_one_at_a_time(arch, tiny_backend_for):
    backend = tiny_backend_for(arch)
    d = defenses.build("coca:alpha=3")
    items = samples()  # different lengths, images and text-only mixed: left padding across 2B rows
    params = GenerationParams(max_new_tokens=6)
    batched = d.generate(backend, items, params)
    for s, g in zip(items, batched):
        single = d.generate(backend, [s], params)[0]
        assert g.output == single.output and g.tokens == single.tokens
        assert {k: g.trace[k] for k in ("steps", "changed_vs_principled", "changed_vs_plain")} == \
               {k: single.trace[k] for k in ("steps", "changed_vs_principled", "changed_vs_plain")}
    assert batched[1].trace["steps"] >= 1 and batched[1].prompt[0]["content"][0]["type"] == "text"  # text-only


def test_each_row_stops_at_its_own_eos(tiny_backend_for, monkeypatch):
    backend = tiny_backend_for("llava")
    eos = backend.tokenizer.eos_token_id
    items = samples()[:3]
    d = defenses.build("coca")
    params = GenerationParams(max_new_tokens=6)
    alone = d.generate(backend, [items[2]], params)[0]
    real_pick, calls = coca_module.pick, {"n": 0}

    def pick_with_eos(scores, gen_params, generator):
        chosen = real_pick(scores, gen_params, generator)
        calls["n"] += 1
        if calls["n"] == 2:  # the second step: row 0 ends
            chosen[0] = eos
        return chosen

    monkeypatch.setattr(coca_module, "pick", pick_with_eos)
    d.observer = steps = Steps(row=0)
    gens = d.generate(backend, items, params)
    assert gens[0].trace["steps"] == 2 and gens[0].tokens["completion"] == 2  # its EOS counted, nothing after
    assert gens[0].output == backend.tokenizer.decode(steps.tokens()[:1], skip_special_tokens=True)
    assert gens[2].output == alone.output and gens[2].trace["steps"] == alone.trace["steps"]
    assert gens[2].trace["batch_forwards"] >= gens[0].trace["steps"]


def test_min_new_tokens_bars_eos_and_sampling_is_seeded(tiny_backend_for):
    backend = tiny_backend_for("llava")
    eos = backend.tokenizer.eos_token_id
    d = defenses.build("coca")
    d.observer = steps = Steps()
    d.generate(backend, samples()[:2], GenerationParams(max_new_tokens=4, min_new_tokens=3))
    assert [bool(s[2][eos] == -math.inf) for s in steps.seen] == [True, True, True, False][: len(steps.seen)]
    d.observer = None
    sampled = GenerationParams(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9, seed=3)
    a, b = (d.generate(backend, samples()[:2], sampled) for _ in range(2))
    assert [g.output for g in a] == [g.output for g in b] and a[0].trace["decoding"] == "sample"


# ---- requests, parameters, refusal ------------------------------------------------------------------
def test_defaults_and_parameters():
    d = defenses.build("coca")
    p = d.params
    assert (p.alpha, p.base, p.placement, p.plausibility, p.principle_file) == (4.0, "principled", "prefix", 0.0, None)
    assert d.principle == DEFAULT_PRINCIPLE != OSB_PRINCIPLE
    assert "illegal" in DEFAULT_PRINCIPLE and "harm" in DEFAULT_PRINCIPLE
    assert len(d.identity()["principle_sha256"]) == 16
    for bad in ("coca:plausibility=1.5", "coca:base=other", "coca:placement=middle", "coca:alpha=nan"):
        with pytest.raises(SpecError):
            defenses.build(bad)
    sample = Sample("x", "what is this?", image=None)
    assert d.principled_request(sample).messages[-1]["content"][-1]["text"] == f"{DEFAULT_PRINCIPLE} what is this?"
    suffix = defenses.build("coca:placement=suffix").principled_request(sample)
    assert suffix.messages[-1]["content"][-1]["text"] == f"what is this? {DEFAULT_PRINCIPLE}"
    system = defenses.build("coca:placement=system").principled_request(sample)
    assert system.messages[0]["role"] == "system" and system.messages[-1]["content"][-1]["text"] == "what is this?"


def test_principle_file_loads(tmp_path, tiny_backend_for):
    path = tmp_path / "principle.txt"
    path.write_text(OSB_PRINCIPLE + "\n", encoding="utf-8")
    d = defenses.build(f"coca:principle_file={path}")
    assert d.principle == OSB_PRINCIPLE
    assert d.identity()["principle_sha256"] != defenses.build("coca").identity()["principle_sha256"]
    gen = d.generate(tiny_backend_for("llava"), samples()[1:2], GenerationParams(max_new_tokens=2))[0]
    assert gen.prompt[-1]["content"][-1]["text"].startswith(OSB_PRINCIPLE + " ")
    assert gen.trace["principle_sha256"] == d.identity()["principle_sha256"]
    with pytest.raises(SpecError, match="not both"):
        defenses.build(f"coca:principle_file={path},principle=be nice")


class ApiLike(Backend):
    def generate(self, requests: list[Request], params: GenerationParams, edits=None) -> list[Completion]:
        return [Completion("ok") for _ in requests]

    def identity(self):
        return {"backend": "api-like"}


def test_a_non_hf_backend_is_refused():
    d = defenses.build("coca")
    with pytest.raises(CapabilityError, match="next-token logits.*use an HF model"):
        d.generate(ApiLike(), samples()[:1], EXACT)
    from harness.runner import Plan

    config = RunConfig(models=["openai:model=x,base_url=http://127.0.0.1:1/v1"], defenses=["coca"],
                       tasks=["organism:templates=1"])
    with pytest.raises(CapabilityError, match="coca"):
        Plan.build(config)
