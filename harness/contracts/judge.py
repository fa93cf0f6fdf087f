"""The judge contract: (sample, generation) -> verdict, with the judge's identity recorded."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from harness.schema import Generation, Sample, Verdict


class Judge(ABC):
    Params: ClassVar[type]
    spec: str = ""

    def __init__(self, params: Any) -> None:
        self.params = params

    @abstractmethod
    def verdicts(self, samples: list[Sample], generations: list[Generation]) -> list[Verdict]:
        """One verdict per (sample, generation) pair, in order. A generation that failed is `error`."""

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec, "params": dataclasses.asdict(self.params)}
