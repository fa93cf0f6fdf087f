"""Layer selections for steering defenses: absolute (`8-15`, `1+3+5`, `last`) or relative to depth
(`all`, `half`, `top:0.25`, `bottom:0.5`, `depth:0.3-1`).

Papers rarely say which layers they edit, so the choice is a parameter. Defaults are stated relative
to depth because a default chosen on a 4-layer model must mean the same share of the network on a
32-layer one: `last` on the organism is its top quarter, on LLaVA-1.5-7B a single layer.
"""

from __future__ import annotations

import math

from harness.spec import SpecError


def _fraction(option: str, text: str, value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise SpecError(f"{option}={text!r}: {value!r} is not a fraction of depth in [0, 1]") from None
    if not 0.0 <= f <= 1.0:
        raise SpecError(f"{option}={text!r}: {value!r} is not a fraction of depth in [0, 1]")
    return f


def _relative(item: str, num_layers: int, option: str, text: str) -> list[int] | None:
    """Layers of one depth-relative item, or None when `item` is not one."""
    kind, sep, arg = item.partition(":")
    if not sep:
        named = {"all": (0.0, 1.0), "half": (0.5, 1.0)}.get(item)
        if item == "last":
            return [num_layers - 1]
        if named is None:
            return None
        kind, arg = "depth", f"{named[0]}-{named[1]}"
    if kind in ("top", "bottom"):
        count = max(1, math.floor(_fraction(option, text, arg) * num_layers + 0.5))  # half rounds up
        return list(range(num_layers - count, num_layers)) if kind == "top" else list(range(count))
    if kind == "depth":
        lo_text, dash, hi_text = arg.partition("-")
        if not dash:
            raise SpecError(f"{option}={text!r}: depth:A-B needs two fractions, e.g. depth:0.5-1")
        lo, hi = _fraction(option, text, lo_text), _fraction(option, text, hi_text)
        if lo >= hi:
            raise SpecError(f"{option}={text!r}: depth:{arg} is empty (the first fraction must be smaller)")
        start = min(math.floor(lo * num_layers), num_layers - 1)
        return list(range(start, max(start + 1, min(math.ceil(hi * num_layers), num_layers))))
    raise SpecError(f"{option}={text!r}: {item!r} is not a layer, a range a-b, all, last, half, "
                    "top:F, bottom:F or depth:A-B")


def parse_layers(text: str, num_layers: int, option: str = "layers") -> list[int]:
    """Sorted, unique decoder-layer indices for this model; an index outside [0, num_layers) is an error.

    `all` = every layer; `last` = the last one; `half` = `depth:0.5-1` (L//2 .. L-1, the ShiftDC
    code's default); `top:F` / `bottom:F` = the last / first round(F·L) layers (at least one);
    `depth:A-B` = layers floor(A·L) .. ceil(B·L)-1. Items combine with `+`.
    """
    text = text.strip()
    out: set[int] = set()
    for item in text.replace(",", "+").split("+"):
        item = item.strip()
        if not item:
            continue
        relative = _relative(item, num_layers, option, text) if not item[0].isdigit() else None
        if relative is not None:
            out.update(relative)
            continue
        try:
            if "-" in item:
                lo, hi = (int(x) for x in item.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(item))
        except ValueError:
            raise SpecError(f"{option}={text!r}: {item!r} is not a layer index or a range a-b") from None
    if not out:
        raise SpecError(f"{option}={text!r} selects no layer")
    bad = sorted(i for i in out if not 0 <= i < num_layers)
    if bad:
        raise SpecError(f"{option}={text!r}: layer(s) {bad} outside 0..{num_layers - 1} for this model")
    return sorted(out)


def check_layers(text: str, option: str = "layers") -> None:
    """Validate a layer spec's syntax before a model is loaded (bounds are checked per model later)."""
    try:
        parse_layers(text, 1024, option)
    except SpecError as exc:
        if "outside" not in str(exc):
            raise
