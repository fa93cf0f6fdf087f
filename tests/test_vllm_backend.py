"""The `vllm` backend through its real code path, with a stand-in `vllm` module put into sys.modules:
the stand-in records what the backend hands the engine (LLM arguments, chat conversations, sampling
settings) and answers with RequestOutput-shaped objects. What is checked is the backend's side of
the contract; vLLM's own chat templates and kernels are not run here."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from harness.cli import main
from harness.contracts.backend import (Edits, GenerationParams, LogitLens, Request, Steerable, TokenLogprobs,
                                       user_request)
from harness.errors import CapabilityError, ModelLoadError
from harness.models.resolve import load_backend, resolve_backend
from harness.models.vllm_engine import VLLMBackend, request_seed
from harness.runner import Plan
from harness.schema import RunConfig
from harness.spec import SpecError

VOCAB = {"Yes": 11, "No": 12, "yes": 13, "no": 14, "Sure": 15}


@dataclass
class FakeLogprob:
    logprob: float
    rank: int = 1
    decoded_token: str = ""


@dataclass
class FakeSequence:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]] | None = None


@dataclass
class FakeOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeSequence] = field(default_factory=list)


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [VOCAB.get(w, 99) for w in text.split()]}


class FakeLLM:
    """Answers "echo: <last text part>"; counts a prompt token per word and 7 per image; rejects
    (ValueError, as vLLM does for an over-long prompt) any conversation mentioning TOO-LONG."""

    instances: list[FakeLLM] = []
    rejection: type[Exception] = ValueError  # what vLLM up to ~0.10 raises; later, vllm.exceptions.VLLMClientError

    def __init__(self, **kwargs: Any) -> None:
        if kwargs["model"] == "broken/model":
            raise ValueError("Model architectures ['Nope'] are not supported for now.\nSupported: ...")
        self.kwargs = kwargs
        self.calls: list[tuple[list[list[dict[str, Any]]], list[FakeSamplingParams]]] = []
        self.model_config = types.SimpleNamespace(dtype="torch.bfloat16", max_model_len=kwargs.get("max_model_len", 4096))
        FakeLLM.instances.append(self)

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    def chat(self, messages: list[list[dict[str, Any]]], sampling_params: list[FakeSamplingParams],
             use_tqdm: bool = True) -> list[FakeOutput]:
        assert use_tqdm is False and isinstance(sampling_params, list) and len(sampling_params) == len(messages)
        self.calls.append((messages, sampling_params))
        outputs = []
        for conversation, sp in zip(messages, sampling_params):
            parts = [p for m in conversation for p in (m["content"] if isinstance(m["content"], list)
                                                       else [{"type": "text", "text": m["content"]}])]
            texts = [p["text"] for p in parts if p["type"] == "text"]
            if any("TOO-LONG" in t for t in texts):
                raise self.rejection("The decoder prompt (length 9999) is longer than the maximum model length")
            images = [p for p in parts if p["type"] == "image_pil"]
            prompt = sum(len(t.split()) for t in texts) + 7 * len(images)
            if sp.kwargs.get("logprobs"):
                step = {11: FakeLogprob(-0.25), 12: FakeLogprob(-1.5), 15: FakeLogprob(-3.0)}
                outputs.append(FakeOutput(list(range(prompt)), [FakeSequence("Yes", [11], [step])]))
                continue
            reply = f"echo: {texts[-1]}"
            n = min(len(reply.split()), sp.kwargs["max_tokens"])
            outputs.append(FakeOutput(list(range(prompt)), [FakeSequence(" ".join(reply.split()[:n]), list(range(n)))]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    module.__version__ = "0.0-fake"  # type: ignore[attr-defined]
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def build(spec: str = "vllm:model=org/tiny-vlm") -> VLLMBackend:
    backend = load_backend(spec)
    assert isinstance(backend, VLLMBackend)
    return backend


def test_engine_arguments_and_capabilities(fake_vllm):
    backend = build("vllm:model=org/tiny-vlm,revision=abc123,dtype=bfloat16,tensor_parallel_size=2,"
                    "max_model_len=2048,gpu_memory_utilization=0.5,max_images=2,seed=7,enforce_eager=true")
    assert backend.llm.kwargs == {
        "model": "org/tiny-vlm", "revision": "abc123", "dtype": "bfloat16", "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5, "seed": 7, "trust_remote_code": False, "enforce_eager": True,
        "limit_mm_per_prompt": {"image": 2}, "max_model_len": 2048,
    }
    assert build("vllm:model=m,logprobs=50").llm.kwargs["max_logprobs"] == 50
    assert issubclass(VLLMBackend, TokenLogprobs)
    assert not issubclass(VLLMBackend, Steerable) and not issubclass(VLLMBackend, LogitLens)
    entry, params = resolve_backend("vllm:model=m", {"dtype": "float16", "device": "cpu"})  # --dtype applies
    assert entry.cls is VLLMBackend and params.dtype == "float16"


@pytest.mark.parametrize("spec, match", [
    ("vllm:model=m,tensor_parallel_size=0", "tensor_parallel_size"),
    ("vllm:model=m,gpu_memory_utilization=1.5", "gpu_memory_utilization"),
    ("vllm:model=m,dtype=float64", "float64"),
    ("vllm:model=m,tp=2", "no parameter 'tp'"),
    ("vllm:", "needs parameter"),
])
def test_bad_specs_fail_at_plan_time(spec, match):
    with pytest.raises(SpecError, match=match):
        resolve_backend(spec)


def test_text_only_request_and_greedy_settings(fake_vllm):
    backend = build()
    out = backend.generate([user_request("hello there friend", system="be safe")],
                           GenerationParams(max_new_tokens=9, seed=3))
    assert out[0].error is None and out[0].text == "echo: hello there friend"
    assert out[0].prompt_tokens == 5 and out[0].completion_tokens == 4
    (conversations, settings), = backend.llm.calls
    assert conversations == [[{"role": "system", "content": [{"type": "text", "text": "be safe"}]},
                              {"role": "user", "content": [{"type": "text", "text": "hello there friend"}]}]]
    assert settings[0].kwargs == {"n": 1, "max_tokens": 9, "seed": request_seed(3, 0), "temperature": 0.0, "top_p": 1.0}


def test_sampling_settings_and_per_request_seeds(fake_vllm):
    backend = build()
    params = GenerationParams(max_new_tokens=4, min_new_tokens=2, do_sample=True, temperature=0.7, top_p=0.9, seed=5)
    backend.generate([user_request("same"), user_request("same")], params)
    first, second = (s.kwargs for s in backend.llm.calls[0][1])
    assert first["temperature"] == 0.7 and first["top_p"] == 0.9 and first["min_tokens"] == 2 and first["max_tokens"] == 4
    assert "top_k" not in first
    assert first["seed"] != second["seed"]  # identical prompts still get independent draws
    assert first["seed"] == request_seed(5, 0) and request_seed(5, 0) == request_seed(5, 0)
    assert request_seed(5, 1) != request_seed(6, 0)
    backend.generate([user_request("x")], GenerationParams(do_sample=True, temperature=0.0))
    assert backend.llm.calls[1][1][0].kwargs["temperature"] == 0.0  # temperature 0 is greedy


def test_image_requests_keep_the_image_and_its_place(fake_vllm, tmp_path: Path):
    backend = build()
    image = Image.new("RGB", (23, 17), (10, 200, 30))
    path = tmp_path / "pic.png"
    image.save(path)
    text_first = Request([{"role": "user", "content": [{"type": "text", "text": "look:"},
                                                       {"type": "image", "image": str(path)}]}])
    out = backend.generate([user_request("what is it", image=image), text_first], GenerationParams())
    assert [o.prompt_tokens for o in out] == [3 + 7, 1 + 7]
    conversations, _ = backend.llm.calls[0]
    first = conversations[0][0]["content"]
    assert [p["type"] for p in first] == ["image_pil", "text"] and first[0]["image_pil"] is image
    second = conversations[1][0]["content"]
    assert [p["type"] for p in second] == ["text", "image_pil"]
    assert second[1]["image_pil"].size == (23, 17)  # a path is loaded into a PIL image


def test_batch_order_and_per_sample_failures(fake_vllm, tmp_path: Path):
    backend = build()
    requests = [user_request(f"prompt {i}") for i in range(5)]
    requests[1] = user_request("this one is TOO-LONG")
    requests[3] = user_request("bad picture", image=tmp_path / "missing.png")  # type: ignore[arg-type]
    out = backend.generate(requests, GenerationParams())
    assert [o.text for o in out] == ["echo: prompt 0", "", "echo: prompt 2", "", "echo: prompt 4"]
    assert "longer than the maximum model length" in out[1].error and "missing.png" in out[3].error
    assert all(o.error is None for o in (out[0], out[2], out[4]))
    seeds = [c[1][0].kwargs["seed"] for c in backend.llm.calls[1:]]  # retried one at a time, same seeds
    assert seeds == [request_seed(0, i) for i in (0, 1, 2, 4)]
    assert backend.generate([], GenerationParams()) == []


def test_rejections_of_recent_vllm_versions_fail_one_sample(fake_vllm, monkeypatch: pytest.MonkeyPatch):
    class VLLMClientError(Exception):  # recent vLLM: a request error that is not a ValueError
        pass

    exceptions = types.ModuleType("vllm.exceptions")
    exceptions.VLLMClientError = VLLMClientError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.exceptions", exceptions)
    monkeypatch.setattr(FakeLLM, "rejection", VLLMClientError)
    out = build().generate([user_request("fine"), user_request("TOO-LONG")], GenerationParams())
    assert out[0].text == "echo: fine" and out[1].error.startswith("VLLMClientError: The decoder prompt")


def test_next_token_logprobs(fake_vllm):
    backend = build("vllm:model=m,logprobs=5")
    scores = backend.next_token_logprobs([user_request("is it harmful?"), user_request("TOO-LONG")],
                                         ["Yes", "No", "yes"])
    assert scores[0] == {"Yes": -0.25, "No": -1.5, "yes": float("-inf")}  # "yes" is not among the top 5
    assert all(v != v for v in scores[1].values())  # a rejected request: NaN for each candidate
    setting = backend.llm.calls[0][1][0].kwargs
    assert setting == {"n": 1, "max_tokens": 1, "temperature": 0.0, "logprobs": 5}


def test_identity(fake_vllm, tmp_path: Path):
    ident = build("vllm:model=org/tiny-vlm,revision=r1,tensor_parallel_size=4").identity()
    assert ident == {"backend": "vllm", "model": "org/tiny-vlm", "revision": "r1", "dtype": "bfloat16",
                     "tensor_parallel_size": 4, "max_model_len": 4096, "vllm": "0.0-fake"}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    first = build(f"vllm:model={folder}").identity()["folder_hash"]
    (folder / "model.safetensors").write_bytes(b"\1" * 64)
    assert len(first) == 12 and build(f"vllm:model={folder}").identity()["folder_hash"] != first


def test_errors_without_the_engine_or_a_model(fake_vllm, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"vLLM cannot load model 'broken/model': Model architectures") as err:
        build("vllm:model=broken/model")
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        build(f"vllm:model={tmp_path / 'empty'}")
    with pytest.raises(CapabilityError, match="cannot be steered"):
        build().generate([user_request("x")], GenerationParams(), edits=Edits(vectors={}))
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"not installed.*pip install 'realign\[vllm\]'") as err:
        build()
    assert "\n" not in str(err.value)

    class Broken(types.ModuleType):  # installed, but its lazy imports fail (e.g. a torch it was not built for)
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("operator torchvision::nms\ndoes not exist")

    monkeypatch.setitem(sys.modules, "vllm", Broken("vllm"))
    with pytest.raises(ModelLoadError, match=r"installed but does not import: operator torchvision::nms does not") as err:
        build()
    assert "\n" not in str(err.value)
    resolve_backend("vllm:model=m")  # planning needs no vLLM


@pytest.mark.parametrize("defense, match", [
    ("cmrm", "steering"), ("shiftdc", "steering"), ("refusal_dir:direction=x.safetensors", "steering"),
    ("hiddendetect:layers=all,threshold=0.2", "logit lens"), ("coca", "next-token logits"),
    ("eta", "next-token logits"),
])
def test_hidden_state_defenses_refuse_it_at_plan_time(monkeypatch: pytest.MonkeyPatch, defense, match):
    monkeypatch.setitem(sys.modules, "vllm", None)  # refused before anything would load
    config = RunConfig(models=["vllm:model=org/tiny-vlm"], defenses=[defense], tasks=["organism:templates=1"])
    with pytest.raises(CapabilityError, match=match) as err:
        Plan.build(config)
    assert "'vllm:model=org/tiny-vlm'" in str(err.value) and "VLLMBackend" in str(err.value)


def test_defenses_without_hidden_states_plan_on_it():
    for defense in ("none", "qguard:guard=self,threshold=0.5", "jailguard"):
        Plan.build(RunConfig(models=["vllm:model=org/tiny-vlm"], defenses=[defense], tasks=["demo"]))


def test_realign_run_end_to_end(fake_vllm, tmp_path: Path):
    out = tmp_path / "run"
    code = main(["run", "--model", "vllm:model=org/tiny-vlm,tensor_parallel_size=2", "--task", "demo",
                 "--judge", "keywords", "--limit", "5", "--batch-size", "2", "--max-new-tokens", "6",
                 "--out", str(out), "--quiet"])
    assert code == 0
    (llm,) = FakeLLM.instances
    assert llm.kwargs["tensor_parallel_size"] == 2
    assert [len(messages) for messages, _ in llm.calls] == [2, 2, 1]
    records = [json.loads(line) for f in out.glob("**/generations.jsonl") for line in f.read_text().splitlines()]
    assert len(records) == 5 and all(r["output"].startswith("echo:") for r in records)
    (result,) = json.loads((out / "results.json").read_text())["results"]
    assert result["n"] == 5
    model = result["identity"]["model"]
    assert model["backend"] == "vllm" and model["vllm"] == "0.0-fake" and model["tensor_parallel_size"] == 2
