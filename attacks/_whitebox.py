"""What the white-box attacks (`pgd`, `visual_adv`) share: the budget parameters, `through=`, the
hand-over of model and defense, the cache key and the regime recorded per cell.

Why the attack never imports a defense: the runner hands the calibrated defense over
(`prepare`, from harness.whitebox.handover) and the loss is computed in harness.whitebox; here the
defense is only a spec string and an opaque object passed along.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from harness.contracts.attack import Attack, attack_seed
from harness.errors import DataError
from harness.images import load_image
from harness.spec import parse_spec
from harness.whitebox import store
from harness.whitebox.objectives import Plain, objective_for
from harness.whitebox.pgd import Budget
from harness.whitebox.pixels import Pipeline, from_image
from harness.whitebox.status import regime, status_for, through_spec

FILLS = {"gray": 128, "white": 255, "black": 0}
#: Parameters that do not change an optimisation's result (left out of the cache key).
NOT_IN_KEY = ("cache", "checkpoint_every")
#: Settings of one through-defense's loss: they do not change a transfer optimisation, so they are
#: left out of the `family` that pairs transfer and adaptive runs (and seeds their random starts).
THROUGH_SETTINGS = ("refresh", "hd_weight", "hd_margin", "eot", "qg_weight", "qg_margin", "qg_questions")


@dataclass
class WhiteboxParams:
    """Shared parameters: budgets and steps in 8-bit units (eps=16 means 16/255; eps=255 is unconstrained)."""

    through: str = "none"  # none (transfer) or a defense spec with `;` for its commas (adaptive)
    eps: int = 16
    step: int = 1
    steps: int = 500
    random_start: bool = True
    init: str = "sample"  # sample (its own image, else gray), gray, white, black, noise, or an image file
    checkpoint_every: int = 10
    refresh: int = 10  # ShiftDC: steps between caption refreshes (BPDA)
    hd_weight: float = 10.0  # HiddenDetect: weight of relu(S - tau + hd_margin)
    hd_margin: float = 0.0
    eot: int = 8  # JailGuard: mutated copies per step (expectation over transformations), plus the original
    qg_weight: float = 1000.0  # QGuard (guard=self): weight of relu(risk - tau + qg_margin) (risks differ by ~0.01)
    qg_margin: float = 0.0
    qg_questions: int = 0  # QGuard: guard questions asked per step, in turn, the others held (0: all)
    cache: str | None = None  # where optimisations are cached (default: <run>/whitebox)

    def __post_init__(self) -> None:
        if not 1 <= self.eps <= 255:
            raise ValueError("eps is in 8-bit units, 1..255 (255: unconstrained)")
        if self.step < 1 or self.steps < 1 or self.checkpoint_every < 1 or self.refresh < 1:
            raise ValueError("step, steps, checkpoint_every and refresh must be at least 1")
        if self.hd_weight < 0 or self.qg_weight < 0:
            raise ValueError("hd_weight and qg_weight must be >= 0")
        if self.eot < 1:
            raise ValueError(f"eot is the number of mutated copies per step, at least 1 (got {self.eot})")
        if self.qg_questions < 0:
            raise ValueError(f"qg_questions is the number of guard questions asked per step, >= 0 (0: all; got "
                             f"{self.qg_questions})")
        through_spec(self.through)  # refuses a transfer-only defense, with the reason


class WhiteboxAttack(Attack):
    """Base of the white-box attacks: subclasses define `Params` (extending WhiteboxParams) and
    `apply_batch`; `apply` optimises a batch of one."""

    needs_model: ClassVar[bool] = True

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        self._through = through_spec(params.through)
        self.backend: Any = None
        self.defense: Any = None
        self.objective: Plain | None = None
        self.context: Any = None

    # ---- the hand-over ---------------------------------------------------------------------------
    def through(self) -> str | None:
        return self._through

    def prepare(self, backend: Any, defense: Any | None, context: Any) -> None:
        if self.objective is None or self.backend is not backend or self.defense is not defense:
            settings = {k: getattr(self.params, k) for k in THROUGH_SETTINGS}
            self.objective = objective_for(backend, defense, settings)
        self.backend, self.defense, self.context = backend, defense, context

    def ready(self) -> Plain:
        if self.objective is None:
            raise RuntimeError(f"attack {self.spec}: white-box attacks need the model; the runner calls "
                               "prepare() (harness.whitebox.handover) before applying them")
        return self.objective

    def apply(self, sample: Any, seed: int) -> Any:
        return self.apply_batch([sample], seed)[0]

    def cost(self) -> str:
        extra = "" if self._through is None else ", plus the defense's own forwards in each pass"
        return (f"{self.params.steps} optimisation passes (forward and backward through the evaluated model) per "
                f"batch of samples{extra}; cached and reused per model, defense, sample and budget")

    # ---- what results record ------------------------------------------------------------------------
    def family(self) -> str:
        """The spec without `through=`, `cache=` and the through-defense's loss settings: what transfer and
        adaptive runs of one attack share (their random starts are drawn from it, and the report pairs
        regimes by it)."""
        spec = parse_spec(self.spec or getattr(type(self), "registered_name", "whitebox"))
        kept = [(k, v) for k, v in spec.params if k not in ("through", "cache", *THROUGH_SETTINGS)]
        return str(dataclasses.replace(spec, params=tuple(kept)))

    def identity(self) -> dict[str, Any]:
        status, how = status_for(self._through) if self._through else ("differentiable", "undefended")
        return {"spec": self.spec, "params": dataclasses.asdict(self.params), "family": self.family(),
                "through": self._through, "through_status": status, "through_how": how,
                "budget": self.budget().record()}

    def cell_identity(self, defense_spec: str) -> dict[str, Any]:
        status, how = status_for(defense_spec)
        return {**self.identity(), "regime": regime(self._through, defense_spec),
                "evaluated_defense": {"spec": defense_spec, "whitebox_status": status, "how": how}}

    # ---- helpers for subclasses -----------------------------------------------------------------------
    def budget(self) -> Budget:
        p = self.params
        return Budget(p.eps, p.step, p.steps, p.random_start, p.checkpoint_every, getattr(p, "refusal_weight", 1.0))

    def cache_root(self) -> Path:
        if self.params.cache:
            return Path(self.params.cache).expanduser()
        if self.context is None:
            raise RuntimeError(f"attack {self.spec}: no cache folder (prepare() not called)")
        return Path(self.context.cache_dir)

    def key_parts(self, seed: int, **extra: Any) -> dict[str, Any]:
        params = {k: v for k, v in dataclasses.asdict(self.params).items() if k not in NOT_IN_KEY}
        return {"attack": getattr(type(self), "registered_name", type(self).__name__), "params": params,
                "model": store.model_fingerprint(self.backend), "defense": store.defense_fingerprint(self.defense),
                "seed": seed, "version": 1, **extra}

    def seed_for(self, seed: int, item: str) -> int:
        return attack_seed(seed, self.family(), item)

    def clean_image(self, pipeline: Pipeline, image: Any, seed: int) -> torch.Tensor:
        """The start image in 8-bit units at the model's input size (see WhiteboxParams.init)."""
        init = self.params.init
        h, w = pipeline.size
        if init == "sample" and image is not None:
            return pipeline.initial(self.backend, load_image(image))
        if init in ("sample", *FILLS):
            return torch.full((3, h, w), FILLS.get(init, 128), dtype=torch.int16)
        if init == "noise":
            return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.int16)
        path = Path(init).expanduser()
        if not path.is_file():
            raise DataError(f"attack {self.spec}: init={init} is neither sample/gray/white/black/noise nor an image file")
        return pipeline.initial(self.backend, load_image(path))


def u_digest(u: torch.Tensor) -> str:
    return hashlib.sha256(u.to(torch.int16).numpy().tobytes()).hexdigest()[:16]


def png_loader(path: str) -> Any:
    """A zero-argument callable drawing the saved attack image (lazy, as the attack contract asks)."""
    def load() -> Image.Image:
        return load_image(path)
    return load


__all__ = ["WhiteboxAttack", "WhiteboxParams", "from_image", "png_loader", "u_digest"]
