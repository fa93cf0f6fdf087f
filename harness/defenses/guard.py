"""Guard filtering: a Llama Guard moderates the request, the answer, or both, around the target.

- `stage=input` (default): the guard sees the request (its image too, where the guard takes
  images); `unsafe` blocks it and the refusal is returned without asking the target.
- `stage=output`: the target answers; the guard sees request + answer; `unsafe` replaces the
  answer with the refusal.
- `stage=both`: input first; what passes is answered and then checked again.

The guard is the classifier in `harness.guards.llama_guard` (shared with the `llamaguard` judge):
locally through transformers (image-text-to-text checkpoints such as Llama Guard 3 Vision or 4
with their processor; causal-LM Llama Guard 3 1B/8B, text only), or behind an OpenAI-compatible
server (`guard=<served name>,guard_base_url=...`). Decoding is greedy with at most 20 new tokens;
an input or answer is blocked when the reply's first line is `unsafe` (the method's rule: any
other reply, unreadable ones included, lets it pass; the trace says which). `score=prob` blocks
instead when p(unsafe), from the logits of the reply's first word, exceeds `threshold` (0.5;
local guards only). The guard sees the request text the target was sent (`Sample.text`), and the
answer as an `assistant` turn: the model's own template names the turns (Llama Guard's say
"User"/"Agent"), so no label of ours enters the prompt. The defense needs nothing from the target
beyond generation.

Harness choices (parameters): the default guard is Llama Guard 3 11B Vision (it reads the image,
and its card's image-prompt F1, .733, is well above Llama Guard 4's single-image .38, though the two
come from different evaluations); p(unsafe) is the softmax over the whole vocabulary at the reply's
first non-blank token (Llama Guard 3 may open with a blank line), of the first token of "unsafe";
the refusal is `BLOCKED_REPLY`, the organism's
refusal sentence, so every refusal judge reads a block as a refusal; a served guard is sent the
image only with `guard_images=true` (we cannot tell whether a served model takes images); a guard
request that fails for good (after retries) makes the sample an error, never a silent pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.contracts.backend import Backend, Completion, GenerationParams, Request
from harness.contracts.defense import (
    Defense,
    generation,
    sample_request,
    timed_generate,
)
from harness.guards.llama_guard import (
    PARSER_VERSION,
    GuardReply,
    LlamaGuard,
    category_names,
    first_line,
    moderation_conversation,
    parse_llamaguard,
)
from harness.refusal import BLOCKED_REPLY
from harness.registry import defense
from harness.schema import Generation, Sample


@dataclass
class _State:
    """One sample's way through the guard(s) and the target."""

    sample: Sample
    request: Request
    output: str = ""
    answer: str | None = None  # the target's answer, when it was asked
    blocked_at: str | None = None
    error: str | None = None
    target: Completion | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@defense("guard")
class GuardFilter(Defense):
    """Llama Guard filter on the input, the output or both: an `unsafe` verdict returns the refusal."""

    @dataclass
    class Params:
        guard: str = "meta-llama/Llama-Guard-3-11B-Vision"  # hub id, folder, or served model name
        stage: Literal["input", "output", "both"] = "input"
        score: Literal["reply", "prob"] = "reply"  # prob: p(unsafe) > threshold (local guards only)
        threshold: float = 0.5
        refusal: str = BLOCKED_REPLY
        guard_images: bool | None = None  # None: local guards that take images get them; served ones do not
        guard_base_url: str | None = None  # set: the guard is served; unset: loaded locally
        guard_api_key_env: str = "OPENAI_API_KEY"
        guard_revision: str | None = None
        guard_device: str | None = None  # local: default cuda when available
        guard_dtype: str | None = None  # local: default bfloat16 on cuda, float32 on cpu
        guard_max_new_tokens: int = 20
        batch_size: int = 8  # local guard batch
        concurrency: int = 16
        max_retries: int = 4
        timeout: float = 60.0
        backoff: float = 0.5

        def __post_init__(self) -> None:
            if self.score == "prob" and self.guard_base_url:
                raise ValueError("score=prob reads the guard's logits, so it needs a local guard (no guard_base_url)")
            if not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold is a probability in [0, 1], got {self.threshold}")
            if self.guard_max_new_tokens < 1 or self.batch_size < 1:
                raise ValueError("guard_max_new_tokens and batch_size must be at least 1")
            if not self.guard:
                raise ValueError("guard= must name a model")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = params
        self.guard = LlamaGuard(p.guard, base_url=p.guard_base_url, api_key_env=p.guard_api_key_env,
                                revision=p.guard_revision, device=p.guard_device, dtype=p.guard_dtype,
                                batch_size=p.batch_size, max_new_tokens=p.guard_max_new_tokens,
                                concurrency=p.concurrency, max_retries=p.max_retries, timeout=p.timeout,
                                backoff=p.backoff, what=f"guard defense ({p.guard})", probe_content=True)

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["guard"] = ({**self.guard.chat.identity(), "chat_template": "server-side"} if self.guard.chat
                          else {"model": self.params.guard, "fingerprint": self.guard.fingerprint})
        ident["guard"]["parser"] = PARSER_VERSION
        return ident

    def sends_images(self) -> bool:
        """Whether the guard is shown the request's image."""
        if self.params.guard_images is not None:
            return self.params.guard_images and (self.guard.chat is not None or self.guard.takes_images())
        return self.guard.takes_images()

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        p = self.params
        states = [_State(s, sample_request(s)) for s in samples]
        if p.stage in ("input", "both"):
            self._moderate("input", states)
        answering = [st for st in states if st.blocked_at is None and st.error is None]
        if answering:
            completions, per_sample = timed_generate(backend, [st.request for st in answering], params)
            for st, c in zip(answering, completions):
                st.target, st.seconds["target"] = c, per_sample
                st.error, st.answer, st.output = c.error, c.text, c.text
        if p.stage in ("output", "both"):
            self._moderate("output", [st for st in answering if st.error is None])
        return [self._generation(st) for st in states]

    def _moderate(self, stage: str, states: list[_State]) -> None:
        """One guard pass over `states` (batched locally, concurrent when served); blocks in place."""
        if not states:
            return
        image = self.sends_images()
        convs = [moderation_conversation(st.sample.text, st.answer if stage == "output" else None,
                                         st.sample.image if image else None) for st in states]
        start = time.perf_counter()
        replies = self.guard.classify(convs, [f"sample {st.sample.id} ({stage})" for st in states],
                                      scores=self.params.score == "prob")
        per_sample = (time.perf_counter() - start) / len(states)
        for st, reply in zip(states, replies):
            st.seconds[f"guard_{stage}"] = per_sample
            check = self._check(reply, image and st.sample.image is not None)
            st.checks[stage] = check
            if reply.error is not None:
                st.error = f"guard ({stage}): {reply.error}"
            elif check["blocked"]:
                st.blocked_at, st.output = stage, self.params.refusal

    def _check(self, reply: GuardReply, saw_image: bool) -> dict[str, Any]:
        """The trace of one guard call, with the block decision (first line, or p(unsafe) > threshold)."""
        parsed = parse_llamaguard(reply.text or "") if reply.text is not None else None
        head = first_line(reply.text)
        verdict = "unsafe" if head == "unsafe" else "safe" if head == "safe" else "unreadable"
        codes = parsed[1] if parsed else []
        check: dict[str, Any] = {
            "verdict": verdict, "parsed": parsed is not None, "categories": codes,
            "category_names": category_names(codes), "reply": reply.text, "saw_image": saw_image,
            "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
        }
        if reply.error is not None:
            check.update(verdict="error", error=reply.error, blocked=False)
        elif self.params.score == "prob":
            check.update(p_unsafe=reply.p_unsafe, p_safe=reply.p_safe, threshold=self.params.threshold,
                         blocked=bool(reply.p_unsafe is not None and reply.p_unsafe > self.params.threshold))
        else:
            check["blocked"] = verdict == "unsafe"
        return check

    def _generation(self, st: _State) -> Generation:
        guard_calls = len(st.checks)
        target_calls = int(st.target is not None)
        trace: dict[str, Any] = {
            "stage": self.params.stage, "score": self.params.score, "blocked": st.blocked_at is not None,
            "blocked_at": st.blocked_at, "guard": st.checks, "target_answer": st.answer,
            "model_calls": target_calls + guard_calls, "calls": {"target": target_calls, "guard": guard_calls},
        }
        target = st.target or Completion("")
        output = "" if st.error else st.output
        summed = Completion(output, target.prompt_tokens, target.completion_tokens, st.error)
        return generation(st.sample, st.request, summed, sum(st.seconds.values()), trace,
                          **{f"{k}_seconds": v for k, v in st.seconds.items()})
