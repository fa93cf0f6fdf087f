"""Records that flow through a run: samples, generations, verdicts, configs and results.

Every stage writes plain JSON built from these dataclasses, so any later stage (judging,
scoring, the leaderboard) can be re-run from the run directory alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from PIL import Image

VerdictLabel = Literal["unsafe", "safe", "refusal", "error"]
VERDICT_LABELS: tuple[str, ...] = ("unsafe", "safe", "refusal", "error")


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(obj: Any) -> str:
    """Canonical one-line JSON (sorted keys) used for every record the harness writes."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=_json_default)


def config_hash(obj: Any) -> str:
    return hashlib.sha256(dumps(obj).encode()).hexdigest()[:16]


@dataclass
class Sample:
    """One benchmark input. `image` is a file path, an in-memory image, a zero-argument callable
    that renders one (drawn only when its batch runs, so a task can stay lazy), or None.

    In-memory images are not serialised; `image_ref` records where an
    image came from so a record stays traceable without its pixels.
    """

    id: str
    text: str
    image: str | Image.Image | Callable[[], Image.Image] | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    image_ref: str | None = None

    def has_image(self) -> bool:
        return self.image is not None

    @property
    def query(self) -> str:
        """The request in plain text form: `meta["query"]` when the task gives one (e.g. FigStep's
        question, whose image carries the request), else the text sent with the image."""
        return str(self.meta.get("query") or self.text)

    def to_json(self) -> dict[str, Any]:
        ref = self.image_ref
        if ref is None and isinstance(self.image, str):
            ref = self.image
        elif ref is None and self.image is not None:
            ref = "<in-memory>"
        return {"id": self.id, "text": self.text, "image_ref": ref, "category": self.category, "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        return cls(
            id=data["id"],
            text=data["text"],
            image=None,
            category=data.get("category"),
            meta=data.get("meta") or {},
            image_ref=data.get("image_ref"),
        )


@dataclass
class Generation:
    """What a defense produced for one sample.

    `prompt` is the final request as sent (images replaced by a reference), `trace` keeps the
    defense's intermediate steps (captions, self-checks, vector norms) for auditing.
    """

    sample_id: str
    output: str
    prompt: list[dict[str, Any]] = field(default_factory=list)
    trace: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Generation:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Verdict:
    """A judge's decision on one generation; `raw` keeps the judge's own words."""

    sample_id: str
    label: VerdictLabel
    judge: str
    raw: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in VERDICT_LABELS:
            raise ValueError(f"verdict label {self.label!r} is not one of {', '.join(VERDICT_LABELS)}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunConfig:
    """Everything that decides what a run generates. Stored in run.json and compared on resume."""

    models: list[str]
    defenses: list[str]
    tasks: list[str]
    judges: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    device: str | None = None
    dtype: str | None = None

    # Fields that may change between a run and its resumption without changing any output:
    # judges can be added, the limit raised, and batching changed.
    RESUMABLE_FIELDS = ("judges", "limit", "batch_size")

    def generation_identity(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in self.RESUMABLE_FIELDS:
            data.pop(name)
        return data

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class MetricValue:
    """A metric with its 95% interval and the number of samples it rests on."""

    value: float
    low: float | None = None
    high: float | None = None
    n: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ResultRecord:
    """One (model, defense, task, judge) cell of results.json."""

    model: str
    defense: str
    task: str
    judge: str | None
    n: int
    metrics: dict[str, MetricValue]
    generation_errors: int = 0
    judge_errors: int = 0
    identity: dict[str, Any] = field(default_factory=dict)
    #: metric name -> what it means (kind, better, unit, scale, headline), as its task declared it
    meanings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultRecord:
        metrics = {k: MetricValue(**v) for k, v in data["metrics"].items()}
        names = {f.name for f in dataclasses.fields(cls)}
        rest = {k: v for k, v in data.items() if k in names and k != "metrics"}
        return cls(metrics=metrics, **rest)
