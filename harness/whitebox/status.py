"""Each defense's white-box status: what an adaptive attack (`through=<defense>`) differentiates.

Stated once here, read by the attack's parameter check (a `through=` naming a transfer-only defense
is refused before anything loads), by each result's identity and by the README. The reasons are the
ones the adaptive-attack literature gives (Athalye et al. 2018, Tramèr et al. 2020): a defense whose
decision is a sampled generation, a random mutation or a separate classifier cannot be written as one
differentiable loss here, so it is evaluated against transfer attacks only (optimised on the
undefended model, `through=none`) and says so.
"""

from __future__ import annotations

from typing import Literal

from harness.spec import SpecError, parse_spec

Status = Literal["differentiable", "transfer-only"]

#: defense name -> (status, how the adaptive loss handles it / why it cannot).
STATUS: dict[str, tuple[Status, str]] = {
    "none": ("differentiable", "the undefended model (the transfer regime's source)"),
    "cmrm": ("differentiable", "the edit -alpha*Delta stays in the autograd graph; Delta comes from a blank "
                               "image and the text, so it is a constant of the pixels"),
    "shiftdc": ("differentiable", "the correction from the image-side states is differentiated; the caption is "
                                  "held fixed and refreshed every `refresh` steps (BPDA)"),
    "refusal_dir": ("differentiable", "alpha*r is added in the graph (mode=actadd); the gate, a step function, is "
                                      "evaluated at every step without a gradient"),
    "hiddendetect": ("differentiable", "extra loss term hd_weight*relu(S - tau + hd_margin) on its logit-lens score; "
                                       "the target loss is on the undefended answer path"),
    "adashield": ("differentiable", "AdaShield-S: its prompt is kept in the input (mode=static only; the "
                                    "adaptive mode's CLIP retrieval is transfer-only)"),
    "ecso": ("transfer-only", "its answer, self-check and caption are generated text (no gradient through "
                              "sampling); BPDA on the self-check is not implemented"),
    "jailguard": ("transfer-only", "random image/text mutations and answer divergence; EOT over its "
                                   "mutations is not implemented"),
    "eta": ("transfer-only", "CLIP and reward-model evaluation with best-of-N sampling"),
    "guard": ("transfer-only", "a separate guard classifier's generated verdict"),
    "protector": ("transfer-only", "a separate harm detector and a generated detoxification"),
    "qguard": ("transfer-only", "guard questions answered by generation and a graph score; not differentiated"),
    "coca": ("transfer-only", "contrasted logits at every decoding step; not implemented as a loss here"),
}


def status_of(defense_name: str) -> tuple[Status, str]:
    """A defense's status; one this table does not know (a plugin) is transfer-only."""
    return STATUS.get(defense_name, ("transfer-only", "not known to harness.whitebox: no adaptive loss"))


def through_spec(value: str) -> str | None:
    """The defense spec `through=` names (`;` stands for `,` inside it), normalised, or None for
    `none` (transfer). Refuses a transfer-only defense with the reason."""
    text = value.strip()
    if text in ("", "none"):
        return None
    spec = parse_spec(text.replace(";", ","))
    status, why = status_of(spec.name)
    if spec.name == "adashield" and spec.as_dict().get("mode", "static") != "static":
        status, why = "transfer-only", "AdaShield-A's CLIP retrieval is not differentiated"
    if status != "differentiable":
        raise SpecError(f"through={spec.name}: {spec.name} is transfer-only for white-box attacks ({why}); "
                        f"optimise with through=none and evaluate it under --defense {spec.name}")
    return str(spec) if spec.name != "none" else None


def regime(through: str | None, defense_spec: str) -> str:
    """`transfer` (optimised on the undefended model), `adaptive` (through the evaluated defense) or
    `cross` (through another defense than the evaluated one)."""
    if through is None:
        return "transfer"
    return "adaptive" if through == str(parse_spec(defense_spec)) else "cross"
