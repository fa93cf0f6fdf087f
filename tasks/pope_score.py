"""How POPE reads a yes/no reply and scores a split: the official rule, and lmms-eval's.

POPE (Li et al., EMNLP 2023) asks "Is there a <object> in the image?" about COCO pictures, half
the answers yes. A hallucinating model says yes too often, so besides accuracy the benchmark
reports precision, recall and F1 with "yes" as the positive class, and the share of yes replies.

`official` is POPE's `evaluate.py` (RUCAIBox/POPE, the same rule is LLaVA's `eval_pope.py`): keep
the text before the first "." (when there is one), delete commas, split on single spaces; the
reply is "no" when one of those words is exactly `No`, `no` or `not`, and "yes" otherwise. It is
case-sensitive ("NO" and "Not" read as yes), and a word glued to a newline ("no\\n") is not
matched: both are the official behaviour, kept. Every reply gets a label: none is unparseable.

`lmms-eval` is lmms-eval's `pope` task: the lowercased, stripped reply must equal the answer;
anything else is wrong, and only an exact "yes"/"no" counts in precision and recall. (lmms-eval's
own `pope_yes_ratio` counts yes in the ground truth, not in the replies; here `yes_ratio` is always
POPE's: the share of replies read as yes.)

Precision, recall and F1 whose denominator is zero are 0 (as lmms-eval; the official script
divides by zero). Intervals: percentile bootstrap over questions (fixed seed), the statistic
recomputed on each resample.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np

from harness.schema import MetricValue
from harness.stats import N_BOOT, SEED

Label = Literal["yes", "no", "other"]


def parse_official(reply: str) -> Label:
    text = reply
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_lmms_eval(reply: str) -> Label:
    text = reply.lower().strip()
    return text if text in ("yes", "no") else "other"  # type: ignore[return-value]


PARSERS: dict[str, Callable[[str], Label]] = {"official": parse_official, "lmms-eval": parse_lmms_eval}


def _rates(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """[acc, precision, recall, f1, yes_ratio] along the last axis; pred/gold: 1 yes, 0 no, -1 other.

    Works on a batch of resamples at once (leading axes). A reply that is neither yes nor no (or a
    failed generation, -1) is wrong and is neither a predicted yes nor a predicted no.
    """
    tp = ((pred == 1) & (gold == 1)).sum(-1)
    fp = ((pred == 1) & (gold == 0)).sum(-1)
    fn = ((pred == 0) & (gold == 1)).sum(-1)
    n = pred.shape[-1]
    acc = (pred == gold).sum(-1) / n
    precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(tp.shape), where=(tp + fn) > 0)
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros(tp.shape), where=pr > 0)
    yes_ratio = (pred == 1).sum(-1) / n
    return np.stack([acc, precision, recall, f1, yes_ratio], axis=-1)


NAMES = ("acc", "precision", "recall", "f1", "yes_ratio")


def split_metrics(pred: Sequence[int], gold: Sequence[int], n_boot: int = N_BOOT, seed: int = SEED,
                  level: float = 0.95) -> dict[str, MetricValue]:
    """The five POPE numbers of one set of questions, each with its bootstrap interval."""
    p, g = np.asarray(pred, dtype=np.int8), np.asarray(gold, dtype=np.int8)
    n = int(p.size)
    if n == 0:
        return {name: MetricValue(float("nan"), None, None, 0) for name in NAMES}
    values = _rates(p, g)
    rng = np.random.default_rng(seed)
    boots = []
    chunk = max(1, 4_000_000 // n)  # resamples per batch: bounded memory for 9000 questions
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        boots.append(_rates(p[idx], g[idx]))
    alpha = (1.0 - level) / 2
    low, high = np.quantile(np.concatenate(boots), [alpha, 1 - alpha], axis=0)
    return {name: MetricValue(float(values[i]), float(low[i]), float(high[i]), n) for i, name in enumerate(NAMES)}


def mean_of(values: list[MetricValue]) -> MetricValue:
    """The plain mean of per-split numbers (LLaVA-1.5 reports POPE as the F1 averaged over the
    three splits); its interval is the mean of the splits' bounds, a conservative width."""
    lows = [v.low for v in values if v.low is not None]
    highs = [v.high for v in values if v.high is not None]
    return MetricValue(
        value=float(np.mean([v.value for v in values])),
        low=float(np.mean(lows)) if len(lows) == len(values) else None,
        high=float(np.mean(highs)) if len(highs) == len(values) else None,
        n=sum(v.n for v in values),
    )
