"""The defense contract: a defense wraps a backend and turns samples into generations.

A defense never sees the task's metric or the judge. It declares the capabilities it needs
(`requires`, checked on the backend class when the run is planned) and, if it must be fitted
before it can generate (CMRM's mean shift, ShiftDC's safety direction, AdaShield-A's prompt
pool), what its calibration is: `calibration()` says which file to load or which calibration
sets to fit on, `fit()` computes a `FittedState`, `load_state()` reads one back and
`use_state()` installs it. Loading, fitting, caching and checking live once, in
`harness.calibration`, for every defense.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from harness.contracts.backend import (
    CAPABILITIES,
    Backend,
    Completion,
    GenerationParams,
    Request,
    missing_capabilities,
    user_request,
)
from harness.errors import CapabilityError, DataError
from harness.schema import Generation, Sample


@dataclass
class DefenseContext:
    """What the runner tells the calibration stage before a defense generates for one cell.

    `cache_dir` is where fitted state may be cached inside the run directory; `eval_ids` lets the
    stage refuse calibration data that overlaps the evaluation samples.
    """

    cache_dir: Path
    eval_ids: frozenset[str] = field(default_factory=frozenset)
    batch_size: int = 8
    progress: bool = False


@runtime_checkable
class FittedState(Protocol):
    """What `Defense.fit` returns: tensors or prompts plus a JSON manifest naming the model,
    the parameters and the calibration ids it was fitted on."""

    manifest: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        """Write the state (and its manifest) atomically; return the path written."""
        ...

    def check_model(self, backend: Backend, where: str) -> None:
        """Refuse (DataError) or warn when the state was made for another model."""
        ...

    def calibration_ids(self) -> set[str]:
        """Sample ids the state was fitted on (to refuse overlap with the evaluation)."""
        ...


@dataclass(frozen=True)
class CalibrationSet:
    """One role of a calibration (e.g. `unsafe`), the task spec it came from and its samples
    (images loaded)."""

    spec: str
    samples: list[Sample]


@dataclass(frozen=True)
class CalibrationPlan:
    """What a configured defense needs before it generates: a fitted file to load, or calibration
    task specs (by role) to fit on, cached in the run directory under `kind`-<hash>."""

    kind: str
    file: str | None = None
    sets: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    allow_overlap: bool = False
    fit_key: dict[str, Any] = field(default_factory=dict)  # the parameters that change the fitted state
    missing: str = "this defense needs a fitted file or calibration task specs"  # the error when neither is given


class Defense(ABC):
    Params: ClassVar[type]
    #: Capabilities the backend class must offer, by name (see harness.contracts.backend.CAPABILITIES).
    requires: ClassVar[frozenset[str]] = frozenset()
    spec: str = ""

    def __init__(self, params: Any) -> None:
        self.params = params

    # ---- capabilities --------------------------------------------------------------------------
    def check_backend_class(self, backend_cls: type, model_spec: str) -> None:
        """Refuse, before anything loads, a backend class that lacks a required capability."""
        missing = missing_capabilities(backend_cls, self.requires)
        if missing:
            needs = ", ".join(CAPABILITIES[m][1] for m in missing)
            raise CapabilityError(f"defense {self.spec!r} needs {needs}, which backend {model_spec!r} "
                                  f"({backend_cls.__name__}) does not offer; use an HF model")

    def check_backend(self, backend: Backend) -> None:
        self.check_backend_class(type(backend), backend.spec)

    # ---- calibration (optional) ----------------------------------------------------------------
    def calibration(self) -> CalibrationPlan | None:
        """What must be loaded or fitted before generating; None for a defense that needs nothing."""
        return None

    def fit(self, backend: Backend, sets: dict[str, CalibrationSet], batch_size: int = 8,
            progress: bool = False) -> FittedState:
        """Compute the state from calibration sets (by role: `anchor`, `unsafe`, `safe`)."""
        raise DataError(f"defense {self.spec!r} has nothing to fit")

    def load_state(self, path: str | Path) -> FittedState:
        """Read a state written by `FittedState.save` (DataError when it is not one of ours)."""
        raise DataError(f"defense {self.spec!r} has no fitted state to load")

    def use_state(self, state: FittedState, backend: Backend) -> None:
        """Install a loaded or fitted state before generating."""

    @classmethod
    def fits(cls) -> bool:
        """Whether this defense class can be fitted at all (`realign fit`)."""
        return cls.fit is not Defense.fit

    # ---- generation ----------------------------------------------------------------------------
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
    return user_request(sample.text if text is None else text, image)  # type: ignore[arg-type]


def generation(sample: Sample, request: Request | None, completion: Completion, seconds: float,
               trace: dict[str, Any], **timings: float) -> Generation:
    """The one way a defense turns a backend completion into a recorded Generation."""
    return Generation(
        sample_id=sample.id,
        output=completion.text,
        prompt=request.to_json() if request is not None else [],
        trace=trace,
        timings={"seconds": seconds, **timings},
        tokens={"prompt": completion.prompt_tokens, "completion": completion.completion_tokens},
        error=completion.error,
    )


def timed_generate(
    backend: Backend, requests: list[Request], params: GenerationParams, **kwargs: Any
) -> tuple[list[Any], float]:
    """Run one batched backend call and return (completions, seconds per request)."""
    start = time.perf_counter()
    completions = backend.generate(requests, params, **kwargs)
    elapsed = time.perf_counter() - start
    return completions, elapsed / max(len(requests), 1)
