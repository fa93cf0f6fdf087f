"""JailGuard's divergence of a set of answers, over a pluggable text similarity.

The computation is the public code's (`utils/utils.py`, `update_divergence`): an N x N matrix
of pairwise similarities of the answers (their first 100 characters in image mode), every entry
clipped below at 0.01, each row normalised to sum to 1 and read as a distribution; the KL
divergence KL(row_i || row_j) for every pair i != j, clipped above at 100; the divergence is
the largest of them. Identical answers give 0; one answer unlike the rest gives a large value.
With similarities in [0, 1] and 1 on the diagonal the ceiling never binds (no ratio of row
entries exceeds 100·N, so KL <= ln(100·N), 6.7 for N = 8); it is kept for other measures.

The public code measures similarity with spaCy's `en_core_web_md` document vectors (the mean of
word vectors). spaCy is not a dependency here, so the default (`ngram`) is a harness choice: the
cosine of bag-of-character-n-gram counts (lower-cased, whitespace collapsed). Why: it needs no
model download, is deterministic across machines and versions, has no tokenizer or vocabulary
(so misspellings and odd tokens from small models still count), and it is sensitive to exactly
what mutations change in an answer: wording. Its scale differs from spaCy's: unrelated answers
score near 0 here (0.02-0.06 on a few English pairs we tried; a reworded one about 0.8), while
averaged word vectors rate most pairs of English sentences as fairly close. The θ that suits one
does not suit the other, so calibrate θ on benign inputs rather than reuse the published 0.02.
`similarity=spacy` uses spaCy's vectors, when spaCy and the model are installed.

A calibrated θ (`ThetaState`) is the divergence that at most a target share of benign calibration
samples exceed (`threshold_at_fpr`, shared with the other calibrated detectors). It is saved like
every fitted state (safetensors: the calibration divergences, with a manifest naming the model,
the settings and the sample ids) and refused for another model: a divergence scale depends on how
that model answers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from harness.contracts.backend import Backend
from harness.defenses.state_file import read_state, write_state
from harness.defenses.thresholds import backend_key, key_mismatch
from harness.errors import DataError

Similarity = Callable[[str, str], float]
SIM_FLOOR = 0.01
KL_CEILING = 100.0
SPACY_MODEL = "en_core_web_md"


def char_ngrams(text: str, n: int) -> Counter[str]:
    """Counts of the character n-grams of `text`, lower-cased with whitespace runs collapsed; a
    non-empty text shorter than n is one gram."""
    norm = " ".join(text.lower().split())
    if not norm:
        return Counter()
    if len(norm) <= n:
        return Counter([norm])
    return Counter(norm[i : i + n] for i in range(len(norm) - n + 1))


def ngram_similarity(n: int = 3) -> Similarity:
    """Cosine of character n-gram counts: 1 for equal texts (exactly), 0 when one text is empty
    and the other is not (as spaCy scores an empty document), 1 when both are empty."""

    def similarity(a: str, b: str) -> float:
        if a == b:
            return 1.0
        ca, cb = char_ngrams(a, n), char_ngrams(b, n)
        if not ca or not cb:
            return 1.0 if not ca and not cb else 0.0
        dot = sum(v * cb[k] for k, v in ca.items())
        return dot / math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))

    return similarity


@lru_cache(maxsize=1)
def _spacy_model(name: str) -> object:
    try:
        import spacy  # type: ignore[import-not-found]
    except ImportError:
        raise DataError("jailguard similarity=spacy needs spaCy (pip install spacy) and its "
                        f"{name} model; the default similarity=ngram needs nothing") from None
    try:
        return spacy.load(name)
    except OSError:
        raise DataError(f"jailguard similarity=spacy: spaCy model {name} is not installed "
                        f"(python -m spacy download {name})") from None


def spacy_similarity(name: str = SPACY_MODEL) -> Similarity:
    """spaCy's document-vector similarity, as the public code uses (loaded on first use)."""
    nlp = _spacy_model(name)

    def similarity(a: str, b: str) -> float:
        return float(nlp(a).similarity(nlp(b)))  # type: ignore[operator]

    return similarity


def similarity_matrix(texts: list[str], similarity: Similarity) -> np.ndarray:
    """The N x N matrix of pairwise similarities (each pair computed once: both measures are symmetric)."""
    n = len(texts)
    out = np.eye(n)
    for i in range(n):
        out[i, i] = similarity(texts[i], texts[i])
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = similarity(texts[i], texts[j])
    return out


def divergence_matrix(sim: np.ndarray) -> np.ndarray:
    """KL(row_i || row_j) of the clipped, row-normalised similarities (0 on the diagonal), clipped at 100."""
    rows = np.clip(np.asarray(sim, dtype=np.float64), SIM_FLOOR, None)
    p = rows / rows.sum(axis=1, keepdims=True)
    n = p.shape[0]
    kl = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                kl[i, j] = float(np.sum(p[i] * np.log(p[i] / p[j])))
    return np.clip(kl, None, KL_CEILING)


def max_divergence(sim: np.ndarray) -> float:
    """JailGuard's score of a set of answers: the largest pairwise divergence (0 for one answer)."""
    return float(divergence_matrix(sim).max()) if len(sim) else 0.0


# ---- a calibrated threshold ------------------------------------------------------------------------
THETA_KIND = "jailguard-theta"


@dataclass
class ThetaState:
    """A θ fitted on benign samples (`FittedState`): the divergences it came from and a manifest."""

    divergences: np.ndarray
    manifest: dict[str, Any]

    @classmethod
    def for_backend(cls, backend: Backend, divergences: list[float], manifest: dict[str, Any]) -> ThetaState:
        return cls(np.asarray(divergences, dtype=np.float64), {**manifest, "target": backend_key(backend)})

    def save(self, path: str | Path) -> Path:
        return write_state(path, {"divergences": self.divergences}, {**self.manifest, "kind": THETA_KIND})

    @classmethod
    def load(cls, path: str | Path) -> ThetaState:
        path, tensors, manifest = read_state(path, "jailguard theta file",
                                             "`realign fit --defense jailguard:calibration=TASK_SPEC ...`")
        if manifest.get("kind") != THETA_KIND or "divergences" not in tensors or "theta" not in manifest:
            raise DataError(f"{path} is not a jailguard theta file (kind {manifest.get('kind')!r})")
        return cls(tensors["divergences"], manifest)

    def check_model(self, backend: Backend, where: str) -> None:
        """Refuse a θ calibrated on another model (by fingerprint when both have one, else by name)."""
        have, want = self.manifest.get("target") or {}, backend_key(backend)
        key = key_mismatch(have, want)
        if key is not None:
            raise DataError(f"jailguard theta {where} was calibrated on {have.get('model')} ({key}="
                            f"{have.get(key)!r}), not {want.get('model')} ({key}={want.get(key)!r}); calibrate again")

    def calibration_ids(self) -> set[str]:
        return set(self.manifest.get("calibration", {}).get("ids", []))
