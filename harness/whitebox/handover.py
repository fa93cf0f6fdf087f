"""The runner's side of a white-box attack: hand it the loaded model and the calibrated defense it
optimises through.

Why here and not in the attack: an attack may not import defenses or the calibration stage (the
architecture rules), and a defense never learns of the attack. The runner knows both, so it calls
`prepare_attack` once per cell before applying the attack: the defense named by `through=` is the
cell's own defense object when the specs agree (the adaptive regime: optimised against exactly what
is evaluated), else it is built and calibrated here once per run and kept on the attack.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from harness import calibration
from harness.contracts.attack import Attack
from harness.contracts.backend import Backend
from harness.contracts.defense import Defense, DefenseContext
from harness.registry import defenses
from harness.spec import parse_spec
from harness.store import slug


@dataclass(frozen=True)
class WhiteboxContext:
    """What a white-box attack gets besides the model: where its optimisations are cached (inside
    the run directory unless the attack names its own `cache=`) and whether to show progress."""

    cache_dir: Path
    progress: bool = False


def through_defense(attack: Attack, cell_defense: Defense, backend: Backend, context: DefenseContext,
                    run_root: Path | None = None) -> Defense | None:
    """The calibrated defense `attack` optimises through, or None for the undefended model. A defense
    built here is calibrated into the folder its own cells use (so it is fitted once per run)."""
    spec = attack.through()
    if spec is None:
        return None
    if str(parse_spec(cell_defense.spec)) == spec:
        return cell_defense
    built: dict[str, Defense] = attack.__dict__.setdefault("_through_built", {})
    if spec not in built:
        defense = defenses.build(spec)
        if run_root is not None:  # the fitted folder of this (model, defense), as harness.store.Cell names it
            context = replace(context, cache_dir=Path(run_root) / slug(backend.spec) / slug(spec) / "fitted")
        calibration.prepare(defense, backend, context)
        built[spec] = defense
    return built[spec]


def prepare_attack(attack: Attack, backend: Backend, cell_defense: Defense, context: DefenseContext,
                   run_root: Path, progress: bool) -> None:
    """Prepare a white-box attack for one cell (no-op for any other attack)."""
    if not attack.needs_model:
        return
    defense = through_defense(attack, cell_defense, backend, context, run_root)
    attack.prepare(backend, defense, WhiteboxContext(Path(run_root) / "whitebox", progress))

