"""The shared remote client (harness/models/remote.py) and the cached-judge base (judges/cached.py).

The first half drives every caller of an OpenAI-compatible endpoint (the `openai` backend, the
LLM judge, the served Llama Guard judge) through the same local fake server, to show that the
behaviour that must not drift between them (retries, key handling, local-endpoint rule) is one
behaviour. The second half checks the client's pieces and the cached-judge base on their own.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai import fake_openai  # noqa: E402
from harness.contracts.backend import GenerationParams, user_request  # noqa: E402
from harness.errors import ModelLoadError  # noqa: E402
from harness.models.openai_api import OpenAIBackend  # noqa: E402
from harness.models.remote import (  # noqa: E402
    LOCAL_PLACEHOLDER_KEY, RemoteChat, RequestFailed, Secret, classify_openai_error, is_local_url,
    parse_response, run_sync,
)
from harness.registry import judges  # noqa: E402
from harness.schema import Generation, Sample, Verdict  # noqa: E402
from judges.cache import CACHE_FILE  # noqa: E402
from judges.cached import CachedJudge, Judged, Pending, Prepared  # noqa: E402

KEY_ENV = "REALIGN_TEST_REMOTE_KEY"
KEY = "sk-remote-PLANTED-5f3e2d1c0b9a8776"
REMOTE_URL = "https://api.example.invalid/v1"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- every caller, one behaviour ----------------------------------------------------------------

@dataclass
class Caller:
    """How to build one kind of caller and ask it n things: an error text (or None) per item."""

    build: Callable[..., Any]
    ask: Callable[[Any, int], list[str | None]]


def _build_backend(base_url: str, **kw: Any) -> OpenAIBackend:
    return OpenAIBackend(OpenAIBackend.Params(model="m", base_url=base_url, **kw))


def _ask_backend(backend: OpenAIBackend, n: int) -> list[str | None]:
    out = backend.generate([user_request(f"prompt {i}") for i in range(n)], GenerationParams())
    return [c.error for c in out]


def _judge_builder(name: str) -> Callable[..., Any]:
    def build(base_url: str, **kw: Any) -> Any:
        opts = {"model": "m", "base_url": base_url, **kw}
        return judges.build(f"{name}:" + ",".join(f"{k}={v}" for k, v in opts.items()))

    return build


def _ask_judge(judge: Any, n: int) -> list[str | None]:
    samples = [Sample(f"s{i}", f"request {i}") for i in range(n)]
    verdicts = judge.verdicts(samples, [Generation(s.id, f"answer {i}") for i, s in enumerate(samples)])
    return [v.detail["reason"] if v.label == "error" else None for v in verdicts]


CALLERS = {
    "openai backend": Caller(_build_backend, _ask_backend),
    "llm judge": Caller(_judge_builder("llm"), _ask_judge),
    "llamaguard served": Caller(_judge_builder("llamaguard"), _ask_judge),
}


def verdict_reply(body: dict[str, Any]) -> str:
    return "unsafe"  # a verdict word for both judges, plain text for the backend


@pytest.mark.parametrize("fault", ["429", "503", "timeout", "garbage", "disconnect"])
@pytest.mark.parametrize("who", list(CALLERS))
def test_transient_faults_are_retried_by_every_caller(who: str, fault: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    caller = CALLERS[who]
    with fake_openai(faults=[fault, fault], reply=verdict_reply, stall_seconds=1.0) as srv:
        obj = caller.build(srv.base_url, api_key_env=KEY_ENV, backoff=0.01, timeout=0.3)
        assert caller.ask(obj, 1) == [None]
        assert srv.request_count == 3


@pytest.mark.parametrize("who", list(CALLERS))
def test_client_errors_are_not_retried_and_give_up_is_counted(who: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    caller = CALLERS[who]
    with fake_openai(faults=["400"], reply=verdict_reply) as srv:
        (error,) = caller.ask(caller.build(srv.base_url, api_key_env=KEY_ENV, backoff=0.01), 1)
        assert error is not None and "HTTP 400" in error and "(after 1 attempt)" in error
        assert srv.request_count == 1
    with fake_openai(faults=lambda i, body: "500", reply=verdict_reply) as srv:
        (error,) = caller.ask(caller.build(srv.base_url, api_key_env=KEY_ENV, backoff=0.01, max_retries=2), 1)
        assert error is not None and "HTTP 500" in error and "(after 3 attempts)" in error
        assert srv.request_count == 3


@pytest.mark.parametrize("who", list(CALLERS))
def test_planted_key_never_appears_in_errors_logs_or_identity(
    who: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    caller = CALLERS[who]
    # A leaky proxy echoes the Authorization header into its error text: 500s (retried), then 401.
    with fake_openai(faults=lambda i, body: "500" if i < 2 else "401", leak_auth_in_errors=True,
                     reply=verdict_reply) as srv:
        obj = caller.build(srv.base_url, api_key_env=KEY_ENV, backoff=0.01, max_retries=2, concurrency=1)
        errors = caller.ask(obj, 2)
        assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in srv.chat_requests)  # it was sent
    assert all(errors) and all("***" in e for e in errors if e)  # the echoed key was scrubbed
    assert "retry 1/2" in caplog.text and "***" in caplog.text  # the retry log line is scrubbed too
    for text in [*map(str, errors), caplog.text, repr(obj), str(obj.identity()), str(vars(obj))]:
        assert KEY not in text
    assert KEY_ENV in str(obj.identity())


@pytest.mark.parametrize("who", list(CALLERS))
def test_local_endpoint_without_a_key_works(who: str, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture):
    monkeypatch.delenv(KEY_ENV, raising=False)
    caplog.set_level(logging.INFO)
    caller = CALLERS[who]
    with fake_openai(reply=verdict_reply) as srv:
        assert caller.ask(caller.build(srv.base_url, api_key_env=KEY_ENV), 1) == [None]
        assert srv.chat_requests[0].headers["authorization"] == f"Bearer {LOCAL_PLACEHOLDER_KEY}"
    assert "placeholder key" in caplog.text and KEY_ENV in caplog.text


@pytest.mark.parametrize("who", list(CALLERS))
def test_remote_endpoint_without_a_key_fails_at_build_naming_the_variable(who: str,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ModelLoadError, match=KEY_ENV):
        CALLERS[who].build(REMOTE_URL, api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "")  # set but empty is missing too
    with pytest.raises(ModelLoadError, match=KEY_ENV):
        CALLERS[who].build(REMOTE_URL, api_key_env=KEY_ENV)


# ---- the client's pieces -------------------------------------------------------------------------

@pytest.mark.parametrize("url,local", [
    ("http://localhost:8000/v1", True), ("http://LOCALHOST/v1", True), ("http://vllm.localhost/v1", True),
    ("http://127.0.0.1:1/v1", True), ("http://127.8.9.10/v1", True), ("http://[::1]:8000/v1", True),
    ("https://api.openai.com/v1", False), ("http://10.0.0.5:8000/v1", False),
    ("http://localhost.evil.example/v1", False), ("http://user@example.com/v1", False),
])
def test_local_url_rule(url: str, local: bool):
    assert is_local_url(url) is local


def test_secret_and_client_reprs_are_masked(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    chat = RemoteChat("m", "https://user:pw@api.example.invalid/v1?token=t", KEY_ENV)
    assert KEY not in repr(Secret(KEY)) + str(Secret(KEY)) + repr(chat) + str(vars(chat))
    assert chat.identity() == {"model": "m", "base_url": "https://api.example.invalid/v1", "api_key_env": KEY_ENV}
    assert chat.scrub(f"x {KEY} y") == "x *** y"


def _response(content: str | None, refusal: str | None = None) -> Any:
    message = SimpleNamespace(content=content, refusal=refusal)
    return SimpleNamespace(choices=[SimpleNamespace(message=message)],
                           usage=SimpleNamespace(prompt_tokens=11, completion_tokens=2))


def test_response_parsing():
    reply = parse_response(_response("hello"), attempts=2)
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens, reply.attempts) == ("hello", 11, 2, 2)
    assert parse_response(_response(None, refusal="I can't help with that"), 1).text == "I can't help with that"
    assert parse_response(_response(None), 1).text == ""
    assert parse_response(SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content="x"))],
                                          usage=None), 1).prompt_tokens == 0
    with pytest.raises(ValueError, match="no choices") as info:
        parse_response(SimpleNamespace(choices=[], usage=None), 1)
    assert classify_openai_error(info.value) is not None  # a body without choices is retried


def test_session_bounds_requests_in_flight_and_raises_one_failure_type(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, KEY)

    async def many(chat: RemoteChat, n: int) -> list[Any]:
        async with chat.session() as session:
            return await asyncio.gather(*(session.complete([{"role": "user", "content": f"q{i}"}], label=f"q{i}",
                                                           temperature=0.0) for i in range(n)),
                                        return_exceptions=True)

    with fake_openai(latency=0.03) as srv:
        chat = RemoteChat("m", srv.base_url, KEY_ENV, concurrency=3, backoff=0.01)
        replies = asyncio.run(many(chat, 12))
        assert [r.text for r in replies] == [f"echo: q{i}" for i in range(12)]
        assert 2 <= srv.max_in_flight <= 3 and srv.chat_requests[0].body["temperature"] == 0
    with fake_openai(faults=lambda i, body: "404") as srv:
        (failure,) = asyncio.run(many(RemoteChat("m", srv.base_url, KEY_ENV, backoff=0.01), 1))
        assert isinstance(failure, RequestFailed) and failure.attempts == 1 and "HTTP 404" in failure.message


def test_run_sync_inside_and_outside_a_loop():
    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    async def inside() -> int:
        return run_sync(value)

    assert run_sync(value) == 7 and asyncio.run(inside()) == 7


# ---- the cached-judge base -----------------------------------------------------------------------

class ToyJudge(CachedJudge[str]):
    """A local judge with a script: 'boom' in an answer is a transport failure, 'skip' is refused unasked."""

    @dataclass
    class Params:
        cache: bool = True

    spec = "toy"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.asked: list[str] = []

    def cache_identity(self) -> dict[str, Any]:
        return {"judge": "toy"}

    def prepare(self, sample: Sample, generation: Generation) -> Prepared[str] | Verdict:
        if "skip" in generation.output:
            return Verdict(sample.id, "error", self.spec, None, {"reason": "skipped"})
        return Prepared(f"template-{sample.meta.get('t', 1)}", sample.id.upper())

    def judge_batch(self, items: list[Pending[str]]) -> list[Judged]:
        out = []
        for it in items:
            self.asked.append(it.sample.id)
            if "boom" in it.generation.output:
                out.append(Judged(Verdict(it.sample.id, "error", self.spec, None, {"reason": "request failed"}),
                                  cacheable=False, requests=3))
            else:
                out.append(Judged(Verdict(it.sample.id, "unsafe", self.spec, "unsafe", {"ctx": it.context}),
                                  cacheable=True, requests=1, prompt_tokens=5, completion_tokens=1))
        return out


def _toy_pairs() -> tuple[list[Sample], list[Generation]]:
    samples = [Sample(f"s{i}", "q") for i in range(4)]
    gens = [Generation("s0", "fine"), Generation("s1", "", error="timeout"), Generation("s2", "boom"),
            Generation("s3", "skip")]
    return samples, gens


def test_cached_judge_skips_caches_and_counts(cache_dir: Path):
    judge = ToyJudge(ToyJudge.Params())
    assert not (cache_dir / CACHE_FILE).exists()  # opened lazily
    first = judge.verdicts(*_toy_pairs())
    assert [v.label for v in first] == ["unsafe", "error", "error", "error"]
    assert first[0].detail == {"ctx": "S0"} and first[1].detail == {"reason": "generation failed"}
    assert judge.asked == ["s0", "s2"] and (cache_dir / CACHE_FILE).exists()
    assert judge.usage_record() == {"requests": 4, "prompt_tokens": 5, "completion_tokens": 1, "verdicts": 4,
                                    "cache_hits": 0, "errors": 3}
    again = ToyJudge(ToyJudge.Params())
    second = asyncio.run(again.averdicts(*_toy_pairs()))
    assert again.asked == ["s2"]  # the transport failure was not cached; the verdict was
    assert second[0].detail == {"ctx": "S0", "cached": True} and second[0].raw == "unsafe"
    assert again.usage.cache_hits == 1 and again.usage.requests == 3
    samples, gens = _toy_pairs()
    samples[0].meta["t"] = 2  # another template: another key
    third = ToyJudge(ToyJudge.Params())
    third.verdicts(samples, gens)
    assert third.asked == ["s0", "s2"]


def test_cached_judge_without_cache_asks_every_time(cache_dir: Path):
    judge = ToyJudge(ToyJudge.Params(cache=False))
    judge.verdicts(*_toy_pairs())
    judge.verdicts(*_toy_pairs())
    assert judge.asked == ["s0", "s2"] * 2 and judge.usage.cache_hits == 0
    assert not (cache_dir / CACHE_FILE).exists()
    only_failed = ToyJudge(ToyJudge.Params())
    assert only_failed.verdicts([Sample("a", "q")], [Generation("a", "", error="x")])[0].label == "error"
    assert not (cache_dir / CACHE_FILE).exists()  # nothing to look up: the cache is never opened
