"""HiddenDetect's arithmetic and its fitted state, kept apart from the defense so each is small.

The arithmetic is a handful of pure functions on tensors (the refusal vector R, the per-layer
cosines F_l, the trapezoid score, the band rule; the threshold at a false-positive rate and AUROC
are the shared ones of `harness.defenses.thresholds`), so tests can check each against a hand
computation without a model.

The state (`HiddenDetectState`) holds what calibration measured: every calibration sample's F_l
at every layer, per role. Band and threshold are derived from these curves with the run's own
parameters, so a run's recorded `band_rule`, `layers`, `fpr` and `threshold` are exactly what was
applied, and changing `fpr` needs no new forward pass. The manifest also records the values for
the parameters the state was fitted with (band, τ, AUROC, FDV curve) for a human reading the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.contracts.backend import Backend
from harness.defenses.state_file import read_state, write_state
from harness.defenses.thresholds import auroc, threshold_at_fpr
from harness.defenses.vectors import FORMAT_VERSION, model_key, model_mismatch
from harness.errors import DataError

KIND = "hiddendetect-curves"

#: The refusal words whose first token ids make the multi-hot vector R, verbatim and in order from
#: the public HiddenDetect code (github.com/leigest519/HiddenDetect, commit 2fd161b, code/test.py,
#: `refusal_lst`; the same list is in code/safety_aware_layers.py). The list was written for
#: LLaVA's Llama tokenizer; `words_file=` loads another (one word per line, see `load_words`).
REFUSAL_WORDS: tuple[str, ...] = (
    "Sorry", "sorry",
    "unfortunately", "unfortunate", "sadly",
    "explicit", "deadly", "crim", "criminal", "illegal", "dangerous", "harmful", "warning", "alarm", "caution",
    "shame", "conspiracy",
    "Subject", "contrary", "shouldn",
)


def load_words(path: str | Path) -> tuple[str, ...]:
    """Words from a text file, one per line. A line is kept as written apart from its line ending,
    so a leading space (which selects a different first token in byte-level BPE tokenizers, e.g.
    " sorry") survives; empty lines and lines starting with `#` are skipped."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"words_file {path}: cannot read it ({exc.strerror or exc})") from None
    words = tuple(line.rstrip("\r\n") for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not words:
        raise DataError(f"words_file {path} names no word")
    return words


def words_digest(words: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(words)).encode()).hexdigest()[:16]


# ---- arithmetic ------------------------------------------------------------------------------------
def layer_cosines(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """F [..., L] = cos(logits, R) with R multi-hot at `token_ids` (a repeated id counts once, as
    setting R[id] = 1 twice does), computed in float64 without materialising R."""
    ids = sorted({int(i) for i in token_ids})
    vocab = logits.shape[-1]
    if not ids or ids[-1] >= vocab or ids[0] < 0:
        raise DataError(f"refusal token ids {ids} do not fit the model's {vocab}-token output")
    x = logits.double()
    dot = x[..., ids].sum(-1)
    return dot / (x.norm(dim=-1) * math.sqrt(len(ids))).clamp_min(1e-12)


def band_score(curves: torch.Tensor, band: Sequence[int]) -> torch.Tensor:
    """S [...] = trapezoid area (unit spacing) of F over the band's layers, taken in order.

    The trapezoid of a single point is zero for every input, so a one-layer band scores that
    layer's F instead (a unit-width bar): the only reading of "area" that still ranks inputs."""
    f = curves[..., list(band)].double()
    if f.shape[-1] == 1:
        return f[..., 0]
    return (f[..., 1:] + f[..., :-1]).sum(-1) / 2


def fdv_curve(f_unsafe: torch.Tensor, f_safe: torch.Tensor) -> torch.Tensor:
    """FDV_l = mean F_l(unsafe) - mean F_l(safe): where the refusal signal separates the two sets."""
    return f_unsafe.double().mean(0) - f_safe.double().mean(0)


def band_from_fdv(fdv: torch.Tensor, rule: str) -> tuple[list[int], bool]:
    """(band, fell_back). The public rule keeps the layers whose FDV exceeds FDV at the last layer.
    `span` closes them into one contiguous range (the public scorer slices F[s:e+1]); `exceed` keeps
    exactly those layers. If no layer exceeds the last, the last layer is the band (fell_back)."""
    last = float(fdv[-1])
    picked = [i for i, v in enumerate(fdv.tolist()) if v > last]
    if not picked:
        return [len(fdv) - 1], True
    if rule == "span":
        return list(range(picked[0], picked[-1] + 1)), False
    if rule == "exceed":
        return picked, False
    raise ValueError(f"unknown band rule {rule!r}")


@dataclass(frozen=True)
class Decision:
    """The band and threshold a run applies, and how they were obtained (for the trace and logs)."""

    band: list[int]
    tau: float
    band_source: str  # "layers" (explicit), "span"/"exceed" (rule on the calibration curves), "fallback"
    tau_source: str  # "threshold" (explicit) or "fpr=<x>" (calibration)
    calibration_auroc: float | None = None


def decide(num_layers: int, band: list[int] | None, rule: str, threshold: float | None, fpr: float,
           f_unsafe: torch.Tensor | None, f_safe: torch.Tensor | None) -> Decision:
    """Band: explicit, else the rule on the calibration FDV. τ: explicit, else at `fpr` on the safe set."""
    have_curves = f_unsafe is not None and f_safe is not None
    if band is None:
        if not have_curves:
            raise DataError("hiddendetect needs layers= or calibration curves to choose its band")
        band, fell_back = band_from_fdv(fdv_curve(f_unsafe, f_safe), rule)  # type: ignore[arg-type]
        band_source = "fallback" if fell_back else rule
    else:
        band_source = "layers"
    if max(band) >= num_layers:
        raise DataError(f"hiddendetect band {band} does not fit a model with {num_layers} layers")
    score_auc = None
    if have_curves:
        score_auc = auroc(band_score(f_unsafe, band), band_score(f_safe, band))  # type: ignore[arg-type]
    if threshold is None:
        if f_safe is None:
            raise DataError("hiddendetect needs threshold= or calibration curves to choose τ")
        return Decision(band, threshold_at_fpr(band_score(f_safe, band), fpr), band_source, f"fpr={fpr}", score_auc)
    return Decision(band, float(threshold), band_source, "threshold", score_auc)


# ---- the fitted state ------------------------------------------------------------------------------
@dataclass
class HiddenDetectState:
    """Per-role calibration curves F [n, num_layers] (float64) plus a JSON manifest; a `FittedState`."""

    curves: dict[str, torch.Tensor]  # "unsafe", "safe"
    manifest: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        manifest = {**self.manifest, "kind": KIND, "format_version": FORMAT_VERSION}
        return write_state(path, {f"f_{role}": c.detach().double() for role, c in self.curves.items()}, manifest)

    @classmethod
    def load(cls, path: str | Path) -> HiddenDetectState:
        path, tensors, manifest = read_state(path, "hiddendetect state", "`realign fit --defense hiddendetect ...`",
                                             framework="pt", kind=KIND, required=("f_unsafe", "f_safe"))
        return cls({"unsafe": tensors["f_unsafe"].double(), "safe": tensors["f_safe"].double()}, manifest)

    def check_model(self, backend: Backend, where: str | Path | None = None) -> None:
        """Refuse curves measured on other weights or depth (the same rule as fitted vectors)."""
        where = f"hiddendetect state {where}" if where else "hiddendetect state"
        want = model_key(backend)
        differs = model_mismatch(self.manifest.get("model_key", {}), want)
        if differs:
            raise DataError(f"{where} was made for {differs}; fit it for this model with `realign fit`")
        for role, c in self.curves.items():
            if c.ndim != 2 or c.shape[1] != want["num_layers"]:
                raise DataError(f"{where}: {role} curves have shape {tuple(c.shape)}, expected [n, {want['num_layers']}]")

    def calibration_ids(self) -> set[str]:
        return set(self.manifest.get("calibration", {}).get("ids", []))
