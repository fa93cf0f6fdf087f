"""The refusal direction's fit: difference-in-means candidates per (post-instruction position, layer),
and the public code's rule for choosing one (andyrdt/refusal_direction `9d852fa`,
pipeline/run_pipeline.py, pipeline/submodules/generate_directions.py and select_direction.py).

  1. Split each class (harmful, harmless; text only, through the model's chat template) into train
     and validation samples with a seeded shuffle; with `filter`, keep harmful samples whose refusal
     score is > 0 and harmless ones whose score is < 0 (train and validation alike).
  2. r[p, l] = mean over harmful train of the block-l input at position p - the same over harmless
     train, for each of the P post-instruction positions p = -P..-1 and every layer l (float64 means).
  3. For every candidate, on the validation sets: the KL divergence of the harmless next-token
     distribution with r̂ ablated everywhere (baseline first: KL(P_base || P_ablated)); the mean
     harmful refusal score with r̂ ablated; the mean harmless refusal score with r added (coefficient
     1, unnormalised) at the block-l input, every position.
  4. Discard a candidate with any NaN score, l >= floor(max_layer_fraction·L), KL > kl_threshold, or
     an addition score < 0; pick the lowest ablation refusal score (ties: the first in the public
     order, positions -P..-1 outer, layers ascending inner).

Refusal score = log(p + 1e-8) - log(1 - p + 1e-8) with p the next-token probability mass on the
refusal tokens, in float64; KL uses the public epsilon 1e-6. The selection and scores are pure
functions on tensors, tested without a model; `fit_candidates` runs them on a backend.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from harness.contracts.backend import Backend, user_request
from harness.errors import DataError
from harness.models import hf_directions

REFUSAL_EPS = 1e-8
KL_EPS = 1e-6
INDUCE_REFUSAL_THRESHOLD = 0.0  # the public code's `induce_refusal_threshold`


# ---- scores and the rule (pure) ------------------------------------------------------------------
def refusal_score(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """[batch] float64: log(p + ε) - log(1 - p + ε), p = softmax(logits)[refusal tokens].sum()."""
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, sorted({int(i) for i in token_ids})].sum(dim=-1)
    return torch.log(p + REFUSAL_EPS) - torch.log(1.0 - p + REFUSAL_EPS)


def kl_divergence(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[batch] float64 KL(softmax(base) || softmax(other)) with the public code's ε = 1e-6 inside the logs."""
    pa, pb = torch.softmax(base.double(), dim=-1), torch.softmax(other.double(), dim=-1)
    return (pa * (torch.log(pa + KL_EPS) - torch.log(pb + KL_EPS))).sum(dim=-1)


def layer_cut(num_layers: int, max_layer_fraction: float) -> int:
    """The first excluded layer: floor(fraction·L) (the public `int(n_layer * (1.0 - 0.2))`; the hair of
    tolerance only guards against a product like 0.8·35 landing a bit below its integer)."""
    return math.floor(num_layers * max_layer_fraction + 1e-9)


def discard_reason(refusal: float, steering: float, kl: float, layer: int, cut: int, kl_threshold: float) -> str | None:
    """Why the public `filter_fn` drops a candidate, or None when it is kept (checked in its order)."""
    if math.isnan(refusal) or math.isnan(steering) or math.isnan(kl):
        return "nan"
    if layer >= cut:
        return "layer"
    if kl > kl_threshold:
        return "kl"
    if steering < INDUCE_REFUSAL_THRESHOLD:
        return "steering"
    return None


@dataclass
class Selection:
    """The chosen (position, layer), or None when every candidate was discarded, and why each was."""

    position: int | None
    layer: int | None
    reasons: dict[str, str] = field(default_factory=dict)  # "p,l" -> reason, for discarded candidates


def select(ablation_refusal: torch.Tensor, steering: torch.Tensor, kl: torch.Tensor, kl_threshold: float = 0.1,
           max_layer_fraction: float = 0.8) -> Selection:
    """Score tables [P, L] (row i is position i - P) -> the public code's choice."""
    n_pos, n_layer = ablation_refusal.shape
    cut = layer_cut(n_layer, max_layer_fraction)
    kept: list[tuple[float, int, int]] = []
    reasons: dict[str, str] = {}
    for pos in range(-n_pos, 0):
        for layer in range(n_layer):
            values = (float(ablation_refusal[pos, layer]), float(steering[pos, layer]), float(kl[pos, layer]))
            reason = discard_reason(*values, layer=layer, cut=cut, kl_threshold=kl_threshold)
            if reason:
                reasons[f"{pos},{layer}"] = reason
            else:
                kept.append((-values[0], pos, layer))
    if not kept:
        return Selection(None, None, reasons)
    _, pos, layer = max(kept, key=lambda x: x[0])  # the first maximum: ties keep the public (stable-sort) order
    return Selection(pos, layer, reasons)


def split_train_val(items: list[Any], n_train: int, n_val: int, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded shuffle, then the first n_train for train and the next n_val for validation. With fewer
    than n_train + n_val items, validation keeps min(n_val, max(1, n // 5)) and train the rest (<= n_train)."""
    if len(items) < 2:
        raise DataError(f"a refusal-direction calibration set needs at least 2 samples, got {len(items)}")
    order = list(items)
    random.Random(seed).shuffle(order)
    n_v = n_val if len(order) >= n_train + n_val else min(n_val, max(1, len(order) // 5))
    n_t = min(n_train, len(order) - n_v)
    return order[:n_t], order[n_t : n_t + n_v]


# ---- running it on a model -----------------------------------------------------------------------
@dataclass
class FitConfig:
    n_train: int
    n_val: int
    seed: int
    filter: bool
    token_ids: list[int]
    positions: int
    kl_threshold: float
    max_layer_fraction: float
    batch_size: int = 8
    progress: bool = False


@dataclass
class Fit:
    candidates: torch.Tensor  # [P, L, H] float32, r = mean harmful - mean harmless block inputs
    scores: dict[str, torch.Tensor]  # ablation_refusal, steering, kl: [P, L] float64
    selection: Selection
    used: dict[str, list[str]]  # role -> ids used (harmful_train, harmless_train, harmful_val, harmless_val)
    record: dict[str, Any]  # counts before/after filtering, baseline scores


Batches = list[dict[str, torch.Tensor]]


def encode(backend: Backend, texts: list[str], batch_size: int) -> Batches:
    """Text-only requests through the model's chat template, encoded once in left-padded batches."""
    requests = [user_request(t) for t in texts]
    return [backend.encode(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]  # type: ignore[attr-defined]


def batch_logits(model: Any, batches: Batches, hooks: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """[n, vocab] last-position logits, each batch under the context manager `hooks(batch_rows)` builds."""
    out = []
    for batch in batches:
        if hooks is None:
            out.append(hf_directions.last_logits(model, batch))
            continue
        with hooks(batch["attention_mask"]):
            out.append(hf_directions.last_logits(model, batch))
    return torch.cat(out)


def states(model: Any, batches: Batches, layers: list[int], last: int) -> torch.Tensor:
    """[n, last, len(layers), hidden] float32 block inputs at the last positions."""
    return torch.cat([hf_directions.block_inputs(model, b, layers, last) for b in batches])


def fit_candidates(backend: Backend, harmful: list[tuple[str, str]], harmless: list[tuple[str, str]],
                   cfg: FitConfig) -> Fit:
    """Steps 1-4 of the module docstring on (id, text) pairs of each class."""
    model = backend.model  # type: ignore[attr-defined]
    num_layers = backend.decoder_size().num_layers  # type: ignore[attr-defined]
    sets: dict[str, list[tuple[str, str]]] = {}
    sets["harmful_train"], sets["harmful_val"] = split_train_val(harmful, cfg.n_train, cfg.n_val, cfg.seed)
    sets["harmless_train"], sets["harmless_val"] = split_train_val(harmless, cfg.n_train, cfg.n_val, cfg.seed)
    record: dict[str, Any] = {"n_before_filter": {k: len(v) for k, v in sets.items()}}
    if cfg.filter:
        for name, items in list(sets.items()):
            scores = refusal_score(batch_logits(model, encode(backend, [t for _, t in items], cfg.batch_size)), cfg.token_ids)
            keep = scores > 0 if name.startswith("harmful") else scores < 0
            sets[name] = [it for it, k in zip(items, keep.tolist()) if k]
        record["n_after_filter"] = {k: len(v) for k, v in sets.items()}
        empty = [k for k, v in sets.items() if not v]
        if empty:
            raise DataError(f"refusal-direction filtering left no sample in {', '.join(empty)} (counts "
                            f"{record['n_after_filter']}): the model does not refuse the harmful set with the "
                            "refusal tokens, or refuses the harmless one; check refusal_tokens= or pass filter=false")
    enc = {k: encode(backend, [t for _, t in v], cfg.batch_size) for k, v in sets.items()}
    layers = list(range(num_layers))
    means = {k: states(model, enc[k], layers, cfg.positions).double().mean(0) for k in ("harmful_train", "harmless_train")}
    candidates = (means["harmful_train"] - means["harmless_train"]).float()  # [P, L, H]
    if bool(candidates.isnan().any()):
        raise DataError("the refusal-direction candidates contain NaN")

    base_harmless = batch_logits(model, enc["harmless_val"])
    record["baseline_refusal_harmful_val"] = float(refusal_score(batch_logits(model, enc["harmful_val"]), cfg.token_ids).mean())
    record["baseline_refusal_harmless_val"] = float(refusal_score(base_harmless, cfg.token_ids).mean())
    scores = {k: torch.zeros((cfg.positions, num_layers), dtype=torch.float64)
              for k in ("ablation_refusal", "steering", "kl")}
    pairs = [(p, l) for p in range(-cfg.positions, 0) for l in layers]
    for p, l in tqdm(pairs, desc="refusal_dir candidates", disable=not cfg.progress, unit="candidate"):
        r = candidates[p, l]

        def ablation(mask: torch.Tensor, r: torch.Tensor = r) -> Any:
            return hf_directions.ablate(model, r)

        def addition(mask: torch.Tensor, r: torch.Tensor = r, l: int = l) -> Any:  # coefficient 1, every position
            vec = r.unsqueeze(0).expand(mask.shape[0], -1)
            return hf_directions.add_to_block_inputs(model, {l: vec}, frozenset({"prompt", "generated"}))

        scores["kl"][p, l] = kl_divergence(base_harmless, batch_logits(model, enc["harmless_val"], ablation)).mean()
        scores["ablation_refusal"][p, l] = refusal_score(batch_logits(model, enc["harmful_val"], ablation), cfg.token_ids).mean()
        scores["steering"][p, l] = refusal_score(batch_logits(model, enc["harmless_val"], addition), cfg.token_ids).mean()
    selection = select(scores["ablation_refusal"], scores["steering"], scores["kl"], cfg.kl_threshold,
                       cfg.max_layer_fraction)
    used = {k: [i for i, _ in v] for k, v in sets.items()}
    return Fit(candidates, scores, selection, used, record)
