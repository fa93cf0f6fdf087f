"""JailGuard: flag an input when the target's answers to mutated copies of it disagree
(Zhang et al., TOSEM 2025; shiningrain/JailGuard).

For each sample the target answers N variants (default 8), each a seeded random mutation of the
input (mutations.py); the answers' divergence (divergence.py) above θ, or every answer being a
refusal by the keyword list, flags the input, and the defense then answers with a fixed refusal
(harness.refusal.BLOCKED_REPLY, `refusal=`). Otherwise it returns the model's answer to the
unmutated input. Every request of every sample in a batch goes to the backend as one generate
call, so it works on any backend (HF or OpenAI-compatible) and needs no capability.

Decisions, and why (harness choices are marked as such):
  * The original is not one of the N: the public code's detector sees mutated variants only, so
    here the N variants are all mutated and the unmutated input is answered in the same batch
    (N + 1 calls per sample). `include_original=true` makes the original variant 0 instead
    (N calls, N - 1 mutations): cheaper, but no longer the published detector.
  * `mode=image` (default) mutates only the image, as the spec's harness note asks; `mode=text`
    only the text; `mode=both` both (as OSB ran it). A sample without an image has nothing to
    mutate in image mode: `no_image=text` (harness choice, default) mutates its text instead, as
    JailGuard's text detector does for text inputs; `no_image=skip` answers it once, unchecked.
  * The refusal rule is the public code's: every variant's whole answer contains one of its 29
    keywords, case-sensitive; that list is the `advbench` preset (`keywords=`, `keywords_file=`).
  * θ defaults to 0.02 (the public text default; it uses 0.025 for MiniGPT-4 images). It was set
    for spaCy similarities, and the default similarity here is character n-grams (a harness
    choice, see divergence.py), so calibrating is better: `calibration=TASK_SPEC` measures the
    divergence of benign calibration samples and sets θ so that at most `fpr` of them exceed it
    (thresholds.py); `theta_file=` loads such a θ. The calibration stage has no access to the
    run's decoding settings, so `calibration_max_new_tokens` must match the run's --max-new-tokens.
  * Under greedy decoding mild mutations often leave the answer unchanged, so divergence can only
    come from the mutation; the trace records every variant's mutation and answer to measure it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.contracts.backend import Backend, Completion, GenerationParams, Request, user_request
from harness.contracts.defense import CalibrationPlan, CalibrationSet, Defense, FittedState, generation, timed_generate
from harness.defenses.divergence import (ThetaState, max_divergence, ngram_similarity, similarity_matrix,
                                         spacy_similarity)
from harness.defenses.mutations import mutate
from harness.defenses.thresholds import threshold_at_fpr
from harness.defenses.vectors import calibration_record
from harness.errors import DataError
from harness.refusal import BLOCKED_REPLY, RefusalMatcher, check_preset, preset_identity
from harness.registry import defense
from harness.schema import Generation, Sample

ANSWER_CHARS = 100  # the answer head recorded per variant in the trace
FIT_PARAMS = ("n", "mode", "no_image", "include_original", "seed", "similarity", "ngram", "top_chars",
              "keywords", "keywords_file", "fpr", "calibration_max_new_tokens")


@dataclass
class _Job:
    """One sample's requests: the answered request (unless it is a variant), then the variants."""

    sample: Sample
    requests: list[Request] = field(default_factory=list)
    mutations: list[dict[str, Any]] = field(default_factory=list)
    answer_at: int | None = 0  # index of the request whose answer is returned
    first_variant: int = 1
    mutated: str = "none"
    seconds: float = 0.0


@defense("jailguard")
class JailGuard(Defense):
    """JailGuard: answer N mutated variants; divergent answers or all refusals flag the input."""

    @dataclass
    class Params:
        n: int = 8  # variants per input (public default)
        mode: Literal["image", "text", "both"] = "image"  # what is mutated (spec's harness note: image)
        no_image: Literal["text", "skip"] = "text"  # harness choice: image mode on an image-less sample
        include_original: bool = False  # true: the original is variant 0 (N calls instead of N + 1)
        theta: float = 0.02  # public text default, set for spaCy similarities: calibrate instead
        similarity: Literal["ngram", "spacy"] = "ngram"  # harness choice (spaCy is not a dependency)
        ngram: int = 3  # harness choice: character trigrams
        top_chars: int = 100  # answers are compared on their first top_chars characters; 0 = whole
        keywords: str = "advbench"  # the public code's 29 phrases
        keywords_file: str | None = None
        refusal: str = BLOCKED_REPLY
        seed: int = 0
        calibration: str | None = None  # benign task spec to calibrate theta on
        calibration_limit: int | None = None
        calibration_max_new_tokens: int = 128
        fpr: float = 0.05
        theta_file: str | None = None
        allow_overlap: bool = False
        request_batch: int = 0  # requests per backend call; 0 = all (n+1)·B of a batch in one call

        def __post_init__(self) -> None:
            if self.n < 2:
                raise ValueError("n must be at least 2 (a divergence needs two answers)")
            if self.request_batch < 0:
                raise ValueError("request_batch must be >= 0 (0 sends a batch's requests in one call)")
            if self.include_original and self.n < 3:
                raise ValueError("include_original=true needs n >= 3 (the original plus two mutations)")
            if self.theta < 0 or self.top_chars < 0 or self.ngram < 1:
                raise ValueError("theta and top_chars must be >= 0 and ngram >= 1")
            if not 0.0 < self.fpr < 1.0:
                raise ValueError(f"fpr is a rate in (0, 1), got {self.fpr}")
            if self.calibration_max_new_tokens < 1:
                raise ValueError("calibration_max_new_tokens must be at least 1")
            if self.calibration and self.theta_file:
                raise ValueError("give calibration= (fit theta) or theta_file= (load it), not both")
            if self.keywords_file is None:
                check_preset(self.keywords)
            if self.similarity == "spacy":
                try:
                    import spacy  # type: ignore[import-not-found]  # noqa: F401
                except ImportError:
                    raise ValueError("similarity=spacy needs spaCy and en_core_web_md installed; "
                                     "the default similarity=ngram needs nothing") from None

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.matcher = RefusalMatcher.named(params.keywords, params.keywords_file, case_sensitive=True)
        self.theta = params.theta
        self.theta_source = "param"

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["keywords"] = preset_identity(self.matcher.preset)
        if self.params.theta_file and Path(self.params.theta_file).is_file():  # the file, not the path, names θ
            ident["theta_file_sha256"] = hashlib.sha256(Path(self.params.theta_file).read_bytes()).hexdigest()[:16]
        return ident

    # ---- theta calibration ---------------------------------------------------------------------
    def calibration(self) -> CalibrationPlan | None:
        p = self.params
        if not (p.calibration or p.theta_file):
            return None
        return CalibrationPlan(kind="jailguard", file=p.theta_file,
                               sets={"benign": p.calibration} if p.calibration else {},
                               limit=p.calibration_limit, allow_overlap=p.allow_overlap,
                               fit_key={k: getattr(p, k) for k in FIT_PARAMS})

    def fit(self, backend: Backend, sets: dict[str, CalibrationSet], batch_size: int = 8,
            progress: bool = False) -> ThetaState:
        """θ from the divergences of benign samples: at most `fpr` of them lie strictly above it."""
        p = self.params
        role = next((r for r in ("benign", "safe", "anchor") if r in sets), None)
        if role is None or not sets[role].samples:
            raise DataError("jailguard theta calibration needs benign samples: calibration=TASK_SPEC")
        spec, samples = sets[role].spec, sets[role].samples
        params = GenerationParams(max_new_tokens=p.calibration_max_new_tokens)
        scores: list[dict[str, Any]] = []
        calls = 0
        for start in range(0, len(samples), batch_size):
            jobs = [self._job(s, answered=False) for s in samples[start : start + batch_size]]
            jobs = [j for j in jobs if j.mutations]
            completions, _ = self._answer(backend, [r for j in jobs for r in j.requests], params)
            calls += len(completions)
            at = 0
            for job in jobs:
                mine = completions[at : at + len(job.requests)]
                at += len(job.requests)
                if not any(c.error for c in mine):
                    scores.append({"id": job.sample.id, **self._score([c.text for c in mine[job.first_variant:]])})
        if not scores:
            raise DataError(f"jailguard calibration on {spec}: no sample could be scored (no variants, or all failed)")
        theta = threshold_at_fpr([s["divergence"] for s in scores], p.fpr)
        flagged = [s["divergence"] > theta or s["all_refused"] for s in scores]
        manifest = {
            "defense": "jailguard", "theta": theta, "fpr_target": p.fpr,
            "fpr_divergence": sum(s["divergence"] > theta for s in scores) / len(scores),
            "fpr_total": sum(flagged) / len(scores),
            "all_refused_rate": sum(s["all_refused"] for s in scores) / len(scores),
            "settings": {k: getattr(p, k) for k in FIT_PARAMS},
            "calibration": calibration_record(spec, [s["id"] for s in scores]),
            "model_calls": calls,
        }
        return ThetaState.for_backend(backend, [s["divergence"] for s in scores], manifest)

    def load_state(self, path: str | Path) -> FittedState:
        return ThetaState.load(path)

    def use_state(self, state: FittedState, backend: Backend) -> None:
        assert isinstance(state, ThetaState)
        self.theta, self.theta_source = float(state.manifest["theta"]), "calibrated"

    # ---- variants ------------------------------------------------------------------------------
    def _job(self, sample: Sample, answered: bool = True) -> _Job:
        """The sample's requests: [original] + N mutated variants, or N variants whose first is the
        original (include_original), or the original alone (no image and no_image=skip)."""
        p, start = self.params, time.perf_counter()
        image = sample.image
        if isinstance(image, str) or callable(image):
            raise TypeError(f"sample {sample.id}: image must be loaded before generation")
        image_op = p.mode in ("image", "both") and image is not None
        text_op = p.mode in ("text", "both") or (p.mode == "image" and image is None and p.no_image == "text")
        job = _Job(sample, mutated="+".join(k for k, on in (("image", image_op), ("text", text_op)) if on) or "none")
        original = user_request(sample.text, image)
        if not (image_op or text_op):
            job.requests, job.answer_at = [original], 0
            return job
        first = 0
        if p.include_original:
            job.requests.append(original)
            job.mutations.append({"index": 0, "original": True, "image": None, "text": None})
            job.first_variant, first = 0, 1
        elif answered:
            job.requests.append(original)
        else:
            job.answer_at, job.first_variant = None, 0
        for index in range(first, p.n):
            var_image, var_text, log = mutate(image, sample.text, seed=p.seed, sample_id=sample.id, index=index,
                                              image_op=image_op, text_op=text_op)
            job.requests.append(user_request(var_text, var_image))
            job.mutations.append(log)
        job.seconds = time.perf_counter() - start
        return job

    # ---- detection -----------------------------------------------------------------------------
    def _similarity(self) -> Any:
        p = self.params
        return spacy_similarity() if p.similarity == "spacy" else ngram_similarity(p.ngram)

    def _score(self, answers: list[str]) -> dict[str, Any]:
        """Divergence, refusals and the verdict for one sample's variant answers."""
        p = self.params
        heads = [a[: p.top_chars] for a in answers] if p.top_chars else answers
        sim = similarity_matrix(heads, self._similarity())
        refusals = [self.matcher.match(a) for a in answers]
        div = max_divergence(sim)
        all_refused = all(r is not None for r in refusals)
        reasons = [name for name, hit in (("divergence", div > self.theta), ("all_refused", all_refused)) if hit]
        return {"similarity": [[round(float(x), 4) for x in row] for row in sim], "divergence": div,
                "theta": self.theta, "theta_source": self.theta_source, "all_refused": all_refused,
                "refusals": refusals, "flagged": bool(reasons), "reasons": reasons}

    # ---- generation ----------------------------------------------------------------------------
    def _answer(self, backend: Backend, requests: list[Any], params: GenerationParams) -> tuple[list[Completion], float]:
        """Every request answered, in calls of `request_batch` (a batch of B samples is (n+1)·B
        requests, which may not fit a GPU at once); seconds per request over all calls."""
        size = self.params.request_batch or max(len(requests), 1)
        out: list[Completion] = []
        seconds = 0.0
        for i in range(0, len(requests), size):
            chunk = requests[i : i + size]
            done, per = timed_generate(backend, chunk, params)
            out += done
            seconds += per * len(chunk)
        return out, seconds / max(len(requests), 1)

    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        jobs = [self._job(s) for s in samples]
        requests = [r for job in jobs for r in job.requests]
        completions, per_request = self._answer(backend, requests, params)
        out, at = [], 0
        for job in jobs:
            mine = completions[at : at + len(job.requests)]
            at += len(job.requests)
            out.append(self._generation(job, mine, per_request))
        return out

    def _generation(self, job: _Job, completions: list[Completion], per_request: float) -> Generation:
        """A sample's record: the original answer or the refusal, tokens and time summed over its calls."""
        p, start = self.params, time.perf_counter()
        answer = completions[job.answer_at] if job.answer_at is not None else Completion("")
        variants = completions[job.first_variant :] if job.mutations else []
        trace: dict[str, Any] = {"model_calls": len(job.requests), "n": p.n, "mode": p.mode, "mutated": job.mutated,
                                 "include_original": p.include_original, "seed": p.seed,
                                 "similarity_measure": p.similarity if p.similarity == "spacy" else f"ngram:{p.ngram}",
                                 "variants": [{**m, "answer": c.text[:ANSWER_CHARS]} for m, c in zip(job.mutations, variants)]}
        failed = next(((i, c.error) for i, c in enumerate(completions) if c.error), None)
        output, error = answer.text, None
        if failed is not None:
            output, error = "", f"jailguard request {failed[0]} of {len(completions)}: {failed[1]}"
            trace.update(flagged=None, path="error")
        elif not job.mutations:
            trace.update(flagged=False, path="unchecked")
        else:
            score = self._score([c.text for c in variants])
            for v, phrase in zip(trace["variants"], score.pop("refusals")):
                v["refusal"] = phrase
            trace.update(score, path="blocked" if score["flagged"] else "answered")
            if score["flagged"]:
                trace["blocked_answer"] = answer.text
                output = p.refusal
        summed = Completion(output, sum(c.prompt_tokens for c in completions),
                            sum(c.completion_tokens for c in completions), error)
        generate_seconds = per_request * len(job.requests)
        score_seconds = time.perf_counter() - start
        return generation(job.sample, job.requests[job.answer_at or 0], summed,
                          job.seconds + generate_seconds + score_seconds, trace, mutate_seconds=job.seconds,
                          generate_seconds=generate_seconds, divergence_seconds=score_seconds)
