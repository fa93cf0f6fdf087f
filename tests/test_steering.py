"""Residual-stream recording and additive edits, checked against plain forward passes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness.models import steering
from harness.contracts.backend import Edits, GenerationParams, Request, user_request


def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def mixed_requests() -> list[Request]:
    return [
        user_request("What is shown here?", image(0)),
        user_request("hi", system="Answer briefly and safely."),
        user_request("Describe this image in a few more words than usual.", image(1)),
    ]


def forward(backend: Any, batch: dict[str, torch.Tensor]) -> Any:
    with torch.inference_mode():
        return backend.model(**batch, output_hidden_states=True, use_cache=False)


def hook_ids(backend: Any) -> list[tuple[int, ...]]:
    """Ids of the forward hooks on the decoder layers and LM head.

    transformers installs its own `output_hidden_states` capture hooks on the first forward that
    asks for hidden states, so "no hooks left" means "the same hooks as before".
    """
    modules = [*steering.decoder_layers(backend.model), backend.model.lm_head]
    return [tuple(m._forward_hooks) + tuple(m._forward_pre_hooks) for m in modules]


@pytest.fixture
def unhooked(tiny_backend: Any) -> Any:
    """The shared backend; after the test its hooks must be exactly those it had before."""
    forward(tiny_backend, tiny_backend._encode([user_request("warm up")]))  # install transformers' hooks
    before = hook_ids(tiny_backend)
    yield tiny_backend
    assert hook_ids(tiny_backend) == before, "a steering hook was left registered"


def vectors(backend: Any, layer: int, batch: int, scale: float = 1.0, seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: scale * torch.randn(batch, backend.decoder_size().hidden_size, generator=gen)}


# ---- recording ---------------------------------------------------------------------------------
def test_states_equal_hidden_states_of_a_plain_forward(unhooked: Any) -> None:
    requests = mixed_requests()
    layers = list(range(unhooked.decoder_size().num_layers))
    states = unhooked.last_token_states(requests, layers)
    assert states.shape == (3, len(layers), unhooked.decoder_size().hidden_size)
    assert states.dtype == torch.float32 and states.device.type == "cpu"
    hidden = forward(unhooked, unhooked._encode(requests)).hidden_states
    for k, layer in enumerate(layers[:-1]):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(states[:, k], hidden[layer + 1][:, -1].float(), atol=1e-6, rtol=0)
    reordered = unhooked.last_token_states(requests, [2, 0, 2])
    assert torch.equal(reordered, states[:, [2, 0, 2]])


def test_forward_stops_after_the_deepest_requested_layer(unhooked: Any) -> None:
    ran: list[str] = []
    handles = [
        unhooked.model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head")),
        steering.decoder_layers(unhooked.model)[-1].register_forward_hook(lambda *a: ran.append("last")),
    ]
    try:
        unhooked.last_token_states(mixed_requests(), [1, 0])
    finally:
        for h in handles:
            h.remove()
    assert ran == []


def test_a_sample_alone_matches_its_row_in_a_padded_batch(unhooked: Any) -> None:
    requests = mixed_requests()
    together = unhooked.last_token_states(requests, [0, 1, 3])
    params = GenerationParams(max_new_tokens=5, min_new_tokens=5)
    batch_out = unhooked.generate(requests, params)
    for i, request in enumerate(requests):
        alone = unhooked.last_token_states([request], [0, 1, 3])
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)
        assert unhooked.generate([request], params)[0].text == batch_out[i].text


def test_bad_layers_are_refused(unhooked: Any) -> None:
    with pytest.raises(ValueError, match="out of range"):
        unhooked.last_token_states(mixed_requests(), [unhooked.decoder_size().num_layers])
    with pytest.raises(ValueError, match="at least one"):
        unhooked.last_token_states(mixed_requests(), [])


# ---- editing -------------------------------------------------------------------------------------
ALL = frozenset({"last_prompt", "prompt", "generated"})


def test_zero_vectors_and_removed_hooks_are_bit_identical(unhooked: Any) -> None:
    requests = mixed_requests()
    batch = unhooked._encode(requests)
    base = forward(unhooked, batch)
    zeros = Edits({layer: torch.zeros(3, unhooked.decoder_size().hidden_size) for layer in (0, 2)}, ALL)
    with steering.edit_hooks(unhooked.model, zeros, batch["attention_mask"]):
        edited = forward(unhooked, batch)
    assert torch.equal(edited.logits, base.logits)
    assert torch.equal(forward(unhooked, batch).logits, base.logits)

    params = GenerationParams(max_new_tokens=6, min_new_tokens=6)
    plain = unhooked.generate(requests, params)
    assert unhooked.generate(requests, params, edits=zeros) == plain
    strong = Edits(vectors(unhooked, 1, 3, scale=50.0), ALL)
    assert unhooked.generate(requests, params, edits=strong) != plain
    assert unhooked.generate(requests, params) == plain


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_last_prompt_vector_lands_exactly_at_its_layer(unhooked: Any, layer: int) -> None:
    batch = unhooked._encode(mixed_requests())
    vec = vectors(unhooked, layer, 3)
    base = forward(unhooked, batch).hidden_states
    with steering.edit_hooks(unhooked.model, Edits(vec, frozenset({"last_prompt"})), batch["attention_mask"]):
        edited = forward(unhooked, batch).hidden_states
    for below in range(layer + 1):  # the inputs of layers 0..layer
        assert torch.equal(edited[below], base[below])
    torch.testing.assert_close(edited[layer + 1][:, -1] - base[layer + 1][:, -1], vec[layer], atol=1e-5, rtol=0)
    assert torch.equal(edited[layer + 1][:, :-1], base[layer + 1][:, :-1])
    assert not torch.equal(edited[layer + 2][:, -1], base[layer + 2][:, -1])


def test_prompt_positions_skip_padding(unhooked: Any) -> None:
    batch = unhooked._encode(mixed_requests())
    mask = batch["attention_mask"].bool()
    assert not bool(mask.all()), "the batch must contain padding"
    layer, vec = 1, vectors(unhooked, 1, 3)
    base = forward(unhooked, batch).hidden_states[layer + 1]
    with steering.edit_hooks(unhooked.model, Edits(vec, frozenset({"prompt"})), batch["attention_mask"]):
        edited = forward(unhooked, batch).hidden_states[layer + 1]
    assert torch.equal(edited[~mask], base[~mask])
    diff = edited - base
    for i in range(3):
        expected = vec[layer][i].expand(int(mask[i].sum()), -1)
        torch.testing.assert_close(diff[i][mask[i]], expected, atol=1e-5, rtol=0)


def first_step_scores(backend: Any, batch: dict[str, torch.Tensor], edits: Edits | None) -> tuple[torch.Tensor, ...]:
    with steering.edit_hooks(backend.model, edits, batch["attention_mask"]), torch.inference_mode():
        out = backend.model.generate(
            **batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
            return_dict_in_generate=True, output_scores=True,
        )
    return out.scores


def test_generated_positions_edit_decode_steps_only(unhooked: Any) -> None:
    batch = unhooked._encode(mixed_requests())
    vec = vectors(unhooked, 1, 3, scale=20.0)
    base = first_step_scores(unhooked, batch, None)
    gen_only = first_step_scores(unhooked, batch, Edits(vec, frozenset({"generated"})))
    assert torch.equal(gen_only[0], base[0]), "the prefill must not be edited"
    assert not torch.equal(gen_only[1], base[1])
    prompt_only = first_step_scores(unhooked, batch, Edits(vec, frozenset({"last_prompt"})))
    assert not torch.equal(prompt_only[0], base[0])


def test_hooks_are_removed_when_generation_fails(unhooked: Any) -> None:
    def explode(*args: Any) -> None:
        raise RuntimeError("forced failure")

    before = hook_ids(unhooked)
    handle = unhooked.model.lm_head.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="forced failure"):
            unhooked.generate(mixed_requests(), GenerationParams(max_new_tokens=2),
                                  edits=Edits(vectors(unhooked, 2, 3), ALL))
        layer_hook = steering.decoder_layers(unhooked.model)[0].register_forward_hook(explode)
        try:
            with pytest.raises(RuntimeError, match="forced failure"):
                unhooked.last_token_states(mixed_requests(), [1, 2])
        finally:
            layer_hook.remove()
    finally:
        handle.remove()
    assert hook_ids(unhooked) == before


def test_bad_edits_are_refused_before_running(unhooked: Any) -> None:
    with pytest.raises(ValueError, match="expected"):
        unhooked.generate(mixed_requests(), GenerationParams(max_new_tokens=2),
                              edits=Edits({0: torch.zeros(2, unhooked.decoder_size().hidden_size)}))
    with pytest.raises(ValueError, match="out of range"):
        unhooked.generate(mixed_requests(), GenerationParams(max_new_tokens=2),
                              edits=Edits({99: torch.zeros(3, unhooked.decoder_size().hidden_size)}))
