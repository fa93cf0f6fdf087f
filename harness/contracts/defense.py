"""The defense contract: a defense wraps a backend and turns samples into generations.

A defense never sees the task's metric or the judge. It declares the capabilities it needs
(`steering`), and the runner refuses clearly when a backend lacks one.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from harness.errors import CapabilityError
from harness.contracts.backend import Backend, GenerationParams, Request, user_request
from harness.schema import Generation, Sample


@dataclass
class DefenseContext:
    """What the runner tells a defense before it generates for one (model, task) cell.

    `cache_dir` is where fitted state may be cached inside the run directory; `eval_ids` lets
    a defense refuse calibration data that overlaps the evaluation samples.
    """

    cache_dir: Path
    eval_ids: frozenset[str] = field(default_factory=frozenset)
    batch_size: int = 8
    progress: bool = False


class Defense(ABC):
    Params: ClassVar[type]
    #: Capabilities the backend must offer, e.g. {"steering"}.
    requires: ClassVar[frozenset[str]] = frozenset()
    spec: str = ""

    def __init__(self, params: Any) -> None:
        self.params = params

    def check_backend(self, backend: Backend) -> None:
        if "steering" in self.requires and not backend.supports_steering:
            raise CapabilityError(
                f"defense {self.spec!r} needs access to decoder layers (steering), "
                f"which backend {backend.spec!r} does not offer; use an HF model"
            )

    def prepare(self, backend: Backend, context: DefenseContext) -> None:
        """Load or fit state (vectors, pools) before generating; the default needs none."""

    @abstractmethod
    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        """One Generation per sample, in order. Sample images are already loaded PIL images."""

    def identity(self) -> dict[str, Any]:
        """Every parameter, defaults included, so a result names the exact configuration."""
        return {"spec": self.spec, "params": dataclasses.asdict(self.params)}


def sample_request(sample: Sample, text: str | None = None, with_image: bool = True) -> Request:
    """The plain request for a sample: its image (if any) and its text, in one user turn."""
    image = sample.image if with_image else None
    if isinstance(image, str):
        raise TypeError(f"sample {sample.id}: image must be loaded before generation")
    return user_request(sample.text if text is None else text, image)


def timed_generate(
    backend: Backend, requests: list[Request], params: GenerationParams, **kwargs: Any
) -> tuple[list[Any], float]:
    """Run one batched backend call and return (completions, seconds per request)."""
    start = time.perf_counter()
    completions = backend.generate(requests, params, **kwargs)
    elapsed = time.perf_counter() - start
    return completions, elapsed / max(len(requests), 1)
