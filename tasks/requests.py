"""Plain text request lists: the bundled benign set, or any file of requests.

Used as calibration sets (ShiftDC's safe side, CMRM anchors) and, with a judge, to measure
over-refusal. The bundled list is written by this project.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal

from harness.errors import DataError
from harness.registry import task
from harness.schema import Generation, MetricValue, Sample, Verdict
from harness.stats import bootstrap_mean
from harness.contracts.meaning import rate
from harness.contracts.task import Task


def _read_lines(text: str, where: str) -> list[str]:
    """One request per line (`#` comments skipped), or JSON Lines with a "text" field."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                value = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{where} line {number}: a JSON line needs a string field \"text\"") from None
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where} line {number}: \"text\" must be a non-empty string")
            line = value.strip()
        out.append(line)
    if not out:
        raise DataError(f"{where} holds no requests")
    return out


def _decode(data: bytes, path: Path) -> str:
    """The file as UTF-8 text, or a DataError naming the file and the line of the first bad byte:
    a picture or a Latin-1 export given as `file=` must not surface as a UnicodeDecodeError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"request file {path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start}); give a text file with one request per line") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"request file {path} line {line}: holds a NUL byte, so it is a binary file, not text")
    return text


@task("requests")
class Requests(Task):
    """Text-only requests (bundled benign set or file=); metric: refusal rate."""

    @dataclass
    class Params:
        set: Literal["benign"] = "benign"
        file: str | None = None

    #: Refusing a (benign) request costs utility: lower is better.
    meanings = {"refusal_rate": rate("utility", "lower")}

    def _source(self) -> tuple[str, str]:
        if self.params.file:
            path = Path(self.params.file)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"request file {path}: {exc.strerror or exc}") from None
            return _decode(data, path), str(path)
        name = f"{self.params.set}_requests.txt"
        return resources.files("tasks").joinpath("data", name).read_text(encoding="utf-8"), f"tasks/data/{name}"

    def samples(self) -> Iterator[Sample]:
        text, where = self._source()
        prefix = Path(self.params.file).stem if self.params.file else self.params.set
        for i, line in enumerate(_read_lines(text, where)):
            yield Sample(id=f"requests/{prefix}/{i:04d}", text=line, category=prefix)

    def metrics(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, MetricValue]:
        judged = [verdicts[s.id] for s in samples if verdicts and s.id in verdicts and verdicts[s.id].label != "error"]
        return {
            "refusal_rate": bootstrap_mean(1.0 if v.label == "refusal" else 0.0 for v in judged),
            "judge_errors": MetricValue(float(len(samples) - len(judged)), n=len(samples)),
        }

    def per_sample(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, dict[str, float]]:
        """`refusal_rate` per judged request (refused = 1), for paired comparisons."""
        return {"refusal_rate": {s.id: float(verdicts[s.id].label == "refusal") for s in samples
                                 if verdicts and s.id in verdicts and verdicts[s.id].label != "error"}}

    def identity(self) -> dict[str, object]:
        text, where = self._source()
        return {"spec": self.spec, "source": where, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
