"""The undefended baseline: every sample goes to the model as it is."""

from __future__ import annotations

from dataclasses import dataclass

from harness.contracts.defense import Defense, generation, sample_request, timed_generate
from harness.contracts.backend import Backend, GenerationParams
from harness.registry import defense
from harness.schema import Generation, Sample


@defense("none")
class NoDefense(Defense):
    """No defense: the reference every other defense is compared with."""

    @dataclass
    class Params:
        pass

    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        requests = [sample_request(s) for s in samples]
        completions, per_sample = timed_generate(backend, requests, params)
        return [generation(s, r, c, per_sample, {"model_calls": 1}) for s, r, c in zip(samples, requests, completions)]
