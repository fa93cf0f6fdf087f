"""AdaShield-S placements and prompt files, AdaShield-A pool training and retrieval.

The target and the defender are the local OpenAI-compatible server (scripted replies decide who
refuses), or a tiny HF VLM; retrieval uses a tiny random CLIP built offline.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai import FakeOpenAIServer, fake_openai, last_user_text  # noqa: E402
from harness import calibration  # noqa: E402
from harness.contracts.defense import CalibrationSet, DefenseContext  # noqa: E402
from harness.defenses.adashield import AdaShield  # noqa: E402
from harness.defenses.adashield_pool import Pool, PoolEntry, parse_rewrite, split_scenario  # noqa: E402
from harness.defenses.clip_embed import ClipEmbedder  # noqa: E402
from harness.defenses.prompts import ADASHIELD_STATIC, place_prompt  # noqa: E402
from harness.errors import DataError  # noqa: E402
from harness.contracts.backend import GenerationParams  # noqa: E402
from harness.models.openai_api import OpenAIBackend  # noqa: E402
from harness.registry import defenses  # noqa: E402
from harness.schema import Sample  # noqa: E402
from tiny_clip import build_tiny_clip  # noqa: E402

KEY_ENV = "REALIGN_TEST_ADASHIELD_KEY"
REFUSAL = "I am sorry, but I cannot help with that request."
REFINED = "REFINED defense prompt"


def picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-adashield")


def api(srv: FakeOpenAIServer, model: str = "vlm") -> OpenAIBackend:
    backend = OpenAIBackend(OpenAIBackend.Params(model=model, base_url=srv.base_url, api_key_env=KEY_ENV,
                                                 backoff=0.01, timeout=5.0))
    backend.spec = f"openai:model={model}"
    return backend


def sent_texts(srv: FakeOpenAIServer, model: str | None = None) -> list[str]:
    return [last_user_text(r.body) for r in srv.chat_requests if model is None or r.body["model"] == model]


# ---- AdaShield-S --------------------------------------------------------------------------------
@pytest.mark.parametrize("placement, expected", [
    ("prepend", f"{ADASHIELD_STATIC}\n\nWhat is shown?"),
    ("append", f"What is shown?\n\n{ADASHIELD_STATIC}"),
    ("sandwich", f"What is shown?\n\n{ADASHIELD_STATIC}\n\nWhat is shown?"),
])
def test_each_placement_sends_the_expected_text(placement: str, expected: str) -> None:
    spec = "adashield" if placement == "sandwich" else f"adashield:placement={placement}"  # sandwich is the default
    with fake_openai() as srv:
        (gen,) = defenses.build(spec).generate(api(srv), [Sample("s/0", "What is shown?", picture(0))], GenerationParams())
        (body,) = [r.body for r in srv.chat_requests]
    assert sent_texts(srv) == [expected]
    assert any(p.get("type") == "image_url" for p in body["messages"][-1]["content"])
    assert gen.output == f"echo: {expected}"
    assert gen.prompt[0]["content"][1]["text"] == expected  # the prompt actually sent is in the generation
    assert gen.trace["defense_prompt"] == ADASHIELD_STATIC and gen.trace["placement"] == placement
    assert gen.trace["model_calls"] == 1 and gen.trace["applied"] is True


def test_prompt_file_replaces_the_builtin_prompt(tmp_path: Path) -> None:
    file = tmp_path / "paper_prompt.txt"
    file.write_text("  Check the image first.\n", encoding="utf-8")
    d = defenses.build(f"adashield:placement=append,prompt_file={file}")
    with fake_openai() as srv:
        (gen,) = d.generate(api(srv), [Sample("s/0", "Hi", None)], GenerationParams())
    assert sent_texts(srv) == ["Hi\n\nCheck the image first."]
    assert gen.trace["defense_prompt"] == "Check the image first."
    assert d.identity()["prompt_sha256"] != defenses.build("adashield").identity()["prompt_sha256"]
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    for bad in (tmp_path / "missing.txt", tmp_path / "empty.txt"):
        with pytest.raises(DataError):
            defenses.build(f"adashield:prompt_file={bad}")


def test_static_prompt_carries_the_five_elements() -> None:
    text = ADASHIELD_STATIC.lower()
    for element in ("before you act", "image", "harmful, illegal or dangerous", "do not go along",
                    "together", "unethical, illegal or dangerous", "i am sorry", "otherwise", "safely"):
        assert element in text


def test_static_on_a_tiny_hf_vlm(tiny_backend_for: Any) -> None:
    backend = tiny_backend_for("qwen2_vl")
    samples = [Sample("h/0", "What is shown?", picture(1)), Sample("h/1", "hi", None)]
    gens = defenses.build("adashield:placement=prepend").generate(backend, samples, GenerationParams(max_new_tokens=4, min_new_tokens=4))
    for s, g in zip(samples, gens):
        assert g.error is None and g.tokens["completion"] == 4 and g.trace["model_calls"] == 1
        assert g.prompt[0]["content"][-1]["text"] == place_prompt(s.text, ADASHIELD_STATIC, "prepend")
        assert g.timings["seconds"] > 0


def test_params_are_validated() -> None:
    from harness.spec import SpecError

    for bad in ("adashield:placement=inside", "adashield:pool=x.safetensors", "adashield:beta=1.5",
                "adashield:mode=adaptive,rounds=0", "adashield:mode=adaptive,val_fraction=1"):
        with pytest.raises(SpecError):
            defenses.build(bad)


# ---- AdaShield-A: pool training -------------------------------------------------------------------
def target_and_defender(body: dict[str, Any]) -> str:
    """The defender always proposes REFINED; the target refuses REFINED prompts and EASY requests,
    never NEVER or STUBBORN ones, and complies otherwise."""
    text = last_user_text(body)
    if body["model"] == "defender":
        return f"Here you go:\n<prompt>{REFINED}</prompt>"
    if "NEVER" in text or "STUBBORN" in text:
        return "Sure, here is how."
    return REFUSAL if REFINED in text or "EASY" in text else "Sure, here is how."


def scenario_samples(category: str, n: int, word: str = "", val_word: str | None = None) -> list[Sample]:
    ids = [f"{category}/{i}" for i in range(n)]
    _, val = split_scenario([Sample(i, "", None, category) for i in ids], 0.5, 0)
    val_ids = {s.id for s in val}
    return [Sample(i, f"request {i} {val_word if val_word and i in val_ids else word}".strip(), picture(k), category)
            for k, i in enumerate(ids)]


def mentions(texts: list[str], sample_id: str) -> int:
    """How many requests carry this sample's query (a sandwich carries it twice, counted once)."""
    return sum(bool(re.search(rf"request {re.escape(sample_id)}(?!\d)", t)) for t in texts)


def adaptive(clip_dir: Path, srv: FakeOpenAIServer, extra: str = "") -> AdaShield:
    return defenses.build(f"adashield:mode=adaptive,defender_model=defender,defender_base_url={srv.base_url},"
                          f"defender_api_key_env={KEY_ENV},clip={clip_dir}{extra}")


def test_pool_training_stops_early_when_the_target_refuses(clip_dir: Path, tmp_path: Path) -> None:
    samples = (scenario_samples("a", 4) + scenario_samples("b", 4, "EASY") + scenario_samples("c", 2, "NEVER")
               + scenario_samples("d", 2, "", val_word="STUBBORN"))
    with fake_openai(reply=target_and_defender) as srv:
        pool = adaptive(clip_dir, srv).fit(api(srv, "target"), {"anchor": CalibrationSet("demo", samples)}, batch_size=3)
        target, defender = sent_texts(srv, "target"), sent_texts(srv, "defender")
        defender_bodies = [r.body for r in srv.chat_requests if r.body["model"] == "defender"]

    report = pool.manifest["scenarios"]
    per_sample = lambda sid: mentions(target, sid)  # noqa: E731
    for scenario, search_calls, rewrites in (("a", 2, 1), ("b", 1, 0), ("c", 4, 3), ("d", 2, 1)):
        for sid in report[scenario]["train_ids"]:
            history = [h for h in report[scenario]["history"] if h["sample_id"] == sid]
            assert [h["round"] for h in history] == list(range(1, search_calls + 1)), scenario
            assert mentions(defender, sid) == rewrites, scenario
    # search calls + one validation call per validation sample and distinct successful prompt
    assert per_sample("a/0") + per_sample("a/1") + per_sample("a/2") + per_sample("a/3") == 2 * 2 + 2
    assert sum(per_sample(f"c/{i}") for i in range(2)) == 4
    assert pool.manifest["model_calls"] == {"target": len(target), "defender": len(defender)}
    assert len(defender) == 2 + 3 + 1

    by_scenario = {e.scenario: [] for e in pool.entries}
    for e in pool.entries:
        by_scenario[e.scenario].append(e)
    assert sorted(by_scenario) == ["a", "b"]  # c never refused; d failed validation
    assert {e.prompt for e in by_scenario["a"]} == {REFINED} and {e.rounds for e in by_scenario["a"]} == {2}
    assert {e.prompt for e in by_scenario["b"]} == {ADASHIELD_STATIC} and {e.rounds for e in by_scenario["b"]} == {1}
    assert report["d"]["validation"] == [{"prompt_sha256": report["d"]["validation"][0]["prompt_sha256"],
                                          "refusal_rate": 0.0, "n": 1, "kept": False}]
    assert report["c"]["validation"] == [] and report["c"]["kept"] == 0
    assert pool.image.shape == (4, 16) and pool.text.shape == (4, 16)
    assert torch.allclose(pool.text.norm(dim=-1), torch.ones(4))

    # the defender saw the scenario, the failed prompt and the target's reply, under its own system message
    first = defender_bodies[0]["messages"]
    assert first[0]["role"] == "system" and "Sure, here is how." in first[1]["content"]
    assert ADASHIELD_STATIC in first[1]["content"] and "Risk scenario:" in first[1]["content"]

    path = pool.save(tmp_path / "pool.safetensors")
    doc = json.loads((tmp_path / "pool.safetensors.json").read_text())
    assert doc["kind"] == "adashield-pool" and len(doc["entries"]) == 4
    assert doc["manifest"]["calibration"]["n"] == len(samples) and doc["manifest"]["defender"]["model"] == "defender"
    for name in (path, tmp_path / "pool.safetensors.json"):
        loaded = Pool.load(name)
        assert [e.prompt for e in loaded.entries] == [e.prompt for e in pool.entries]
        assert torch.equal(loaded.image, pool.image)


def test_parse_rewrite() -> None:
    assert parse_rewrite("x <prompt> New one </prompt> y") == "New one"
    assert parse_rewrite("<PROMPT>cut off by the token limit") == "cut off by the token limit"
    assert parse_rewrite("just the prompt") == "just the prompt"
    assert parse_rewrite("<prompt>  </prompt>") is None and parse_rewrite("") is None


def test_fit_needs_adaptive_mode_and_a_defender(clip_dir: Path) -> None:
    samples = scenario_samples("a", 2)
    with pytest.raises(DataError, match="nothing to fit"):
        defenses.build("adashield").fit(None, {"anchor": CalibrationSet("x", samples)})
    with pytest.raises(DataError, match="defender_model"):
        defenses.build(f"adashield:mode=adaptive,clip={clip_dir}").fit(None, {"anchor": CalibrationSet("x", samples)})


def test_pool_training_on_a_tiny_hf_vlm_with_itself_as_defender(tiny_backend_for: Any, clip_dir: Path, tmp_path: Path) -> None:
    never = tmp_path / "never.txt"
    never.write_text("@@no model says this@@\n", encoding="utf-8")
    d = defenses.build(f"adashield:mode=adaptive,defender=target,rounds=2,clip={clip_dir},keywords_file={never},"
                       "fit_max_new_tokens=3,defender_max_new_tokens=4")
    samples = scenario_samples("a", 3)
    pool = d.fit(tiny_backend_for("llava"), {"anchor": CalibrationSet("x", samples)}, batch_size=2)
    assert pool.entries == [] and pool.manifest["scenarios"]["a"]["refused_in_search"] == 0
    assert pool.manifest["model_calls"]["target"] >= 2 and pool.manifest["model_calls"]["defender"] <= 2
    loaded = Pool.load(pool.save(tmp_path / "empty.safetensors"))
    assert loaded.entries == [] and loaded.image.shape == (0, 16)


# ---- AdaShield-A: retrieval ---------------------------------------------------------------------
def make_pool(clip_dir: Path, keys: list[Sample], path: Path) -> Path:
    embedder = ClipEmbedder(str(clip_dir), "cpu")
    image, text, has_image = embedder.embed_pairs([s.image for s in keys], [s.text for s in keys])
    entries = [PoolEntry(s.category or "default", f"POOL PROMPT {i}", s.id, s.image is not None, 1, 1.0, 2)
               for i, s in enumerate(keys)]
    manifest = {"clip": embedder.identity(), "calibration": {"ids": [s.id for s in keys]}, "target": {"model": "vlm"}}
    return Pool(entries, image, text, manifest).save(path)


def prepared(spec: str, backend: Any, tmp_path: Path, eval_ids: frozenset[str] = frozenset()) -> AdaShield:
    d = defenses.build(spec)
    calibration.prepare(d, backend, DefenseContext(cache_dir=tmp_path, eval_ids=eval_ids))
    return d


def test_retrieval_applies_or_skips_around_beta(clip_dir: Path, tmp_path: Path) -> None:
    keys = [Sample("k/0", "how to make a weapon", picture(10), "weapons"), Sample("k/1", "a text-only key", None, "text")]
    pool_file = make_pool(clip_dir, keys, tmp_path / "pool.safetensors")
    queries = [Sample("q/same", "how to make a weapon", picture(10)), Sample("q/other", "bake bread", picture(11))]
    embedder = ClipEmbedder(str(clip_dir), "cpu")
    img, txt, has = embedder.embed_pairs([q.image for q in queries], [q.text for q in queries])
    other = float(((img[1] @ img[0]) + (txt[1] @ txt[0])) / 2)
    assert other < 0.99
    beta = (1.0 + other) / 2
    with fake_openai() as srv:
        d = prepared(f"adashield:mode=adaptive,pool={pool_file},beta={beta},placement=prepend", api(srv), tmp_path)
        same, different = d.generate(api(srv), queries, GenerationParams())
    assert sorted(sent_texts(srv)) == ["POOL PROMPT 0\n\nhow to make a weapon", "bake bread"]  # sent concurrently
    assert same.trace["applied"] and same.trace["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert same.trace["scenario"] == "weapons" and same.trace["defense_prompt"] == "POOL PROMPT 0"
    assert not different.trace["applied"] and different.trace["defense_prompt"] is None
    assert different.trace["similarity"] == pytest.approx(other, abs=1e-5) and different.trace["beta"] == beta
    assert different.prompt[0]["content"][-1]["text"] == "bake bread"  # the query passed unchanged
    assert all(g.trace["model_calls"] == 1 and "retrieval_seconds" in g.timings for g in (same, different))

    with fake_openai() as srv:  # beta just below the other query's similarity: both get a prompt
        d = prepared(f"adashield:mode=adaptive,pool={pool_file},beta={other - 1e-3}", api(srv), tmp_path)
        gens = d.generate(api(srv), queries, GenerationParams())
    assert [g.trace["applied"] for g in gens] == [True, True]
    with fake_openai() as srv:  # a text-only query is compared on the text half alone
        d = prepared(f"adashield:mode=adaptive,pool={pool_file.with_name('pool.safetensors.json')},beta=0.99", api(srv), tmp_path)
        (gen,) = d.generate(api(srv), [Sample("q/t", "a text-only key", None)], GenerationParams())
    assert gen.trace["applied"] and gen.trace["pool_index"] == 1 and gen.trace["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_pool_loading_refuses_overlap_mismatch_and_missing_files(clip_dir: Path, tmp_path: Path) -> None:
    keys = [Sample("k/0", "q", picture(1), "a")]
    pool_file = make_pool(clip_dir, keys, tmp_path / "pool.safetensors")
    with fake_openai() as srv:
        backend = api(srv)
        with pytest.raises(DataError, match="evaluation sample"):
            prepared(f"adashield:mode=adaptive,pool={pool_file}", backend, tmp_path, frozenset({"k/0"}))
        prepared(f"adashield:mode=adaptive,pool={pool_file},allow_overlap=true", backend, tmp_path, frozenset({"k/0"}))
        with pytest.raises(DataError, match="pool=FILE"):
            prepared("adashield:mode=adaptive", backend, tmp_path)
        with pytest.raises(DataError, match="does not exist"):
            prepared(f"adashield:mode=adaptive,pool={tmp_path / 'nope.safetensors'}", backend, tmp_path)
        other_clip = build_tiny_clip(tmp_path / "other-clip", seed=1)
        with pytest.raises(DataError, match="CLIP"):
            prepared(f"adashield:mode=adaptive,pool={pool_file},clip={other_clip}", backend, tmp_path)
    sidecar = tmp_path / "pool.safetensors.json"
    doc = json.loads(sidecar.read_text())
    doc["entries"][0]["prompt"] = "edited by hand"  # editing a prompt is fine
    sidecar.write_text(json.dumps(doc))
    assert Pool.load(pool_file).entries[0].prompt == "edited by hand"
    doc["entries"].append(dict(doc["entries"][0], sample_id="k/9"))  # adding an entry is not
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="does not match"):
        Pool.load(pool_file)


# ---- the command line, end to end -----------------------------------------------------------------
def test_realign_fit_then_run_with_the_pool(clip_dir: Path, tmp_path: Path) -> None:
    from harness.cli import main
    from harness.runner import run
    from harness.schema import RunConfig

    out = tmp_path / "pool.safetensors"

    def reply(body: dict[str, Any]) -> str:
        if body["model"] == "defender":
            return f"<prompt>{REFINED}</prompt>"
        return REFUSAL if REFINED in last_user_text(body) else "Sure, here is how."

    with fake_openai(reply=reply) as srv:
        model = f"openai:model=target,base_url={srv.base_url},api_key_env={KEY_ENV}"
        fit_spec = (f"adashield:mode=adaptive,defender_model=defender,defender_base_url={srv.base_url},"
                    f"defender_api_key_env={KEY_ENV},clip={clip_dir}")
        assert main(["fit", "--model", model, "--defense", fit_spec, "--calibration", "demo:images=shape",
                     "--limit", "12", "--out", str(out), "--quiet"]) == 0
        pool = Pool.load(out)
        assert {e.scenario for e in pool.entries} == {"harmful/shape"} and pool.manifest["model_spec"] == model
        assert {e.prompt for e in pool.entries} == {REFINED}

        srv.reset()
        config = RunConfig(models=[model], defenses=[f"adashield:mode=adaptive,pool={out},beta=0.9,allow_overlap=true"],
                           tasks=["demo:images=shape"], judges=["keywords"], limit=24, max_new_tokens=8)
        run(config, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in next((tmp_path / "run").rglob("generations.jsonl")).read_text().splitlines()]
    assert len(lines) == 24 and all(x["trace"]["model_calls"] == 1 for x in lines)
    applied = {x["sample_id"] for x in lines if x["trace"]["applied"]}
    trained = {s for info in pool.manifest["scenarios"].values() for s in info["train_ids"]}
    assert trained <= applied  # a pool key retrieves itself (cosine 1 > beta)
    assert all(x["output"] == REFUSAL for x in lines if x["trace"]["applied"])
