"""Spec shorthand for selecting a run's cells: `--defense-b cmrm` names the only defense called cmrm.

Specs are exact strings (`cmrm:calibration=organism:split=calibration`), and requiring them in full
just to pick one of the few defenses a run holds made the README's own `compare` example fail.
A value that is not a spec the run holds is matched by name instead: the component's registered
name (the part before `:`) or, for a model, the last part of its path or hub id (`seed0` for
`organisms/seed0`). One match selects it; several are an error listing the candidates, so a
shorthand never picks one of two cmrm variants silently; none lists what the run holds.
"""

from __future__ import annotations

from typing import Iterable

from harness.errors import RealignError


def names_of(spec: str) -> set[str]:
    """The short names a spec answers to: its component name, and the last path part before any `:`."""
    head = spec.split(":", 1)[0]
    return {head, head.rstrip("/").rsplit("/", 1)[-1]}


def resolve(value: str | None, available: Iterable[str], level: str, where: str) -> str | None:
    """The spec among `available` that `value` names (None stays None: no selection)."""
    if value is None:
        return None
    specs = sorted(set(available))
    if value in specs:
        return value
    found = [s for s in specs if value in names_of(s)]
    if len(found) == 1:
        return found[0]
    if found:
        raise RealignError(f"{where}: --{level} {value!r} names {len(found)} {level}s; give one in full: "
                           + ", ".join(found))
    raise RealignError(f"{where}: no {level}={value!r}; it holds: {', '.join(specs) or 'no scored cells'}")
