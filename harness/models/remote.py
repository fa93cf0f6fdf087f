"""One client for every caller of an OpenAI-compatible chat endpoint (the backend and the judges).

Why one module: the `openai` backend, the LLM judge and the served Llama Guard judge all talk to
the same kind of server, and what matters for safety and politeness must not drift between
them. So it is written here, once:

- the API key is read from the environment variable the spec names (`api_key_env`), held in a
  `Secret` whose repr is masked, and scrubbed (`redact`) from every error and log line we make;
  identities record the variable's *name*, never its value;
- a missing key is a `ModelLoadError` naming the variable, except for a local endpoint
  (localhost / 127.0.0.0/8 / ::1), where servers such as vLLM accept any key: there we send
  `LOCAL_PLACEHOLDER_KEY` and log that we did;
- URLs are recorded without userinfo, query or fragment (`public_url`), which can carry secrets;
- retries are ours (`retry_async` with `classify_openai_error`: 408/409/429/5xx, timeouts,
  connection errors and garbled bodies are retried with capped, jittered backoff honouring
  `Retry-After`; other 4xx are not), so the policy is the spec's and the same everywhere; the
  `openai` client's own retries are off;
- every attempt is bounded in time, and at most `concurrency` requests are in flight per session
  (a request keeps its slot through its retries, so a throttling server is not piled on);
- a reply is its content, or the model's `refusal` when content is None, plus its token counts;
  a body without choices counts as garbled and is retried;
- a request that cannot be had becomes one `RequestFailed` with a scrubbed message and the
  number of attempts spent, which each caller records as a per-sample error.

An `openai.AsyncOpenAI` client's connection pool is bound to the event loop it first ran on, so a
client is made per `session()` and closed after it; `run_sync` gives sync callers a fresh loop
(in a worker thread when one is already running).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from harness.errors import ModelLoadError
from harness.models.retry import RetryPolicy, Transient, parse_retry_after, retry_async

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def is_local_url(url: str) -> bool:
    """True for localhost, *.localhost and loopback addresses: servers there need no real key."""
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


def run_sync(make: Callable[[], Awaitable[T]], thread_name: str = "remote-chat") -> T:
    """Run a coroutine to completion from sync code, in a worker thread if a loop is running.

    `make` builds the coroutine inside the loop that runs it, so nothing loop-bound leaks across.
    """

    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name) as pool:
        return pool.submit(asyncio.run, main()).result()


@dataclass
class Reply:
    """One successful chat completion with its cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int  # HTTP requests spent on it, retries included
    #: The first generated token's most likely alternatives, (token text, log-probability), when the
    #: request asked for `logprobs` and the server returned them.
    top_logprobs: list[tuple[str, float]] | None = None


class RequestFailed(Exception):
    """A request that failed for good (not transient, or retries used up); message is scrubbed."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts


def parse_response(response: Any, attempts: int) -> Reply:
    """A chat-completion response as a Reply; ValueError (retried as garbled) when it has no choices."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise ValueError("response has no choices")
    message = choices[0].message
    text = message.content if message.content is not None else (getattr(message, "refusal", None) or "")
    usage = getattr(response, "usage", None)
    return Reply(
        text=text,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        attempts=attempts,
        top_logprobs=_first_token_alternatives(choices[0]),
    )


def _first_token_alternatives(choice: Any) -> list[tuple[str, float]] | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    first = content[0]
    pairs = [(str(t.token), float(t.logprob)) for t in (getattr(first, "top_logprobs", None) or [])]
    return pairs or [(str(first.token), float(first.logprob))]


class RemoteChat:
    """An OpenAI-compatible chat endpoint: model, URL, key, retry policy, timeout, concurrency bound.

    Build one per component (it checks the key at once, so a bad spec fails at build time); open
    a `session()` inside the event loop that sends the requests.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None,
        api_key_env: str,
        *,
        concurrency: int = 16,
        max_retries: int = 4,
        timeout: float = 60.0,
        backoff: float = 0.5,
        what: str = "remote chat",
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        try:
            import openai  # noqa: F401
        except ImportError as exc:  # pragma: no cover - openai is a dependency
            raise ModelLoadError(f"{what} needs the `openai` package (pip install openai)") from exc
        self.model = model
        self.what = what  # names the caller in errors and log lines
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.policy = RetryPolicy(max_retries=max_retries, backoff=backoff)
        key = os.environ.get(api_key_env, "")
        if not key:
            if not is_local_url(self.base_url):
                raise ModelLoadError(
                    f"{what}: environment variable {api_key_env} is not set or empty; export it with your "
                    f"API key, or name another variable with api_key_env=..."
                )
            log.info("%s: %s is not set; sending a placeholder key to local endpoint %s",
                     what, api_key_env, public_url(self.base_url))
            key = LOCAL_PLACEHOLDER_KEY
        self.key = Secret(key)

    def __repr__(self) -> str:
        return f"RemoteChat(model={self.model!r}, base_url={public_url(self.base_url)!r})"

    def identity(self) -> dict[str, Any]:
        """Where replies come from; the key's variable *name* only."""
        return {"model": self.model, "base_url": public_url(self.base_url), "api_key_env": self.api_key_env}

    def scrub(self, text: str) -> str:
        """`text` with the key removed: every message we produce goes through here."""
        return redact(text, self.key.value)

    def failure(self, exc: BaseException, attempts: int, label: str) -> RequestFailed:
        """The final, scrubbed failure for `exc` after `attempts` requests, logged once."""
        message = self.scrub(f"{describe_error(exc)} (after {attempts} attempt{'s' * (attempts != 1)})")
        log.warning("%s %s failed: %s", self.what, label, message)
        return RequestFailed(message, attempts)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[ChatSession]:
        """A client bound to the running loop (an HTTP pool cannot outlive its loop), closed after."""
        import openai

        client = openai.AsyncOpenAI(api_key=self.key.value, base_url=self.base_url, max_retries=0,
                                    timeout=self.timeout)
        try:
            yield ChatSession(self, client)
        finally:
            await client.close()


class ChatSession:
    """Requests through one client; at most `concurrency` in flight across the session."""

    def __init__(self, chat: RemoteChat, client: Any) -> None:
        self.chat = chat
        self.client = client
        self.slots = asyncio.Semaphore(chat.concurrency)

    async def complete(self, messages: list[dict[str, Any]], label: str, **options: Any) -> Reply:
        """One chat completion (`options`: temperature, max_tokens, ...); RequestFailed when it cannot be had.

        A request holds its slot for its whole life, retries and backoff included: when the server
        throttles, only `concurrency` requests spend their retry budget while the rest wait their
        turn, instead of every pending request piling on and failing.
        """
        chat = self.chat
        attempts = 0
        payload = {"model": chat.model, "messages": messages, **options}

        async def call() -> Reply:
            nonlocal attempts
            attempts += 1
            # Total bound per attempt, on top of the client's per-read timeout.
            response = await asyncio.wait_for(
                self.client.chat.completions.create(**payload), timeout=chat.timeout + 1.0
            )
            return parse_response(response, attempts)  # a malformed body raises -> retried

        async with self.slots:
            try:
                return await retry_async(
                    call, classify_openai_error, chat.policy,
                    describe=lambda e: chat.scrub(describe_error(e)), label=f"{chat.what} {label}",
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise chat.failure(exc, attempts, label) from None
