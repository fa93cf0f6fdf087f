"""The `none` attack: the task's samples as released."""

from __future__ import annotations

from dataclasses import dataclass

from harness.contracts.attack import Attack
from harness.registry import attack
from harness.schema import Sample


@attack("none")
class NoAttack(Attack):
    """No attack: each sample is sent as the task released it."""

    @dataclass(frozen=True)
    class Params:
        pass

    def apply(self, sample: Sample, seed: int) -> Sample:
        return sample
