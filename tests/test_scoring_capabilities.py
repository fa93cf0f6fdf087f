"""The scoring capabilities detectors and guards build on: the logit lens over decoder layers and
next-token log-probabilities, on tiny LLaVA, Qwen2-VL and Idefics3 (against transformers alone)
and, for log-probabilities, on an OpenAI-compatible server."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from harness.contracts.backend import CAPABILITIES, LogitLens, Steerable, TokenLogprobs, missing_capabilities, user_request
from harness.models.hf import HFBackend
from harness.models.openai_api import OpenAIBackend
from tests.fake_openai import fake_openai
from tests.reference import Reference


def requests():
    return [user_request("how do I bake bread?"), user_request("what is shown?", Image.new("RGB", (40, 40), "red")),
            user_request("tell me a story about a cat please")]


def test_capabilities_are_checked_on_classes():
    assert issubclass(HFBackend, LogitLens) and issubclass(HFBackend, TokenLogprobs) and issubclass(HFBackend, Steerable)
    assert not issubclass(OpenAIBackend, LogitLens) and issubclass(OpenAIBackend, TokenLogprobs)
    assert missing_capabilities(OpenAIBackend, frozenset({"logit_lens", "logprobs"})) == ["logit_lens"]
    assert {"steering", "logit_lens", "logprobs"} <= set(CAPABILITIES)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "idefics3"])
def test_logit_lens_matches_a_reference(arch, tiny_backend_for, tiny_model_path):
    backend = tiny_backend_for(arch)
    ref = Reference(tiny_model_path(arch))
    layers = list(range(backend.decoder_size().num_layers))
    got = backend.lens_logits(requests(), layers)
    norm, head = ref.model.get_decoder().norm, ref.model.get_output_embeddings()
    for i, r in enumerate(requests()):
        text = r.messages[0]["content"][-1]["text"]
        images = r.images()
        with torch.no_grad():
            want = head(norm(ref.states(text, images[0] if images else None)))
        torch.testing.assert_close(got[i], want.float(), atol=2e-4, rtol=2e-4)
    # the last layer through the lens is the model's own next-token logits; one at a time == batched
    alone = torch.cat([backend.lens_logits([r], [layers[-1]]) for r in requests()])
    torch.testing.assert_close(alone, got[:, -1:, :], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_next_token_logprobs_match_a_reference(arch, tiny_backend_for, tiny_model_path):
    backend = tiny_backend_for(arch)
    ref = Reference(tiny_model_path(arch))
    words = ["Yes", "No", "yes"]
    got = backend.next_token_logprobs(requests(), words)
    ids = [ref.processor.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    for i, r in enumerate(requests()):
        text = r.messages[0]["content"][-1]["text"]
        images = r.images()
        with torch.no_grad():
            logits = ref.model(**ref.inputs(text, images[0] if images else None)).logits[0, -1].float()
        want = torch.log_softmax(logits, -1)[ids]
        assert [got[i][w] for w in words] == pytest.approx(want.tolist(), abs=1e-4)


def test_openai_logprobs_come_from_the_servers_top_alternatives():
    with fake_openai(reply=lambda body: "Yes." if "bomb" in str(body) else "no") as server:
        backend = OpenAIBackend(OpenAIBackend.Params(model="guard", base_url=server.base_url, max_retries=0))
        got = backend.next_token_logprobs([user_request("a bomb?"), user_request("bread?")], ["Yes.", "No", "no"])
        assert all(r.body["logprobs"] is True and r.body["max_tokens"] == 1 for r in server.chat_requests)
    assert got[0]["Yes."] == pytest.approx(math.log(0.8)) and got[0]["No"] == pytest.approx(math.log(0.1))
    assert got[1]["no"] == pytest.approx(math.log(0.8)) and got[1]["No"] == float("-inf")


def test_openai_logprobs_failure_is_nan_not_a_crash():
    with fake_openai(faults=lambda i, body: "500") as server:
        backend = OpenAIBackend(OpenAIBackend.Params(model="guard", base_url=server.base_url, max_retries=0))
        (got,) = backend.next_token_logprobs([user_request("x")], ["Yes", "No"])
    assert all(math.isnan(v) for v in got.values())
