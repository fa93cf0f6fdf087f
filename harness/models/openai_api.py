"""OpenAI-compatible chat backend (OpenAI, vLLM, TGI, llama.cpp server, ...).

Why it looks the way it does:
- The official `openai` AsyncOpenAI client does the HTTP, with its own retries off: our
  `retry_async` loop owns retries so the policy (429/5xx/timeouts/connection errors/garbled
  bodies retried; other 4xx not) is the same for every remote component and set by the spec.
- One failed request never stops a run: it becomes `Completion(text="", error=...)` and the
  sample is recorded as an error.
- The API key is read from the environment variable the spec names (`api_key_env`), held in a
  `Secret` whose repr is masked, and scrubbed from every error string and log line we produce.
  Identity records the variable's *name*, never its value.
- Missing key: a `ModelLoadError` naming the variable, except for a local endpoint
  (localhost / 127.0.0.0/8 / ::1), where servers such as vLLM accept any key; there we send the
  placeholder `LOCAL_PLACEHOLDER_KEY` and log that we did.
- A fresh AsyncOpenAI client is made per `agenerate` call and closed after it, because its
  connection pool is bound to the event loop it was first used on, and the sync `generate`
  runs each batch in its own loop.

`image_data_uri`, `to_openai_messages`, `classify_openai_error` and `redact` are public so the
LLM judge can build the same requests and apply the same retry policy.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from harness.errors import CapabilityError, ModelLoadError
from harness.images import load_image
from harness.contracts.backend import Backend, Completion, Edits, GenerationParams, Message, Request
from harness.models.retry import RetryPolicy, Transient, parse_retry_after, retry_async
from harness.registry import backend

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOCAL_PLACEHOLDER_KEY = "sk-local-no-key"
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class Secret:
    """A string that does not print itself (repr/str are masked); `.value` reveals it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def redact(text: str, *secrets: str) -> str:
    """Replace every occurrence of each (non-trivial) secret in `text` with `***`."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    """A PIL image as a `data:image/<fmt>;base64,...` URI (lossless PNG by default)."""
    if fmt.upper() == "PNG" and image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16"):
        image = image.convert("RGB")
    elif fmt.upper() in ("JPEG", "JPG") and image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper())
    mime = "jpeg" if fmt.upper() in ("JPEG", "JPG") else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _to_openai_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    if kind == "image":  # a PIL image (the contract); a path is loaded, an unreadable one raises
        return {"type": "image_url", "image_url": {"url": image_data_uri(load_image(part["image"]))}}
    return dict(part)  # already in OpenAI form (e.g. image_url): pass through


def to_openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Transformers-style messages (PIL images in parts) -> OpenAI chat messages.

    Text-only content collapses to a plain string (joined by newlines): every OpenAI-compatible
    server accepts that, while some reject part lists in system messages.
    """
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, list):
            if all(p.get("type") == "text" for p in content):
                content = "\n".join(p["text"] for p in content)
            else:
                content = [_to_openai_part(p) for p in content]
        out.append({"role": msg["role"], "content": content})
    return out


def sampling_kwargs(params: GenerationParams) -> dict[str, Any]:
    """Decoding settings as chat-completion arguments. Greedy -> temperature 0.

    `min_new_tokens` has no API equivalent and is ignored.
    """
    kwargs: dict[str, Any] = {"max_tokens": params.max_new_tokens, "seed": params.seed}
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p)
    else:
        kwargs["temperature"] = 0.0
    return kwargs


def classify_openai_error(exc: BaseException) -> Transient | None:
    """Transient (retry) for 408/409/429/5xx, timeouts, connection errors and unparsable bodies."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        if exc.status_code in RETRY_STATUSES:
            return Transient(parse_retry_after(dict(exc.response.headers)))
        return None
    if isinstance(exc, (openai.APIConnectionError, asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return Transient()
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return Transient()  # 200 with a garbled/non-JSON body: usually a proxy hiccup
    return None


def describe_error(exc: BaseException) -> str:
    """A short, user-facing description: HTTP status and the server's message, or the error kind."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        message = exc.message
        if isinstance(exc.body, dict) and isinstance(exc.body.get("message"), str):
            message = exc.body["message"]
        return f"HTTP {exc.status_code}: {message}"
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection error: {exc}"
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return f"unparsable response: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _is_local(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_url(url: str) -> str:
    """The URL without userinfo, query or fragment (they can carry credentials)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@backend("openai")
class OpenAIBackend(Backend):
    """OpenAI-compatible chat API (no steering); `openai:model=gpt-4o,base_url=...,api_key_env=...`."""

    supports_steering = False

    @dataclass
    class Params:
        model: str
        base_url: str | None = None  # None -> $OPENAI_BASE_URL, else the OpenAI API
        api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable holding the key
        concurrency: int = 16
        max_retries: int = 4
        timeout: float = 60.0  # seconds per request attempt
        backoff: float = 0.5  # first retry delay; doubles, jittered, capped at 20 s

        def __post_init__(self) -> None:
            if self.concurrency < 1:
                raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
            if self.max_retries < 0:
                raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
            if self.timeout <= 0:
                raise ValueError(f"timeout must be > 0, got {self.timeout}")
            if self.backoff < 0:
                raise ValueError(f"backoff must be >= 0, got {self.backoff}")

    def __init__(self, params: Params) -> None:
        try:
            import openai  # noqa: F401
        except ImportError as exc:  # pragma: no cover - openai is a dependency
            raise ModelLoadError("the openai backend needs the `openai` package (pip install openai)") from exc
        self.params = params
        self.base_url = params.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.policy = RetryPolicy(max_retries=params.max_retries, backoff=params.backoff)
        key = os.environ.get(params.api_key_env, "")
        if not key:
            if not _is_local(self.base_url):
                raise ModelLoadError(
                    f"openai backend: environment variable {params.api_key_env} is not set or empty; "
                    f"export it with your API key, or name another variable with api_key_env=..."
                )
            log.info(
                "openai backend: %s is not set; sending a placeholder key to local endpoint %s",
                params.api_key_env, public_url(self.base_url),
            )
            key = LOCAL_PLACEHOLDER_KEY
        self._key = Secret(key)

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.params.model!r}, base_url={public_url(self.base_url)!r})"

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "openai",
            "model": self.params.model,
            "base_url": public_url(self.base_url),
            "api_key_env": self.params.api_key_env,
        }

    # ---- generation ------------------------------------------------------------------------
    def generate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]:
        """Sync entry point: runs `agenerate` in a fresh loop, in a worker thread if one is running."""
        self._refuse_edits(edits)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(requests, params))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="openai-backend") as pool:
            return pool.submit(asyncio.run, self.agenerate(requests, params)).result()

    async def agenerate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]:
        """One completion per request, in order, at most `concurrency` requests in flight."""
        self._refuse_edits(edits)
        if not requests:
            return []
        import openai

        semaphore = asyncio.Semaphore(self.params.concurrency)
        client = openai.AsyncOpenAI(
            api_key=self._key.value, base_url=self.base_url, max_retries=0, timeout=self.params.timeout
        )
        try:
            async def one(i: int, request: Request) -> Completion:
                async with semaphore:
                    return await self._complete(client, i, request, params)

            return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))
        finally:
            await client.close()

    async def _complete(self, client: Any, index: int, request: Request, params: GenerationParams) -> Completion:
        attempts = 0
        try:
            payload = {
                "model": self.params.model,
                "messages": to_openai_messages(request.messages),
                **sampling_kwargs(params),
            }

            async def call() -> Completion:
                nonlocal attempts
                attempts += 1
                # Total bound per attempt, on top of the client's per-read timeout.
                response = await asyncio.wait_for(
                    client.chat.completions.create(**payload), timeout=self.params.timeout + 1.0
                )
                return self._to_completion(response)  # a malformed body raises -> retried

            return await retry_async(
                call,
                classify_openai_error,
                self.policy,
                describe=lambda e: self._scrub(describe_error(e)),
                label=f"openai request {index} ({self.params.model})",
            )
        except Exception as exc:
            message = self._scrub(f"{describe_error(exc)} (after {attempts} attempt{'s' * (attempts != 1)})")
            log.warning("openai request %d (%s) failed: %s", index, self.params.model, message)
            return Completion(text="", error=message)

    def _to_completion(self, response: Any) -> Completion:
        if not getattr(response, "choices", None):
            raise ValueError("response has no choices")
        message = response.choices[0].message
        text = message.content
        if text is None:
            text = getattr(message, "refusal", None) or ""
        usage = getattr(response, "usage", None)
        return Completion(
            text=text,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        )

    def _scrub(self, text: str) -> str:
        return redact(text, self._key.value)

    def _refuse_edits(self, edits: Edits | None) -> None:
        if edits is not None:
            raise CapabilityError(
                f"backend {self.spec or 'openai'} is an API model and cannot be steered "
                "(activation edits need a local HF backend)"
            )
