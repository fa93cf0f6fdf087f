"""A detector's threshold calibrated on a model's scores: the threshold at a false-positive rate,
AUROC, and the key naming the model whose scores they were.

Several defenses flag an input when a score lies strictly above a threshold, and set that
threshold on benign calibration samples (JailGuard's θ on answer divergence, HiddenDetect's τ on
its refusal score, QGuard's τ on its graph risk). The rule, the separation measure and the model
check are the same for all of them, so they are written once here, on plain numbers, and tested
against hand computations without a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from harness.contracts.backend import Backend
from harness.errors import DataError


def threshold_at_fpr(benign_scores: Iterable[float], fpr: float) -> float:
    """τ such that at most floor(fpr·n) of the n benign scores lie strictly above it (the flag rule
    is score > τ, so a score equal to τ passes): the (k+1)-th largest benign score, k = floor(fpr·n)
    (a hair of tolerance keeps e.g. 0.29·100 at k = 29). No interpolation, so τ is always an
    observed score and the calibration false-positive rate never exceeds `fpr`."""
    scores = sorted((float(x) for x in benign_scores), reverse=True)
    if not scores:
        raise DataError("the benign calibration set gave no score to set a threshold on")
    k = min(math.floor(fpr * len(scores) + 1e-9), len(scores) - 1)
    return scores[k]


def auroc(positive: Sequence[float] | Any, negative: Sequence[float] | Any) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney) formula: the share of (positive,
    negative) pairs the score orders correctly, ties counting one half. NaN if a side is empty.
    Takes lists, numpy arrays or CPU tensors."""
    pos = np.asarray(positive, dtype=np.float64).reshape(-1, 1)
    neg = np.asarray(negative, dtype=np.float64).reshape(1, -1)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    wins = float((pos > neg).sum()) + 0.5 * float((pos == neg).sum())
    return wins / (pos.size * neg.size)


def backend_key(backend: Backend) -> dict[str, Any]:
    """The model a score (and so a threshold) belongs to: its folder fingerprint where it has one,
    else its name and revision. Needs nothing but `identity()`, so it works for API backends too."""
    ident = backend.identity()
    key = {"model": ident.get("model") or ident.get("pretrained") or backend.spec, "revision": ident.get("revision")}
    if ident.get("folder_hash"):
        key["fingerprint"] = ident["folder_hash"]
    return key


def key_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """The first key on which two `backend_key`s differ, or None: the fingerprint when both have
    one (then path strings do not matter), else the model name and revision."""
    keys = ["fingerprint"] if have.get("fingerprint") and want.get("fingerprint") else ["model", "revision"]
    return next((key for key in keys if have.get(key) != want.get(key)), None)
