"""The HF backend on tiny LLaVA, Qwen2-VL and Idefics3 models: batching, decoding, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness.errors import ModelLoadError
from harness.contracts.backend import GenerationParams, Request, Steerable, user_request
from harness.models.hf import HFBackend, _completion_lengths
from harness.models.hf_loading import folder_fingerprint


def image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def mixed_requests() -> list[Request]:
    return [
        user_request("What is in the image?", image(0)),
        user_request("hello there", system="Answer briefly."),
        user_request("Describe the picture in detail please.", image(1, (64, 48))),
    ]


def fixed(n: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, min_new_tokens=n)


def test_registered_as_hf() -> None:
    assert HFBackend.registered_name == "hf"  # type: ignore[attr-defined]
    assert issubclass(HFBackend, Steerable)  # the steering capability, checked on the class


def test_mixed_batch_is_left_padded_and_counted(tiny_backend: Any) -> None:
    requests = mixed_requests()
    batch = tiny_backend._encode(requests)
    mask = batch["attention_mask"]
    assert mask.shape[0] == 3 and bool(mask[:, -1].all())
    assert bool((mask[:, 1:] >= mask[:, :-1]).all()), "padding must be on the left only"
    assert len(set(mask.sum(1).tolist())) > 1, "the batch should need padding"

    out = tiny_backend.generate(requests, fixed(6))
    assert [c.completion_tokens for c in out] == [6, 6, 6]
    assert [c.prompt_tokens for c in out] == mask.sum(1).tolist()
    for request, completion in zip(requests, out):
        alone = tiny_backend._encode([request])["input_ids"]
        assert completion.prompt_tokens == alone.shape[1]
        assert isinstance(completion.text, str) and completion.error is None


def test_text_only_batch_and_empty_batch(tiny_backend: Any) -> None:
    out = tiny_backend.generate([user_request("hi"), user_request("a longer question here?")], fixed(3))
    assert [c.completion_tokens for c in out] == [3, 3]
    assert tiny_backend.generate([], fixed(3)) == []


def test_greedy_is_deterministic_and_batch_independent(tiny_backend: Any) -> None:
    requests = mixed_requests()
    first = tiny_backend.generate(requests, fixed(5))
    assert tiny_backend.generate(requests, fixed(5)) == first
    assert tiny_backend.generate([requests[2]], fixed(5))[0].text == first[2].text


def test_min_new_tokens_is_respected(tiny_backend: Any) -> None:
    out = tiny_backend.generate(mixed_requests(), GenerationParams(max_new_tokens=9, min_new_tokens=4))
    assert all(4 <= c.completion_tokens <= 9 for c in out)


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_backend: Any) -> None:
    requests = mixed_requests()

    def sample(seed: int) -> list[str]:
        params = GenerationParams(max_new_tokens=8, min_new_tokens=8, do_sample=True, temperature=1.0, seed=seed)
        return [c.text for c in tiny_backend.generate(requests, params)]

    state = torch.random.get_rng_state()
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_completion_length_stops_at_first_eos() -> None:
    eos, pad = 2, 0
    tokens = torch.tensor([[5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad], [5, 6, eos, eos]])
    assert _completion_lengths(tokens, [eos]) == [2, 4, 1, 3]
    assert _completion_lengths(tokens, [9, eos]) == [2, 4, 1, 3]
    assert _completion_lengths(tokens, []) == [4, 4, 4, 4]


def test_identity_describes_the_model(tiny_backend: Any) -> None:
    ident = tiny_backend.identity()
    folder = Path(tiny_backend.params.pretrained)
    assert ident["model"] == str(folder) and ident["dtype"] == "float32" and ident["device"] == "cpu"
    assert ident["model_class"] == type(tiny_backend.model).__name__
    assert ident["folder_hash"] == folder_fingerprint(folder) and len(ident["folder_hash"]) == 12
    assert {"transformers", "torch", "revision", "processor_class"} <= set(ident)
    assert tiny_backend.decoder_size().num_layers == 4 and tiny_backend.decoder_size().hidden_size == 64


def test_image_layout_falls_back_to_a_flat_list() -> None:
    """A processor that rejects per-sample lists gets one flat list, and the choice is kept."""
    calls: list[Any] = []

    def processor(images: Any, **kwargs: Any) -> str:
        calls.append(images)
        if any(isinstance(x, list) for x in images):
            raise ValueError("nested images not supported")
        return "ok"

    backend = HFBackend.__new__(HFBackend)
    backend.processor = processor
    backend._image_layout = None
    images = [["a"], [], ["b", "c"]]
    assert backend._process(images, {}) == "ok"
    assert calls == [images, ["a", "b", "c"]]
    assert backend._process(images, {}) == "ok" and calls[-1] == ["a", "b", "c"] and len(calls) == 3


# ---- loading errors ------------------------------------------------------------------------------
def text_only_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(path: str) -> HFBackend:
    return HFBackend(HFBackend.Params(pretrained=path, device="cpu"))


def test_text_only_model_is_not_a_vlm(tmp_path: Path) -> None:
    folder = text_only_model(tmp_path / "llama-text")
    with pytest.raises(ModelLoadError, match="not a vision-language model") as err:
        load(str(folder))
    assert str(folder) in str(err.value) and "llama" in str(err.value)


@pytest.mark.parametrize("name", ["missing-model-folder", "./missing", "/no/such/dir/model"])
def test_missing_path_is_a_model_load_error(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name) if not name.startswith(("/", ".")) else name
    with pytest.raises(ModelLoadError) as err:
        load(path)
    assert path in str(err.value)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="config.json") as err:
        load(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_offline_hub_id_is_a_model_load_error() -> None:
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-vlm"):
        load("no-such-org/no-such-vlm")
