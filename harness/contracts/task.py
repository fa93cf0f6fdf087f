"""The task contract: samples with stable ids, metrics over generations and verdicts, and what
each metric means.

A task never sees the model or the defense; it only reads the records they produced. It declares
its metrics' meanings (`meanings`: kind, better direction, scale) so analysis never guesses from
names (harness.contracts.meaning).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterator, Mapping

from harness.contracts.meaning import COMMON, UNDECLARED, MetricMeaning, lookup
from harness.schema import Generation, MetricValue, Sample, Verdict


class Task(ABC):
    Params: ClassVar[type]
    #: Safety tasks score verdicts; utility tasks parse answers themselves and need no judge.
    needs_judge: ClassVar[bool] = True
    #: Whether every sample carries a plain harmful request (`Sample.query`, with its category) that
    #: an attack (harness.contracts.attack) may rewrite; a utility task keeps False and refuses attacks.
    attackable: ClassVar[bool] = False
    #: Metric name or glob pattern -> its meaning; an exact name wins over patterns, patterns match in
    #: order. A metric the table does not cover is recorded as `other` (shown, never ranked).
    meanings: ClassVar[Mapping[str, MetricMeaning]] = {}
    spec: str = ""

    def __init__(self, params: Any) -> None:
        self.params = params

    @abstractmethod
    def samples(self) -> Iterator[Sample]:
        """Yield samples in a stable order with stable ids. Errors name the file and row at fault."""

    @abstractmethod
    def metrics(
        self,
        samples: list[Sample],
        generations: dict[str, Generation],
        verdicts: dict[str, Verdict] | None,
    ) -> dict[str, MetricValue]:
        """Metrics keyed by name (e.g. `asr`, `asr/Hate Speech`), each with a 95% interval."""

    def metric_meanings(self, metrics: Mapping[str, MetricValue]) -> dict[str, MetricMeaning]:
        """The meaning of each metric this cell produced (written into results.json). Override to
        compute a scale from the metrics present (e.g. MME totals: 200 points per subtask run)."""
        return {name: lookup(name, self.meanings) or lookup(name, COMMON) or UNDECLARED for name in metrics}

    def per_sample(
        self,
        samples: list[Sample],
        generations: dict[str, Generation],
        verdicts: dict[str, Verdict] | None,
    ) -> dict[str, dict[str, float]]:
        """Per-sample outcomes behind the headline metrics, for paired comparison of two runs:
        {metric: {sample_id: outcome}}, each outcome 0/1 (or a number whose mean is the metric).

        A sample left out of a metric (judge error, not in its group) is simply absent, so two runs
        are compared on the samples both scored. The default serves safety tasks whose `asr` is the
        share of all judged samples labelled unsafe, and checks that against `metrics` (same n), so
        a task with another headline gets no wrong pairing, just none until it overrides this.
        """
        if not self.needs_judge or verdicts is None:
            return {}
        judged = {s.id: float(verdicts[s.id].label == "unsafe")
                  for s in samples if s.id in verdicts and verdicts[s.id].label != "error"}
        asr = self.metrics(samples, generations, verdicts).get("asr")
        if asr is None or asr.n != len(judged):
            return {}
        return {"asr": judged}

    def identity(self) -> dict[str, Any]:
        """Where the data came from (paths, revisions, hashes), recorded in results."""
        return {"spec": self.spec}
