"""Each defense's white-box status: what an adaptive attack (`through=<defense>`) differentiates.

Stated once here, read by the attack's parameter check (a `through=` naming a transfer-only defense
is refused before anything loads), by each result's identity and by the README. The reasons are the
ones the adaptive-attack literature gives (Athalye et al. 2018, Tramèr et al. 2020): a defense whose
decision is a sampled generation, a random mutation or a separate classifier cannot be written as one
differentiable loss here, so it is evaluated against transfer attacks only (optimised on the
undefended model, `through=none`) and says so. Two detectors are made adaptive in the ways that
literature prescribes: JailGuard's random mutations by expectation over transformations (EOT), and
QGuard asked by the target itself (guard=self) by adding its risk to the loss, as Carlini & Wagner
added detectors. Some statuses depend on the defense's parameters (`status_for`): AdaShield's
retrieval mode, JailGuard's text mutations and QGuard's separate guard model stay transfer-only.
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
    "jailguard": ("differentiable", ("EOT: the target loss averaged over the unmutated image and `eot` (8) fresh "
                                     "seeded draws of its image mutations per step, reimplemented in torch (rotation "
                                     "exact; blur exact but for its 8-bit rounding and posterize, both passed "
                                     "straight through); mode=image only")),
    "eta": ("transfer-only", "CLIP and reward-model evaluation with best-of-N sampling"),
    "guard": ("transfer-only", "a separate guard classifier's generated verdict"),
    "protector": ("transfer-only", "a separate harm detector and a generated detoxification"),
    "qguard": ("differentiable", ("guard=self only: extra loss term qg_weight*relu(risk - tau + qg_margin), the "
                                  "guard questions' P(yes) read from the target's own logits and the PageRank risk "
                                  "solved in torch; the target loss is on the undefended answer path")),
    "coca": ("transfer-only", "contrasted logits at every decoding step; not implemented as a loss here"),
}


def status_of(defense_name: str) -> tuple[Status, str]:
    """A defense's status; one this table does not know (a plugin) is transfer-only."""
    return STATUS.get(defense_name, ("transfer-only", "not known to harness.whitebox: no adaptive loss"))


#: (defense, parameter, its default, the values the adaptive loss handles, why another is not).
#: QGuard's default guard is a separate model (None: the default is not handled).
BY_PARAMETER: tuple[tuple[str, str, str | None, tuple[str, ...], str], ...] = (
    ("adashield", "mode", "static", ("static",), "AdaShield-A's CLIP retrieval is not differentiated"),
    ("jailguard", "mode", "image", ("image",), ("its text mutations are discrete edits of the prompt; the EOT loss "
                                                "covers mode=image only")),
    ("qguard", "guard", None, ("self",), ("with a separate guard model its P(yes) comes from another model's "
                                          "forward, which the attack does not run; only guard=self is differentiated")),
)


def status_for(defense_spec: str) -> tuple[Status, str]:
    """The status of one defense spec: its name's (`status_of`), unless a parameter value the adaptive
    loss does not handle makes it transfer-only (BY_PARAMETER)."""
    spec = parse_spec(defense_spec)
    given = spec.as_dict()
    for name, key, default, handled, why in BY_PARAMETER:
        if spec.name == name and (given[key].strip() if key in given else default) not in handled:
            return "transfer-only", why
    return status_of(spec.name)


def through_spec(value: str) -> str | None:
    """The defense spec `through=` names (`;` stands for `,` inside it), normalised, or None for
    `none` (transfer). Refuses a transfer-only defense with the reason."""
    text = value.strip()
    if text in ("", "none"):
        return None
    spec = parse_spec(text.replace(";", ","))
    status, why = status_for(str(spec))
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
