"""ECSO: Eyes Closed, Safety On (Gou et al., ECCV 2024, arXiv 2403.09572).

The same model does every step, each step batched over the samples that reach it:
  1. answer the (image, query) as usual;
  2. self-check, image included: is that answer harmful? Unsafe only if the reply is exactly
     "yes" (case-insensitive, optional full stop); the answer shown is cut to `answer_max_chars`
     (1,927 in the public code);
  3. safe: the step-1 answer is returned unchanged, so benign utility is untouched;
  4. unsafe: a query-aware caption of the image, then
  5. a text-only answer with the caption as a hint, asking for a harmless reply.
`gate=false` is the caption-always variant used by the ShiftDC paper (steps 4-5 for every sample).
Every step's output, the self-check verdict and the number of model calls go into the trace;
a sample's time is its share of each batched step it went through.

Harness choices (parameters): the yes/no reply is capped at `check_max_new_tokens` = 8 tokens (a
strict parse reads one word; the public code allows 1,024 per step); the caption gets the run's
`max_new_tokens` unless `caption_max_new_tokens` is set. A sample without an image has nothing to
caption: if flagged it is answered again text-only with the harmless instruction, and with
`gate=false` it is answered as it is (it is already "eyes closed").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.contracts.defense import Defense, generation, sample_request, timed_generate
from harness.defenses.prompts import (
    ECSO_ANSWER_FROM_CAPTION,
    ECSO_ANSWER_TEXT_ONLY,
    ECSO_CAPTION,
    ECSO_SELF_CHECK,
    prompt_digest,
)
from harness.contracts.backend import Backend, Completion, GenerationParams, Request, user_request
from harness.registry import defense
from harness.schema import Generation, Sample

PROMPTS = (ECSO_SELF_CHECK, ECSO_CAPTION, ECSO_ANSWER_FROM_CAPTION, ECSO_ANSWER_TEXT_ONLY)


def says_yes(reply: str) -> bool:
    """Strict parse of the self-check: "yes" alone, any case, with an optional full stop."""
    word = reply.strip().lower()
    return word.removesuffix(".").strip() == "yes"


@dataclass
class _State:
    """One sample's progress through the steps."""

    sample: Sample
    calls: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)  # completion tokens per step
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    request: Request | None = None  # the request whose completion is the output
    output: str = ""
    trace: dict[str, Any] = field(default_factory=dict)

    def record(self, step: str, seconds: float, completion: Completion) -> str | None:
        self.calls += 1
        self.seconds[step] = seconds
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.generated[step] = completion.completion_tokens
        if completion.error:
            self.error = f"{step}: {completion.error}"
            self.trace["path"] = "error"
            return None
        return completion.text


@defense("ecso")
class ECSO(Defense):
    """ECSO: answer, self-check for harm, and if unsafe answer again from a query-aware caption without the image."""

    @dataclass
    class Params:
        gate: bool = True  # false: caption-always (skip the first answer and the self-check)
        answer_max_chars: int = 1927
        check_max_new_tokens: int = 8
        caption_max_new_tokens: int | None = None  # None: the run's max_new_tokens

        def __post_init__(self) -> None:
            if self.answer_max_chars < 1 or self.check_max_new_tokens < 1:
                raise ValueError("answer_max_chars and check_max_new_tokens must be at least 1")
            if self.caption_max_new_tokens is not None and self.caption_max_new_tokens < 1:
                raise ValueError("caption_max_new_tokens must be at least 1")

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["prompts_sha256"] = prompt_digest("\n".join(PROMPTS))
        return ident

    def _step(self, backend: Backend, step: str, states: list[_State], requests: list[Request],
              params: GenerationParams) -> list[str | None]:
        """One batched call for the samples that reach `step`; None where the call failed."""
        if not states:
            return []
        completions, per_sample = timed_generate(backend, requests, params)
        return [st.record(step, per_sample, c) for st, c in zip(states, completions)]

    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        p = self.params
        states = [_State(s, trace={"gate": p.gate, "first_answer": None, "self_check": None,
                                   "caption": None, "final_answer": None}) for s in samples]
        flagged: list[_State] = states
        if p.gate:
            first_requests = [sample_request(s) for s in samples]
            answers = self._step(backend, "answer", states, first_requests, params)
            for st, req, ans in zip(states, first_requests, answers):
                st.request, st.output, st.trace["first_answer"] = req, ans or "", ans
            checking = [st for st, ans in zip(states, answers) if ans is not None]
            check_params = dataclasses.replace(params, max_new_tokens=p.check_max_new_tokens, min_new_tokens=0)
            check_requests = [
                user_request(ECSO_SELF_CHECK.format(query=st.sample.text, answer=st.output[: p.answer_max_chars]),
                             st.sample.image)  # type: ignore[arg-type]
                for st in checking
            ]
            replies = self._step(backend, "self_check", checking, check_requests, check_params)
            flagged = []
            for st, reply in zip(checking, replies):
                if reply is None:
                    continue
                unsafe = says_yes(reply)
                st.trace["self_check"] = {"reply": reply, "verdict": "unsafe" if unsafe else "safe"}
                if unsafe:
                    flagged.append(st)
                else:
                    st.trace["path"] = "safe"
        self._eyes_closed(backend, flagged, params)
        return [self._generation(st) for st in states]

    def _eyes_closed(self, backend: Backend, flagged: list[_State], params: GenerationParams) -> None:
        """Steps 4-5 for the flagged samples: caption (those with an image), then a text-only answer."""
        p = self.params
        with_image = [st for st in flagged if st.sample.image is not None]
        caption_params = params if p.caption_max_new_tokens is None else dataclasses.replace(
            params, max_new_tokens=p.caption_max_new_tokens, min_new_tokens=min(params.min_new_tokens, p.caption_max_new_tokens))
        caption_requests = [user_request(ECSO_CAPTION.format(query=st.sample.text), st.sample.image)  # type: ignore[arg-type]
                            for st in with_image]
        for st, req in zip(with_image, caption_requests):
            st.request = req
        for st, caption in zip(with_image, self._step(backend, "caption", with_image, caption_requests, caption_params)):
            st.trace["caption"] = caption
        answering = [st for st in flagged if st.error is None]
        final_requests = []
        for st in answering:
            query = st.sample.text
            if st.sample.image is not None:
                final_requests.append(user_request(ECSO_ANSWER_FROM_CAPTION.format(caption=(st.trace["caption"] or "").strip(), query=query)))
                st.trace["path"] = "caption"
            elif p.gate:
                final_requests.append(user_request(ECSO_ANSWER_TEXT_ONLY.format(query=query)))
                st.trace["path"] = "text_only"
            else:
                final_requests.append(sample_request(st.sample))
                st.trace["path"] = "as_is"
        for st, req, ans in zip(answering, final_requests, self._step(backend, "final", answering, final_requests, params)):
            st.request, st.output, st.trace["final_answer"] = req, ans or "", ans

    def _generation(self, st: _State) -> Generation:
        """A sample's record: the last request that produced its output, tokens and time summed over steps."""
        summed = Completion(st.output if st.error is None else "", st.prompt_tokens, st.completion_tokens, st.error)
        trace = {"model_calls": st.calls, **st.trace, "caption_tokens": st.generated.get("caption", 0)}
        return generation(st.sample, st.request, summed, sum(st.seconds.values()), trace,
                          **{f"{k}_seconds": v for k, v in st.seconds.items()})
