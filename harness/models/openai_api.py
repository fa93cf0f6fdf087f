"""OpenAI-compatible chat backend (OpenAI, vLLM, TGI, llama.cpp server, ...).

Why it looks the way it does:
- Everything about talking to the server (key from `api_key_env` held as a masked secret and
  scrubbed from every message, placeholder key for local endpoints, our own retry policy,
  per-attempt timeout, concurrency bound, response parsing) lives in `harness.models.remote`,
  shared with the judges; this module only maps the backend contract onto it.
- One failed request never stops a run: it becomes `Completion(text="", error=...)` and the
  sample is recorded as an error.
- Identity records the key variable's *name* and the public URL, never the key.

`image_data_uri`, `to_openai_messages` and `sampling_kwargs` turn the backend contract's
requests (PIL images in transformers-style messages) and decoding settings into chat-completion
arguments; they are public so other components can build the same requests.
"""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from harness.errors import CapabilityError
from harness.images import load_image
from harness.contracts.backend import Backend, Completion, Edits, GenerationParams, Message, Request
from harness.models.remote import ChatSession, RemoteChat, RequestFailed, public_url, run_sync
from harness.registry import backend


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


TOP_LOGPROBS = 20  # the most alternatives OpenAI's API returns per position


@backend("openai")
class OpenAIBackend(Backend):
    """OpenAI-compatible chat API (no steering); `openai:model=gpt-4o,base_url=...,api_key_env=...`."""


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
        self.params = params
        self.chat = RemoteChat(
            params.model, params.base_url, params.api_key_env, concurrency=params.concurrency,
            max_retries=params.max_retries, timeout=params.timeout, backoff=params.backoff,
            what="openai backend",
        )

    @property
    def base_url(self) -> str:
        """The endpoint actually used (spec, else $OPENAI_BASE_URL, else the OpenAI API)."""
        return self.chat.base_url

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
        return run_sync(lambda: self.agenerate(requests, params), thread_name="openai-backend")

    async def agenerate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]:
        """One completion per request, in order, at most `concurrency` requests in flight."""
        self._refuse_edits(edits)
        if not requests:
            return []
        options = sampling_kwargs(params)
        async with self.chat.session() as session:
            return list(await asyncio.gather(
                *(self._complete(session, i, r, options) for i, r in enumerate(requests))
            ))

    async def _complete(self, session: ChatSession, index: int, request: Request,
                        options: dict[str, Any]) -> Completion:
        label = f"request {index} ({self.params.model})"
        try:
            messages = to_openai_messages(request.messages)  # an unreadable image fails this sample only
        except Exception as exc:
            return Completion(text="", error=self.chat.failure(exc, 0, label).message)
        try:
            reply = await session.complete(messages, label=label, **options)
        except RequestFailed as exc:
            return Completion(text="", error=exc.message)
        return Completion(text=reply.text, prompt_tokens=reply.prompt_tokens,
                          completion_tokens=reply.completion_tokens)

    # ---- next-token log-probabilities (the TokenLogprobs capability) -------------------------
    def next_token_logprobs(self, requests: list[Request], candidates: list[str]) -> list[dict[str, float]]:
        """One token generated per request with `logprobs` and the top alternatives; a candidate
        scores the best log-probability among alternatives that are the candidate up to surrounding
        spaces, and -inf when none is (the server did not rank it in its top `TOP_LOGPROBS`)."""
        return run_sync(lambda: self._logprobs(requests, candidates), thread_name="openai-logprobs")

    async def _logprobs(self, requests: list[Request], candidates: list[str]) -> list[dict[str, float]]:
        options = {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": TOP_LOGPROBS}

        async def one(session: ChatSession, i: int, request: Request) -> dict[str, float]:
            try:
                reply = await session.complete(to_openai_messages(request.messages), label=f"logprobs {i}", **options)
            except RequestFailed:  # logged by the client; the caller records an error for this sample
                return {c: float("nan") for c in candidates}
            if reply.top_logprobs is None:
                raise CapabilityError(f"openai backend {self.params.model} at {public_url(self.base_url)} returned "
                                      "no log-probabilities (the server must support `logprobs`)")
            best = {c: float("-inf") for c in candidates}
            for token, logprob in reply.top_logprobs:
                if token.strip() in best:
                    best[token.strip()] = max(best[token.strip()], logprob)
            return best

        async with self.chat.session() as session:
            return list(await asyncio.gather(*(one(session, i, r) for i, r in enumerate(requests))))

    def _refuse_edits(self, edits: Edits | None) -> None:
        if edits is not None:
            raise CapabilityError(
                f"backend {self.spec or 'openai'} is an API model and cannot be steered "
                "(activation edits need a local HF backend)"
            )
