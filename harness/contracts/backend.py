"""The backend contract: chat requests with images in, completions out.

A request is a list of chat messages in the transformers format, with images as PIL objects:
`{"role": "user", "content": [{"type": "image", "image": <PIL>}, {"type": "text", "text": "..."}]}`.
Backends never see tasks or defenses; defenses build requests and read completions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

from PIL import Image

if TYPE_CHECKING:
    import torch

Message = dict[str, Any]
Position = Literal["last_prompt", "prompt", "generated"]
POSITIONS: tuple[str, ...] = ("last_prompt", "prompt", "generated")


@dataclass
class Request:
    messages: list[Message]

    def images(self) -> list[Image.Image]:
        return [
            part["image"]
            for msg in self.messages
            for part in (msg["content"] if isinstance(msg["content"], list) else [])
            if part.get("type") == "image"
        ]

    def has_image(self) -> bool:
        return bool(self.images())

    def to_json(self) -> list[dict[str, Any]]:
        """The request as recorded in a Generation: images become a size note, never pixels."""
        out = []
        for msg in self.messages:
            content = msg["content"]
            if isinstance(content, list):
                content = [
                    {"type": "image", "size": list(p["image"].size)} if p.get("type") == "image" else dict(p)
                    for p in content
                ]
            out.append({"role": msg["role"], "content": content})
        return out


def user_request(text: str, image: Image.Image | None = None, system: str | None = None) -> Request:
    """The common request: an optional system message, then one user turn (image first, then text)."""
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": text})
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": content})
    return Request(messages)


@dataclass
class GenerationParams:
    """Decoding settings shared by every backend. Greedy unless `do_sample`."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Edits:
    """Per-sample vectors added to decoder-layer outputs during generation.

    `vectors[layer]` is a [batch, hidden] tensor (row i belongs to request i); `positions`
    says where: the last prompt token, every prompt token, and/or every generated token.
    Defenses that subtract a shift pass the negated vector.
    """

    vectors: dict[int, "torch.Tensor"]
    positions: frozenset[str] = field(default_factory=lambda: frozenset({"prompt", "generated"}))

    def __post_init__(self) -> None:
        bad = set(self.positions) - set(POSITIONS)
        if bad:
            raise ValueError(f"unknown edit positions {sorted(bad)}; valid: {', '.join(POSITIONS)}")


class Backend(ABC):
    """A VLM: chat requests in, completions out. Capabilities beyond that (reading and editing the
    residual stream) are separate protocols a backend class may satisfy, so the plan can check them
    on the class before any weights load."""

    spec: str = ""

    @abstractmethod
    def generate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]:
        """One completion per request, in order. Only a `Steerable` backend accepts `edits`."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What makes outputs reproducible: model id, revision, dtype... (recorded in results)."""

    def image_mean(self) -> tuple[float, ...] | None:
        """The per-channel pixel mean (0-1) the model's image processor normalises with, when the
        backend knows it; a defense that needs a "mean image" asks here rather than assuming CLIP's."""
        return None

    def close(self) -> None:
        """Release resources (client sessions, GPU memory)."""


class DecoderSize(NamedTuple):
    num_layers: int
    hidden_size: int


@runtime_checkable
class Steerable(Protocol):
    """The steering capability: read decoder-layer states at the last prompt token, and generate
    with per-sample additive edits (`generate(..., edits=...)`). Methods only, so that
    `issubclass(BackendClass, Steerable)` works at plan time, before a model is loaded."""

    def decoder_size(self) -> DecoderSize:
        """Number of text-decoder layers and their hidden size."""
        ...

    def last_token_states(self, requests: list[Request], layers: list[int]) -> "torch.Tensor":
        """[batch, len(layers), hidden] float32 outputs of the given decoder layers at the last prompt token."""
        ...

    def generate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]: ...


@runtime_checkable
class LogitLens(Protocol):
    """Read each decoder layer's last-prompt-token state through the model's final norm and LM head
    (the "logit lens"), for detectors that look for refusal in the hidden states (HiddenDetect)."""

    def decoder_size(self) -> DecoderSize:
        """Number of text-decoder layers and their hidden size (to resolve depth-relative layer specs)."""
        ...

    def lens_logits(self, requests: list[Request], layers: list[int]) -> "torch.Tensor":
        """[batch, len(layers), vocab] float32 logits of lm_head(norm(h^l)) at the last prompt token."""
        ...

    def token_ids(self, words: list[str]) -> list[int]:
        """The id of the first token of each word as the tokenizer splits it (no special tokens)."""
        ...


@runtime_checkable
class TokenLogprobs(Protocol):
    """Log-probabilities of a few candidate next tokens after the prompt (yes/no guard questions)."""

    def next_token_logprobs(self, requests: list[Request], candidates: list[str]) -> list[dict[str, float]]:
        """Per request, {candidate: log-probability of the candidate's first token as the next token};
        a candidate the backend cannot score (not among an API's top tokens) is -inf, and every
        candidate of a request that failed (after retries) is NaN."""
        ...


#: Capability name (as a defense's `requires` names it) -> the protocol a backend class must satisfy,
#: and what it means in an error message.
CAPABILITIES: dict[str, tuple[type, str]] = {
    "steering": (Steerable, "access to decoder layers (steering)"),
    "logit_lens": (LogitLens, "decoder states read through the LM head (logit lens)"),
    "logprobs": (TokenLogprobs, "next-token log-probabilities"),
}


def missing_capabilities(backend_cls: type, required: frozenset[str]) -> list[str]:
    """The capabilities in `required` that `backend_cls` does not offer (checked on the class)."""
    unknown = sorted(set(required) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"unknown capabilities {unknown}; known: {', '.join(CAPABILITIES)}")
    return [name for name in sorted(required) if not issubclass(backend_cls, CAPABILITIES[name][0])]
