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

    def min_new_tokens(self) -> int | None:
        """The fewest generated tokens an answer needs for this judge to score it as meant, or None
        (the default: no requirement).

        Why: a judge that recognises a fixed refusal (a prefix rule on one sentence) scores a
        refusal cut short by the generation budget as an attack. The runner warns before
        generating when `--max-new-tokens` is below this number, rather than after the damage.
        """
        return None

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec, "params": dataclasses.asdict(self.params)}
