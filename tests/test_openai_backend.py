"""The OpenAI-compatible backend against a real local HTTP server (tests/fake_openai.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

try:
    import harness  # noqa: F401
except ImportError:  # not pip-installed yet: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from fake_openai import FakeOpenAIServer, fake_openai, last_user_text  # noqa: E402
from harness.errors import CapabilityError, ModelLoadError  # noqa: E402
from harness.contracts.backend import Edits, GenerationParams, Request, Steerable, user_request  # noqa: E402
from harness.models.openai_api import OpenAIBackend, image_data_uri  # noqa: E402
from harness.models.remote import public_url, redact  # noqa: E402
from harness.models.retry import RetryPolicy, Transient, backoff_delay, parse_retry_after, retry_async  # noqa: E402

KEY_ENV = "REALIGN_TEST_OPENAI_KEY"
KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


@pytest.fixture
def server() -> Any:
    with fake_openai() as srv:
        yield srv


def make_backend(srv: FakeOpenAIServer, **overrides: Any) -> OpenAIBackend:
    kw: dict[str, Any] = dict(model="fake-vlm", base_url=srv.base_url, api_key_env=KEY_ENV, backoff=0.01, timeout=5.0)
    kw.update(overrides)
    return OpenAIBackend(OpenAIBackend.Params(**kw))


def texts(n: int) -> list[Request]:
    return [user_request(f"prompt {i}") for i in range(n)]


def test_text_round_trip(api_key: str, server: FakeOpenAIServer) -> None:
    backend = make_backend(server)
    out = backend.generate([user_request("hello there", system="be safe")], GenerationParams(max_new_tokens=7, seed=3))
    assert out[0].error is None and out[0].text == "echo: hello there"
    assert out[0].completion_tokens == 3 and out[0].prompt_tokens > 0
    (rec,) = server.chat_requests
    body = rec.body
    assert body["model"] == "fake-vlm"
    assert body["messages"][0] == {"role": "system", "content": "be safe"}
    assert body["messages"][1]["role"] == "user"
    assert body["temperature"] == 0 and body["max_tokens"] == 7 and body["seed"] == 3
    assert "top_p" not in body
    assert rec.headers["authorization"] == f"Bearer {KEY}"  # the server does see the key


def test_sampling_params(api_key: str, server: FakeOpenAIServer) -> None:
    make_backend(server).generate(texts(1), GenerationParams(do_sample=True, temperature=0.7, top_p=0.9))
    body = server.chat_requests[0].body
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9


def test_image_round_trip(api_key: str, server: FakeOpenAIServer) -> None:
    image = Image.new("RGB", (37, 21), (200, 10, 10))
    out = make_backend(server).generate([user_request("what is this?", image=image)], GenerationParams())
    assert out[0].text == "echo: what is this?"
    content = server.chat_requests[0].body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]
    url = content[0]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    decoded = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
    assert decoded.format == "PNG" and decoded.size == (37, 21)
    assert decoded.convert("RGB").getpixel((5, 5)) == (200, 10, 10)


def test_image_data_uri_converts_odd_modes() -> None:
    uri = image_data_uri(Image.new("CMYK", (4, 4)))
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).mode == "RGB"


def test_order_preserved_and_concurrency_bounded(api_key: str) -> None:
    # Later prompts answer faster, so completion order differs from request order.
    def latency(body: dict[str, Any]) -> float:
        return 0.02 * (3 - int(last_user_text(body).split()[-1]) % 4)

    with fake_openai(latency=latency) as srv:
        out = make_backend(srv, concurrency=3).generate(texts(24), GenerationParams())
        assert [c.text for c in out] == [f"echo: prompt {i}" for i in range(24)]
        assert srv.request_count == 24
        assert 2 <= srv.max_in_flight <= 3


def test_generate_inside_running_loop(api_key: str, server: FakeOpenAIServer) -> None:
    backend = make_backend(server)

    async def inside() -> list[str]:
        sync_out = backend.generate(texts(2), GenerationParams())  # sync call from within a loop
        async_out = await backend.agenerate(texts(2), GenerationParams())
        return [c.text for c in sync_out + async_out]

    assert asyncio.run(inside()) == ["echo: prompt 0", "echo: prompt 1"] * 2
    assert [c.text for c in backend.generate(texts(1), GenerationParams())] == ["echo: prompt 0"]  # again, new loop


@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout", "garbage", "disconnect"])
def test_transient_faults_are_retried(api_key: str, fault: str) -> None:
    with fake_openai(faults=[fault, fault], stall_seconds=1.0) as srv:
        out = make_backend(srv, timeout=0.3).generate(texts(1), GenerationParams())
        assert out[0].error is None and out[0].text == "echo: prompt 0"
        assert srv.request_count == 3


def test_gives_up_after_max_retries(api_key: str) -> None:
    with fake_openai(faults=lambda i, body: "500") as srv:
        out = make_backend(srv, max_retries=2).generate(texts(1), GenerationParams())
        assert out[0].text == "" and "HTTP 500" in out[0].error and "3 attempts" in out[0].error
        assert srv.request_count == 3


def test_one_failure_does_not_sink_the_batch(api_key: str) -> None:
    fail_second = lambda i, body: "400" if last_user_text(body) == "prompt 1" else None  # noqa: E731
    with fake_openai(faults=fail_second) as srv:
        out = make_backend(srv).generate(texts(3), GenerationParams())
        assert [c.error is None for c in out] == [True, False, True]
        assert out[1].error.startswith("HTTP 400: injected fault 400")


@pytest.mark.parametrize("status", ["400", "401", "404"])
def test_client_errors_not_retried(api_key: str, status: str) -> None:
    with fake_openai(faults=[status]) as srv:
        out = make_backend(srv).generate(texts(1), GenerationParams())
        assert out[0].text == "" and f"HTTP {status}" in out[0].error and "1 attempt)" in out[0].error
        assert srv.request_count == 1


def test_rate_limit_honours_retry_after(api_key: str) -> None:
    # Retry-After: 0 from the server overrides a (here huge) exponential backoff.
    with fake_openai(faults=["429"]) as srv:
        out = make_backend(srv, backoff=30.0).generate(texts(1), GenerationParams())
        assert out[0].error is None and srv.request_count == 2


def test_seeded_random_faults_all_recover(api_key: str) -> None:
    with fake_openai(fault_rate=0.3, fault_kinds=("429", "500", "garbage"), seed=7) as srv:
        out = make_backend(srv, max_retries=8, concurrency=4).generate(texts(20), GenerationParams())
        assert [c.text for c in out] == [f"echo: prompt {i}" for i in range(20)]
        assert srv.request_count > 20


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REALIGN_NO_SUCH_KEY", raising=False)
    with pytest.raises(ModelLoadError, match="REALIGN_NO_SUCH_KEY"):
        OpenAIBackend(OpenAIBackend.Params(model="gpt-4o", base_url="https://api.example.invalid/v1", api_key_env="REALIGN_NO_SUCH_KEY"))


def test_local_endpoint_without_key_gets_placeholder(monkeypatch: pytest.MonkeyPatch, server: FakeOpenAIServer) -> None:
    monkeypatch.delenv("REALIGN_NO_SUCH_KEY", raising=False)
    out = make_backend(server, api_key_env="REALIGN_NO_SUCH_KEY").generate(texts(1), GenerationParams())
    assert out[0].error is None
    assert server.chat_requests[0].headers["authorization"].startswith("Bearer ")


def test_key_never_leaks(api_key: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with fake_openai(faults=lambda i, body: "500" if i < 3 else "401", leak_auth_in_errors=True) as srv:
        backend, url = make_backend(srv, max_retries=2), srv.base_url
        out = backend.generate(texts(2), GenerationParams())
        assert KEY in srv.chat_requests[0].headers["authorization"]
    errors = [c.error for c in out]
    assert all(errors) and "***" in " ".join(errors)  # the leaky server's echo was scrubbed
    for text in [*errors, caplog.text, repr(backend), str(backend.identity()), repr(backend.params), str(vars(backend))]:
        assert KEY not in text
    assert backend.identity() == {
        "backend": "openai", "model": "fake-vlm", "base_url": url, "api_key_env": KEY_ENV,
    }


def test_edits_refused(api_key: str, server: FakeOpenAIServer) -> None:
    backend = make_backend(server)
    assert not isinstance(backend, Steerable) and not issubclass(OpenAIBackend, Steerable)
    with pytest.raises(CapabilityError):
        backend.generate(texts(1), GenerationParams(), edits=Edits(vectors={0: torch.zeros(1, 4)}))
    assert server.request_count == 0


def test_built_from_spec_string(api_key: str, server: FakeOpenAIServer) -> None:
    # Params coercion only: the full registry would import every other component too.
    from harness.spec import SpecError, build_params, parse_spec

    assert OpenAIBackend.registered_name == "openai"  # type: ignore[attr-defined]
    spec = f"openai:model=m,base_url={server.base_url},api_key_env={KEY_ENV},concurrency=2,timeout=3"
    params = build_params(OpenAIBackend.Params, parse_spec(spec), "backend")
    backend = OpenAIBackend(params)
    assert backend.params.concurrency == 2 and backend.params.timeout == 3.0
    assert backend.generate(texts(1), GenerationParams())[0].text == "echo: prompt 0"
    with pytest.raises(SpecError, match="concurrency"):
        build_params(OpenAIBackend.Params, parse_spec("openai:model=m,concurrency=0"), "backend")


def test_empty_batch(api_key: str, server: FakeOpenAIServer) -> None:
    assert make_backend(server).generate([], GenerationParams()) == []


# ---- retry helper ------------------------------------------------------------------------------
def test_backoff_grows_and_caps() -> None:
    policy = RetryPolicy(backoff=0.5, max_backoff=4.0)
    for retry, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        d = backoff_delay(retry, policy)
        assert ceiling / 2 <= d <= ceiling


def test_parse_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert parse_retry_after({"Retry-After": "soon"}) is None and parse_retry_after({}) is None


def test_retry_async_policy() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    classify = lambda e: Transient(retry_after=0.0 if len(calls) == 1 else None) if isinstance(e, ConnectionError) else None  # noqa: E731
    policy = RetryPolicy(max_retries=5, backoff=1.0)
    assert asyncio.run(retry_async(flaky, classify, policy, sleep=fake_sleep)) == "ok"
    assert sleeps[0] == 0.0 and 1.0 <= sleeps[1] <= 2.0

    async def broken() -> str:
        raise KeyError("not transient")

    with pytest.raises(KeyError):
        asyncio.run(retry_async(broken, classify, policy, sleep=fake_sleep))


def test_redact_and_public_url() -> None:
    assert redact(f"bad key {KEY}!", KEY) == "bad key ***!"
    assert public_url("https://user:pw@host.example:8443/v1?key=abc#x") == "https://host.example:8443/v1"
