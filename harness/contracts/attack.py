"""The attack contract: a harmful request in, the multimodal input actually sent out.

An attack is the third axis of a run beside the defense and the task: any attack applies to any
task whose samples carry a plain harmful request (`Task.attackable`), against any defense. It
never sees the model, the defense, the judge or the metric; it rewrites one sample at a time,
deterministically for a given seed, and says what it did.

Why the sample keeps its id and its plain request: cells are keyed by attack, so the same id
under two attacks is a paired comparison; and a judge must score the answer against the request
the attacker *meant* (`Sample.query`, i.e. `meta["query"]`), never against an encoding of it
(a base64 image, a shuffled sentence) that the judge cannot read.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any, ClassVar

from harness.schema import Sample

#: Keys an attack writes into the attacked sample's meta.
QUERY = "query"  # the plain harmful request (what judges read)
ATTACK = "attack"  # the attack's record: its spec, seed and every random choice


def attack_seed(seed: int, attack: str, sample_id: str) -> int:
    """A 64-bit seed for one sample under one attack: independent of batch order and of the other
    samples, so a resumed or re-batched run draws exactly the same choices."""
    digest = hashlib.sha256(f"{seed}\x1f{attack}\x1f{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class Attack(ABC):
    """Turn a harmful request into the input sent to the model.

    Subclasses register with `@attack("name")` (harness.registry) and declare a nested `Params`
    dataclass. `apply` must not load or render heavy images eagerly: return the image as a
    zero-argument callable (`Sample.image` accepts one) so it is drawn only when its batch runs.
    """

    Params: ClassVar[type]
    spec: str = ""
    #: Model calls the attack itself makes per sample (an LLM key-phrase rewriter, for example);
    #: generation by the evaluated model is not counted here.
    calls_per_sample: ClassVar[int] = 0

    def __init__(self, params: Any) -> None:
        self.params = params

    @abstractmethod
    def apply(self, sample: Sample, seed: int) -> Sample:
        """The attacked sample: same id and category, `text`/`image` replaced by what is sent,
        `meta[QUERY]` the plain request, `meta[ATTACK]` a JSON-able record of every choice made
        (use `attacked()` to build it). `seed` is the run's seed; derive per-sample randomness
        with `attack_seed(seed, self.spec, sample.id)`."""

    def cost(self) -> str:
        """What the attack itself costs, beside the evaluated model's answer (for `realign list`):
        a helper model's calls, or a white-box attack's optimisation passes."""
        return f"{self.calls_per_sample} model calls of its own per sample"

    def identity(self) -> dict[str, Any]:
        """What the results record about this attack (spec, parameters, data such as fonts or
        prompt files with their hashes)."""
        return {"spec": self.spec}

    # ---- white-box attacks (optional) -----------------------------------------------------------
    #: Whether the attack needs the evaluated model (and, adaptively, a defense) before it applies:
    #: the runner then calls `prepare` once the model is loaded (harness.whitebox.handover).
    needs_model: ClassVar[bool] = False

    def through(self) -> str | None:
        """The defense spec a white-box attack optimises through (None: the undefended model)."""
        return None

    def prepare(self, backend: Any, defense: Any | None, context: Any) -> None:
        """Receive the loaded backend and the calibrated defense to optimise through (or None);
        only called when `needs_model`. The attack keeps them; it never imports a defense."""

    def apply_batch(self, samples: list[Sample], seed: int) -> list[Sample]:
        """The attacked samples of one batch; white-box attacks optimise them together."""
        return [self.apply(s, seed) for s in samples]

    def cell_identity(self, defense_spec: str) -> dict[str, Any]:
        """`identity()` as recorded for the cell evaluated under `defense_spec` (a white-box attack adds
        its regime there: transfer, adaptive or cross)."""
        return self.identity()

    def attacked(self, sample: Sample, text: str, image: Any, record: dict[str, Any]) -> Sample:
        """A copy of `sample` sending `text` and `image`, keeping the plain request for judges."""
        meta = {**sample.meta, QUERY: sample.query, ATTACK: {"spec": self.spec, **record}}
        return replace(sample, text=text, image=image, meta=meta,
                       image_ref=f"attack:{self.spec}:{sample.id}" if image is not None else None)
