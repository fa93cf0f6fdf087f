"""The backend contract: chat requests with images in, completions out.

A request is a list of chat messages in the transformers format, with images as PIL objects:
`{"role": "user", "content": [{"type": "image", "image": <PIL>}, {"type": "text", "text": "..."}]}`.
Backends never see tasks or defenses; defenses build requests and read completions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

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
    """A VLM. `supports_steering` backends also implement the residual-stream methods."""

    supports_steering: ClassVar[bool] = False
    spec: str = ""

    @abstractmethod
    def generate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]:
        """One completion per request, in order."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What makes outputs reproducible: model id, revision, dtype... (recorded in results)."""

    # Steering capability (HF backend). Defenses that need it check `supports_steering` first.
    @property
    def num_layers(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not expose decoder layers")

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not expose decoder layers")

    def last_token_states(self, requests: list[Request], layers: list[int]) -> "torch.Tensor":
        """[batch, len(layers), hidden] outputs of the given decoder layers at the last prompt token."""
        raise NotImplementedError(f"{type(self).__name__} does not support steering")

    def close(self) -> None:
        """Release resources (client sessions, GPU memory)."""
