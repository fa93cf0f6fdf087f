"""CircularEval scoring for MMBench: a question is right only when every one of its passes is right.

Why separate from the task: this is the part that decides the number, and it must equal the
official tool's: VLMEvalKit's `mcq_circular_eval` marks a question right when the letter read from
every rotation equals that rotation's answer (a prefetched wrong letter, a letter no rule or LLM
could read, or a failed generation all make the whole question wrong). A question right in three of
four rotations is wrong. Where VLMEvalKit, after three failed LLM extractions, picks a letter at
random, this harness scores the pass wrong and counts it: a random draw would make reruns differ.

The letter of a pass is read by the task's rules (harness/choice_rules.py); when the run has a
verdict from the LLM extractor (judges/mmbench_extractor.py) for it, its `choice` is used instead
(the extractor applies the same rules first and only asks the LLM when they fail).

Abilities: MMBench's `category` (20 leaf abilities, `acc/l3/<name>`) belongs to one of six L2
abilities (`l2-category`, `acc/l2/<name>`), which fall under two L1 abilities: perception (coarse,
fine-grained single- and cross-instance) and reasoning (attribute, relation, logic) (`acc/l1/...`).
Accuracies are fractions of questions (papers print percentages). A run cut by --limit may end
inside a question's passes; that question is then scored on the passes present.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

from harness.choice_rules import read_choice
from harness.schema import Generation, MetricValue, Sample, Verdict
from harness.stats import bootstrap_mean

EXTRACTOR = "mmbench"  # the `extractor` a verdict's detail names when it comes from judges/mmbench_extractor.py


def l1_of(l2: str) -> str | None:
    name = l2.lower()
    if "perception" in name:
        return "perception"
    if "reasoning" in name:
        return "reasoning"
    return None


@dataclass(frozen=True)
class Reading:
    """The letter read from one pass, and how (rule, llm, none: unreadable, error: no reply)."""

    letter: str | None
    by: str


def read_pass(sample: Sample, generation: Generation | None, verdict: Verdict | None) -> Reading:
    if generation is None or generation.error:
        return Reading(None, "error")
    if verdict is not None and verdict.detail.get("extractor") == EXTRACTOR and verdict.label != "error":
        return Reading(verdict.detail.get("choice"), str(verdict.detail.get("by") or "llm"))
    info = sample.meta["mmbench"]
    letter = read_choice(generation.output, info["options"], info["rules"])
    return Reading(letter, "rule" if letter is not None else "none")


def question_hits(samples: list[Sample], generations: Mapping[str, Generation],
                  verdicts: Mapping[str, Verdict] | None) -> tuple[dict[int, float], dict[int, Sample], dict[str, int]]:
    """Per question (g_index): 1.0 if every pass present is right; the question's first pass; and
    counts of how the passes were read. Questions without an answer key (test split) are left out."""
    right: dict[int, bool] = {}
    first: dict[int, Sample] = {}
    counts: dict[str, int] = defaultdict(int)
    for s in samples:
        reading = read_pass(s, generations.get(s.id), (verdicts or {}).get(s.id))
        counts[reading.by] += 1
        g = s.meta["g_index"]
        first.setdefault(g, s)
        if s.meta["answer"] is None:
            continue
        right[g] = right.get(g, True) and reading.letter == s.meta["answer"]
    return {g: float(ok) for g, ok in right.items()}, first, dict(counts)


def vanilla_hits(samples: list[Sample], generations: Mapping[str, Generation],
                 verdicts: Mapping[str, Verdict] | None) -> list[float]:
    """Right (1) or wrong (0) on the first pass alone: single-pass accuracy, for comparison."""
    out = []
    for s in samples:
        if s.meta["pass"] == 0 and s.meta["answer"] is not None:
            reading = read_pass(s, generations.get(s.id), (verdicts or {}).get(s.id))
            out.append(float(reading.letter == s.meta["answer"]))
    return out


def score(samples: list[Sample], generations: Mapping[str, Generation],
          verdicts: Mapping[str, Verdict] | None) -> dict[str, MetricValue]:
    hits, first, counts = question_hits(samples, generations, verdicts)
    out: dict[str, MetricValue] = {}
    if hits:
        out["acc"] = bootstrap_mean(hits.values())
        groups: dict[str, list[float]] = defaultdict(list)
        for g, hit in hits.items():
            meta = first[g].meta
            if meta.get("l1"):
                groups[f"l1/{meta['l1']}"].append(hit)
            if meta.get("l2"):
                groups[f"l2/{meta['l2']}"].append(hit)
            if meta.get("category"):
                groups[f"l3/{meta['category']}"].append(hit)
        for key in sorted(groups, key=lambda k: (k[:2], k)):
            out[f"acc/{key}"] = bootstrap_mean(groups[key])
        out["acc_vanilla"] = bootstrap_mean(vanilla_hits(samples, generations, verdicts))
    n = len(samples)
    out["failed_extractions"] = MetricValue(float(counts.get("none", 0) + counts.get("llm-failed", 0)), n=n)
    if verdicts is not None:
        out["llm_extractions"] = MetricValue(float(counts.get("llm", 0)), n=n)
        errors = sum(1 for s in samples if (v := verdicts.get(s.id)) is None or v.label == "error")
        out["judge_errors"] = MetricValue(float(errors), n=n)
    return out
