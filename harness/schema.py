"""Records that flow through a run: samples, generations, verdicts, configs and results.

Every stage writes plain JSON built from these dataclasses, so any later stage (judging,
scoring, the leaderboard) can be re-run from the run directory alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from PIL import Image

from harness.spec import SpecError

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


#: The values of `--dtype`: the HF backend's `dtype` parameter (a test keeps the two equal).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def check_count(option: str, value: Any, minimum: int, optional: bool = False) -> None:
    """An integer option at least `minimum`, or a SpecError naming the option as typed (`--batch-size`):
    a zero batch size or token budget would otherwise fail deep in generation, or silently do nothing."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{option} must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(f"{option} must be at least {minimum}, got {value}")


def check_dtype(value: Any) -> None:
    """`--dtype`: None (the backend's default) or one of DTYPE_CHOICES; anything else used to be
    recorded as asked and then loaded as float32, so the run claimed a precision it never used."""
    if value is not None and value not in DTYPE_CHOICES:
        raise SpecError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {value!r}")


def _check_sampling(do_sample: bool, temperature: Any, top_p: Any) -> None:
    for option, value in (("--temperature", temperature), ("--top-p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise SpecError(f"{option} must be a number, got {value!r}")
    if temperature < 0:
        raise SpecError(f"--temperature must be above 0, got {temperature:g}")
    if do_sample and temperature == 0:
        raise SpecError("--temperature must be above 0 when sampling (--do-sample), got 0; "
                        "leave out --do-sample for greedy decoding")
    if not 0 < top_p <= 1:
        raise SpecError(f"--top-p must be in (0, 1], got {top_p:g}")


#: Generation orders of a cell's pending samples (harness.batching.ordered).
ORDERS = ("length", "task")


@dataclass
class RunConfig:
    """Everything that decides what a run generates. Stored in run.json and compared on resume.

    Values are checked when the config is built, so the CLI and the Python API refuse the same
    mistakes with the same message naming the option; a config read back from run.json
    (`from_json`) is taken as recorded, so an old run stays readable and re-judgeable.
    """

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
    #: Attack specs (harness.contracts.attack); `none` sends each task's samples as released.
    attacks: list[str] = field(default_factory=lambda: ["none"])
    #: Generation order of a cell's pending samples (harness.batching): `length` or `task`.
    order: str = "length"
    check: dataclasses.InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        if not check:
            return
        check_count("--batch-size", self.batch_size, 1)
        check_count("--limit", self.limit, 1, optional=True)
        check_count("--max-new-tokens", self.max_new_tokens, 1)
        check_count("--min-new-tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise SpecError(f"--min-new-tokens ({self.min_new_tokens}) is above --max-new-tokens ({self.max_new_tokens})")
        check_count("--seed", self.seed, -(2**63))  # any integer torch accepts
        _check_sampling(self.do_sample, self.temperature, self.top_p)
        check_dtype(self.dtype)
        if self.device is not None and (not isinstance(self.device, str) or not self.device.strip()):
            raise SpecError(f"--device must name a device (cpu, cuda, cuda:N, mps), got {self.device!r}")
        if self.order not in ORDERS:
            raise SpecError(f"--order must be {' or '.join(ORDERS)}, got {self.order!r}")
        if not self.attacks:
            raise SpecError("--attack needs at least one attack spec (none: the tasks as released)")

    # Fields that may change between a run and its resumption without changing any output:
    # judges can be added, the limit raised, and batching and its order changed.
    RESUMABLE_FIELDS = ("judges", "limit", "batch_size", "order")

    def generation_identity(self) -> dict[str, Any]:
        """What must match for a run directory to be resumed. `attacks` is left out while it is just
        `none`, so a directory written before attacks existed resumes under the same command."""
        data = dataclasses.asdict(self)
        for name in self.RESUMABLE_FIELDS:
            data.pop(name)
        if data["attacks"] == ["none"]:
            data.pop("attacks")
        return data

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names}, check=False)


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
    """One (model, attack, defense, task, judge) cell of results.json. Records written before
    attacks existed have no `attack` field: they read as attack `none` (the task as released)."""

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
    attack: str = "none"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultRecord:
        metrics = {k: MetricValue(**v) for k, v in data["metrics"].items()}
        names = {f.name for f in dataclasses.fields(cls)}
        rest = {k: v for k, v in data.items() if k in names and k != "metrics"}
        return cls(metrics=metrics, **rest)


def record_attack(record: dict[str, Any]) -> str:
    """The attack of a results.json record: records written before attacks existed carry none, and
    were made with the tasks as released, i.e. attack `none`."""
    return str(record.get("attack") or "none")


def record_key(record: dict[str, Any]) -> tuple[str, str, str, str, str | None]:
    """(model, attack, defense, task, judge): what identifies one record of results.json."""
    return (record["model"], record_attack(record), record["defense"], record["task"], record["judge"])
