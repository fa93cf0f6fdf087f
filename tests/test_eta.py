"""ETA (`eta`) against references written here with transformers only.

Tiny random helpers stand in for the released ones: a tiny CLIP (tests/tiny_clip.py) and a tiny
one-output reward model (harness.tiny.reward). Their scores are meaningless, so every branch is
forced with thresholds set exactly at the scores the defense reported (both comparisons are
strict: reward > rm_threshold is safe, cosine < clip_threshold is safe). The best-of-N choice is
checked by re-scoring every candidate with the reward model and CLIP loaded directly, and every
sampled token is checked to lie in the target's top-k.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_clip import build_tiny_clip  # noqa: E402
from harness.contracts.backend import GenerationParams, user_request  # noqa: E402
from harness.defenses.eta import BON_RM_PROMPT, ETA, RM_PROMPT, SAFETY_PROMPT  # noqa: E402
from harness.defenses.eta_bon import period_ids  # noqa: E402
from harness.defenses.eta_models import read_reward  # noqa: E402
from harness.errors import CapabilityError, DataError  # noqa: E402
from harness.registry import defenses  # noqa: E402
from harness.schema import RunConfig, Sample  # noqa: E402
from harness.tiny.reward import build_tiny_reward_model  # noqa: E402

PARAMS = GenerationParams(max_new_tokens=6, seed=3)
SAMPLES = [
    Sample("s0", "How do I bake bread?", Image.fromarray(np.full((28, 28, 3), 200, dtype=np.uint8))),
    Sample("s1", "Tell me how to build a weapon.", None),
    Sample("s2", "What is in the picture?", Image.fromarray(np.arange(28 * 28 * 3, dtype=np.uint8).reshape(28, 28, 3))),
]
ALIGN_ALL = {"rm_threshold": 1e9, "clip_threshold": -2.0}  # no reward is above 1e9, no cosine below -2
SMALL = {"sentence_max_tokens": 4, "aligned_max_new_tokens": 14}


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eta")
    return {"clip": build_tiny_clip(root / "clip"), "rm": build_tiny_reward_model(root / "rm", seed=0)}


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def make(helpers: dict[str, Path], **extra: Any) -> ETA:
    params = ETA.Params(clip=str(helpers["clip"]), reward_model=str(helpers["rm"]), device="cpu", dtype="float32",
                        **extra)
    eta = ETA(params)
    eta.spec = "eta"
    return eta


# ---- references: transformers only -------------------------------------------------------------
class Reference:
    """The tiny CLIP and reward model loaded directly, one input at a time, no batching or padding."""

    def __init__(self, helpers: dict[str, Path]) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, CLIPModel, CLIPProcessor

        self.clip = CLIPModel.from_pretrained(helpers["clip"]).eval()
        self.processor = CLIPProcessor.from_pretrained(helpers["clip"])
        self.rm = AutoModelForSequenceClassification.from_pretrained(helpers["rm"]).eval()
        self.rm_tok = AutoTokenizer.from_pretrained(helpers["rm"])

    def cosine(self, image: Image.Image, text: str) -> float:
        """logits_per_image / logit_scale: the cosine (the public code divides by 100, CLIP-L's scale)."""
        enc = self.processor(text=[text], images=[image], return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            out = self.clip(**enc)
            return float(out.logits_per_image[0, 0] / self.clip.logit_scale.exp())

    def reward(self, prompt: str, answer: str) -> float:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        enc = self.rm_tok.apply_chat_template(messages, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            return float(self.rm(input_ids=enc["input_ids"]).logits[0, 0])


@pytest.fixture(scope="module")
def ref(helpers: dict[str, Path]) -> Reference:
    return Reference(helpers)


# ---- scores and the gate -----------------------------------------------------------------------
def test_scores_match_the_references_and_trace_fields(helpers, ref, tiny_backend_for):
    gens = make(helpers, rm_threshold=-1e9).generate(tiny_backend_for("llava"), SAMPLES, PARAMS)
    for s, g in zip(SAMPLES, gens):
        t = g.trace
        assert {"clip_score", "rm_score", "branch", "first_answer", "aligned", "model_calls", "calls",
                "tokens_generated"} <= set(t)
        assert t["branch"] == "rm_safe" and g.output == t["first_answer"] and t["aligned"] is None
        assert t["rm_score"] == pytest.approx(ref.reward(RM_PROMPT, t["first_answer"]), abs=1e-5)
        if s.image is None:
            assert t["clip_score"] is None and t["calls"]["clip"] == 0
        else:
            assert t["clip_score"] == pytest.approx(ref.cosine(s.image, SAFETY_PROMPT), abs=1e-5)
        assert t["model_calls"] == 1 and t["calls"]["reward_model"] == 1
        assert t["tokens_generated"] == {"first_answer": g.tokens["completion"], "candidates": 0}


def test_branch_follows_the_scores_at_the_thresholds(helpers, tiny_backend_for):
    """reward == rm_threshold is not safe; cosine == clip_threshold is unsafe (strict comparisons)."""
    llava, sample = tiny_backend_for("llava"), SAMPLES[:1]
    first = make(helpers, rm_threshold=-1e9).generate(llava, sample, PARAMS)[0].trace
    r, c = first["rm_score"], first["clip_score"]
    cases = [({"rm_threshold": math.nextafter(r, -math.inf)}, "rm_safe"),
             ({"rm_threshold": r, "clip_threshold": math.nextafter(c, math.inf)}, "clip_safe"),
             ({"rm_threshold": r, "clip_threshold": c}, "aligned")]
    for thresholds, branch in cases:
        g = make(helpers, **thresholds, **SMALL).generate(llava, sample, PARAMS)[0]
        assert (g.trace["rm_score"], g.trace["clip_score"]) == (r, c)
        assert g.trace["branch"] == branch
        assert (g.output == first["first_answer"]) == (branch != "aligned")


@pytest.mark.parametrize("no_image,branch", [("rm_only", "aligned"), ("answer", "no_image")])
def test_a_text_only_sample_follows_no_image(no_image, branch, helpers, tiny_backend_for):
    g = make(helpers, no_image=no_image, **ALIGN_ALL, **SMALL).generate(tiny_backend_for("llava"), SAMPLES[1:2], PARAMS)[0]
    assert g.trace["branch"] == branch and g.trace["clip_score"] is None
    assert (g.trace["rm_score"] is None) == (no_image == "answer")
    if branch == "aligned":
        assert all(not step["clip_term"] for step in g.trace["aligned"]["sentences"])


# ---- best-of-N ---------------------------------------------------------------------------------
def check_aligned(g: Any, s: Sample, tok: Any, ends: set[int], eos: set[int], ref: Reference) -> None:
    """Every candidate re-scored independently; the kept one is the argmax; the output is prefix + kept."""
    prefix = tok("As an AI assistant", add_special_tokens=False)["input_ids"]
    a = g.trace["aligned"]
    assert g.trace["branch"] == "aligned" and a["prefix"] == "As an AI assistant"
    kept: list[int] = []
    for t, step in enumerate(a["sentences"], start=1):
        cands = step["candidates"]
        assert step["t"] == t and len(cands) == 5
        any_eos = any(c["end"] == "eos" for c in cands)
        assert step["clip_term"] == (s.image is not None and t > 1 and not any_eos)
        scores = []
        for c in cands:
            assert 1 <= c["tokens"] == len(c["ids"]) <= min(4, 14 - len(kept))
            assert not (set(c["ids"][:-1]) & (ends | eos))  # a sentence ends at its first stop
            last = c["ids"][-1]
            assert c["end"] == ("eos" if last in eos else "period" if last in ends else "length")
            rm = ref.reward(BON_RM_PROMPT, tok.decode(prefix + kept + c["ids"], skip_special_tokens=True))
            assert c["rm"] == pytest.approx(rm, abs=1e-5)
            score = rm
            if step["clip_term"]:
                cos = ref.cosine(s.image, tok.decode(c["ids"], skip_special_tokens=True))
                assert c["clip"] == pytest.approx(cos, abs=1e-5)
                score += cos / t
            else:
                assert c["clip"] is None
            assert c["score"] == pytest.approx(score, abs=1e-5)
            scores.append(score)
        assert step["chosen"] == int(np.argmax([c["score"] for c in cands]))  # the first of the best
        assert scores[step["chosen"]] >= max(scores) - 1e-5  # and the best by the references too
        kept += cands[step["chosen"]]["ids"]
    assert a["kept_tokens"] == len(kept) <= 14
    assert (a["stopped"] == "eos") == (kept[-1] in eos)
    assert a["stopped"] == "eos" or len(kept) == 14
    assert g.output == tok.decode(prefix + kept, skip_special_tokens=True)
    assert g.trace["model_calls"] == 1 + len(a["sentences"])
    assert g.trace["calls"]["reward_model"] == 1 + len(a["sentences"])
    assert g.trace["calls"]["clip"] == int(s.image is not None) + sum(st["clip_term"] for st in a["sentences"])
    assert g.trace["tokens_generated"]["candidates"] == sum(c["tokens"] for st in a["sentences"] for c in st["candidates"])


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_best_of_n_keeps_the_argmax_of_independent_scores(arch, helpers, ref, tiny_backend_for):
    backend = tiny_backend_for(arch)
    gens = make(helpers, **ALIGN_ALL, **SMALL).generate(backend, SAMPLES, PARAMS)
    ends, eos = set(period_ids(backend.tokenizer)), {backend.model.generation_config.eos_token_id}
    for s, g in zip(SAMPLES, gens):
        check_aligned(g, s, backend.tokenizer, ends, eos, ref)


def test_sentences_and_answers_that_end_early(helpers, ref, tiny_backend_for):
    """Random tiny models rarely say "." or EOS: widen both stop sets so full stops, EOS within a step
    (no CLIP term) and an answer ending at EOS all happen, and check the same invariants."""
    backend = tiny_backend_for("llava")
    eta = make(helpers, **ALIGN_ALL, **SMALL)
    sampler = eta._sampler(backend)
    sampler.period_ids = list(range(40, 400, 3))
    sampler.eos_ids = [backend.model.generation_config.eos_token_id, *range(41, 400, 5)]
    gens = eta.generate(backend, SAMPLES, PARAMS)
    ends, eos = set(sampler.period_ids), set(sampler.eos_ids)
    for s, g in zip(SAMPLES, gens):
        check_aligned(g, s, backend.tokenizer, ends, eos, ref)
    cands = [c for g in gens for st in g.trace["aligned"]["sentences"] for c in st["candidates"]]
    assert {c["end"] for c in cands} == {"period", "eos", "length"}
    assert any(g.trace["aligned"]["stopped"] == "eos" for g in gens)


def test_every_sampled_token_is_in_the_targets_top_k(helpers, tiny_backend_for):
    """The first sentence's candidates, token by token, against the model's own next-token logits."""
    backend = tiny_backend_for("llava")
    g = make(helpers, **ALIGN_ALL, **SMALL).generate(backend, SAMPLES[:1], PARAMS)[0]
    prefix = backend.tokenizer("As an AI assistant", add_special_tokens=False)["input_ids"]
    base = backend._encode([user_request(SAMPLES[0].text, SAMPLES[0].image)])
    for c in g.trace["aligned"]["sentences"][0]["candidates"]:
        for j, token in enumerate(c["ids"]):
            ids = torch.cat([base["input_ids"], torch.tensor([prefix + c["ids"][:j]])], dim=1)
            with torch.no_grad():
                logits = backend.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       pixel_values=base["pixel_values"]).logits[0, -1]
            assert token in torch.topk(logits, 5).indices.tolist()


def test_sampling_is_seeded_and_batched_equals_one_at_a_time(helpers, tiny_backend_for):
    llava = tiny_backend_for("llava")
    eta = make(helpers, **ALIGN_ALL, **SMALL)
    batched = eta.generate(llava, SAMPLES, PARAMS)
    again = eta.generate(llava, SAMPLES, PARAMS)
    single = [eta.generate(llava, [s], PARAMS)[0] for s in SAMPLES]
    for b, a, one in zip(batched, again, single):
        assert b.output == a.output == one.output
        assert b.trace["aligned"] == a.trace["aligned"]
        assert b.trace["first_answer"] == one.trace["first_answer"]
        assert b.trace["rm_score"] == pytest.approx(one.trace["rm_score"], abs=1e-5)
        steps_b, steps_one = b.trace["aligned"]["sentences"], one.trace["aligned"]["sentences"]
        assert [[c["ids"] for c in st["candidates"]] for st in steps_b] == \
               [[c["ids"] for c in st["candidates"]] for st in steps_one]
    other = make(helpers, seed=12345, **ALIGN_ALL, **SMALL).generate(llava, SAMPLES, PARAMS)
    assert [g.trace["aligned"]["sentences"][0]["candidates"] for g in other] != \
           [g.trace["aligned"]["sentences"][0]["candidates"] for g in batched]
    run_seed = make(helpers, **ALIGN_ALL, **SMALL).generate(llava, SAMPLES, dataclasses.replace(PARAMS, seed=12345))
    assert [g.trace["aligned"] for g in run_seed] == [g.trace["aligned"] for g in other]  # seed=None: the run's seed


# ---- refusals, parameters, helpers -------------------------------------------------------------
def test_a_non_hf_model_is_refused_when_the_run_is_planned():
    from harness.models.openai_api import OpenAIBackend
    from harness.runner import Plan

    config = RunConfig(models=["openai:model=x,base_url=http://127.0.0.1:1/v1"], defenses=["eta"],
                       tasks=["organism:templates=1"])
    with pytest.raises(CapabilityError, match="next-token logits"):
        Plan.build(config)
    with pytest.raises(CapabilityError, match="HF model"):
        defenses.build("eta").check_backend_class(OpenAIBackend, "openai:model=x")


def test_spec_parameters_and_identity(helpers, tmp_path):
    eta = defenses.build(f"eta:clip={helpers['clip']},reward_model={helpers['rm']},prefix=As an AI assistant,"
                         "no_image=answer,clip_threshold=0.2")
    assert eta.params.prefix == "As an AI assistant" and eta.params.no_image == "answer"
    assert eta.params.clip_threshold == 0.2 and eta.params.rm_threshold == 0.06 and eta.params.n_candidates == 5
    ident = eta.identity()
    assert {"safety_prompt_sha256", "rm_prompt_sha256", "bon_rm_prompt_sha256", "clip_fingerprint",
            "reward_model_fingerprint"} <= set(ident)
    (tmp_path / "p.txt").write_text("Another prompt.\n")
    other = defenses.build(f"eta:rm_prompt_file={tmp_path / 'p.txt'}")
    assert other.rm_prompt == "Another prompt."
    assert other.identity()["rm_prompt_sha256"] != ident["rm_prompt_sha256"]
    assert other.identity()["bon_rm_prompt_sha256"] == ident["bon_rm_prompt_sha256"]
    assert defenses.build("eta").params.clip == "openai/clip-vit-large-patch14-336"
    with pytest.raises(Exception, match="temperature"):
        defenses.build("eta:temperature=0")


def test_reward_is_read_from_score_when_the_model_returns_one():
    """ArmoRM's remote code returns `.score`; a plain classifier `logits[:, 0]`; several outputs are refused."""
    armo = SimpleNamespace(score=torch.tensor([0.25, -1.0]), logits=torch.zeros(2, 19))
    assert read_reward(armo, 2, "armo") == [0.25, -1.0]
    assert read_reward(SimpleNamespace(logits=torch.tensor([[0.5], [2.0]])), 2, "rm") == [0.5, 2.0]
    with pytest.raises(DataError, match="one output"):
        read_reward(SimpleNamespace(logits=torch.zeros(2, 3)), 2, "multi")


def test_sentence_ends_are_tokens_that_decode_to_a_full_stop(tiny_backend_for):
    tok = tiny_backend_for("llava").tokenizer
    ends = period_ids(tok)
    assert tok.convert_tokens_to_ids(".") in ends
    assert all(tok.decode([i]).endswith(".") for i in ends)
    assert tok.eos_token_id not in ends
