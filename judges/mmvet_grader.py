"""MM-Vet's LLM grader as a judge: a 0.0-1.0 correctness score per answer, by MM-Vet's grading protocol.

MM-Vet (Yu et al., ICML 2024) has no answer key a rule could check: an LLM compares each answer
with the ground truth in a few-shot markdown table and completes the row with a score. Why a
judge and not part of the task: a task never calls a model (the data flow goes forward: the judge
stage asks, the task scores the records), and as a judge the grader gets the verdict cache,
resume, usage counting and `realign judge` re-grading for free. The task (tasks/mm_vet.py) reads
`detail["score"]`; the verdict's label is `safe` for any graded answer (the verdict vocabulary has
no neutral word; it is not a safety statement) and `error` when no score was obtained.

The protocol, as MM-Vet's `mm-vet_evaluator.py` runs it (yuweihao/MM-Vet):
- one user message: the prompt, a newline, then `question | ground truth | prediction | ` (the
  ground truth with spaces put around `<AND>` / `<OR>`); `max_tokens=3`, temperature 0;
- reading a reply (`parse_score`): the text before the first space, stripped, read as a number
  (Python's `float`) and accepted in [0, 1]; so "0.7" and "1.0 (right)" are read, while " 0.5"
  (leading space), "Score: 0.6", "0.6." and "1.5" are not;
- an unreadable reply is asked again with a reminder sentence appended, the temperature rising
  by 0.5 after each retry (0, 0, 0.5, 1.0, 1.5); after five unreadable replies the score is 0.0
  (counted in `fallback_runs`). The official script then sends a sixth request whose reply it
  never reads; it is skipped here (same score). A reply read as NaN (which the official range check
  lets through and which would poison the mean) is treated as unreadable: the one deviation;
- `runs=N` grades N times and averages (the paper used 5; the official default is 1).

The prompt is our own wording of that scheme (judges/rubrics/mmvet_grader.txt); `template_file=`
sends any other, e.g. MM-Vet's original prompt pasted into a file with its reminder sentence in a
`# retry: "..."` line (judges/prompt_file.py). Transport failures after the client's retries are
`error` and not cached, so a later run asks again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from harness.models.remote import ChatSession, RemoteChat, RequestFailed
from harness.registry import judge
from harness.schema import Generation, Sample, Verdict
from judges.cached import CachedJudge, Judged, Pending, Prepared
from judges.prompt_file import PromptFile, bundled_prompt, load_prompt_file

#: Bumped whenever the protocol (prompt assembly, parsing, retries) changes: part of the cache key.
PROTOCOL_VERSION = "mmvet-1"
#: Names the grader in verdict details, so the task can tell its verdicts from another judge's.
GRADER = "mm_vet"
MAX_TRIES = 5
TEMPERATURE_STEP = 0.5
DEFAULT_RETRY = "Give only the correctness score, one number from 0.0 to 1.0: "


def parse_score(reply: str) -> float | None:
    """The score MM-Vet's evaluator reads from a reply, or None when it would ask again."""
    token = (reply or "").split(" ")[0].strip()
    try:
        value = float(token)
    except ValueError:
        return None
    if math.isnan(value) or value > 1.0 or value < 0.0:
        return None
    return value


def table_row(question: str, answer: str, prediction: str) -> str:
    """The row the grader completes, exactly as the official script joins it."""
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return " | ".join([question, truth, prediction, ""])


@dataclass(frozen=True)
class Item:
    question: str
    answer: str


@judge("mmvet_grader")
class MMVetGrader(CachedJudge[Item]):
    """MM-Vet's LLM grader (any OpenAI-compatible endpoint): 0-1 correctness scores, cached."""

    @dataclass
    class Params:
        model: str = "gpt-4-0613"  # the grader MM-Vet's evaluator names; scores depend on the grader model
        base_url: str | None = None
        api_key_env: str = "OPENAI_API_KEY"
        template_file: str | None = None
        runs: int = 1
        max_tokens: int = 3
        concurrency: int = 16
        max_retries: int = 4
        timeout: float = 60.0
        backoff: float = 0.5
        cache: bool = True

        def __post_init__(self) -> None:
            if self.runs < 1:
                raise ValueError(f"runs must be >= 1, got {self.runs}")
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = params
        self.chat = RemoteChat(p.model, p.base_url, p.api_key_env, concurrency=p.concurrency,
                               max_retries=p.max_retries, timeout=p.timeout, backoff=p.backoff,
                               what=f"mmvet grader ({p.model})")
        self.template: PromptFile = load_prompt_file(p.template_file) if p.template_file else bundled_prompt("mmvet_grader")
        self.retry_sentence = self.template.meta.get("retry", DEFAULT_RETRY)

    def cache_identity(self) -> dict[str, Any]:
        ep = self.chat.identity()
        return {"judge": "mmvet_grader", "model": ep["model"], "base_url": ep["base_url"], "runs": self.params.runs,
                "max_tokens": self.params.max_tokens, "protocol": PROTOCOL_VERSION}

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": "mmvet_grader", **self.chat.identity(), "runs": self.params.runs,
                "max_tokens": self.params.max_tokens, "protocol": PROTOCOL_VERSION,
                "template": self.template.identity(), "retry": self.retry_sentence}

    def remote(self) -> RemoteChat:
        return self.chat

    def prepare(self, sample: Sample, generation: Generation) -> Prepared[Item] | Verdict:
        """MM-Vet samples only (their question and ground truth ride in `meta["mmvet"]`); the ground
        truth is hashed into the cache key with the prompt, so a corrected key is graded anew."""
        info = sample.meta.get("mmvet")
        if not isinstance(info, dict) or not isinstance(info.get("answer"), str) or not isinstance(info.get("question"), str):
            return Verdict(sample.id, "error", self.spec, None,
                           {"reason": "mmvet_grader grades MM-Vet samples only (no meta['mmvet'] with question and answer)"})
        key = hashlib.sha256("\x00".join([self.template.sha256, self.retry_sentence, info["question"],
                                          info["answer"]]).encode("utf-8")).hexdigest()
        return Prepared(key, Item(info["question"], info["answer"]))

    async def grade_once(self, session: ChatSession, item: Pending[Item], detail: dict[str, Any]) -> tuple[float, list[str], bool]:
        """(score, replies, fell back to 0.0) for one grading run of one answer."""
        prompt = self.template.body + "\n" + table_row(item.context.question, item.context.answer, item.generation.output)
        retry_prompt = prompt + "\n" + self.retry_sentence
        replies: list[str] = []
        temperature = 0.0
        message = prompt
        while True:
            reply = await session.complete([{"role": "user", "content": message}], label=f"sample {item.sample.id}",
                                           temperature=temperature, max_tokens=self.params.max_tokens)
            detail["prompt_tokens"] += reply.prompt_tokens
            detail["completion_tokens"] += reply.completion_tokens
            detail["requests"] += reply.attempts
            replies.append(reply.text)
            score = parse_score(reply.text)
            if score is not None:
                return score, replies, False
            if len(replies) >= MAX_TRIES:
                return 0.0, replies, True
            if len(replies) > 1:
                temperature += TEMPERATURE_STEP
            message = retry_prompt

    async def judge_one(self, session: ChatSession, item: Pending[Item]) -> Judged:
        t = self.template
        detail: dict[str, Any] = {"grader": GRADER, "template": t.name, "template_version": t.version,
                                  "template_sha256": t.sha256, "prompt_tokens": 0, "completion_tokens": 0,
                                  "requests": 0}
        scores: list[float] = []
        replies: list[list[str]] = []
        fallbacks = 0
        try:
            for _ in range(self.params.runs):
                score, run_replies, fell_back = await self.grade_once(session, item, detail)
                scores.append(score)
                replies.append(run_replies)
                fallbacks += fell_back
        except RequestFailed as exc:
            detail["requests"] += exc.attempts
            detail.update(reason=f"request failed: {exc.message}", scores=scores, replies=replies)
            verdict = Verdict(item.sample.id, "error", self.spec, None, detail)
            return self._judged(verdict, cacheable=False)
        detail.update(score=sum(scores) / len(scores), scores=scores, replies=replies, fallback_runs=fallbacks)
        verdict = Verdict(item.sample.id, "safe", self.spec, replies[-1][-1], detail)
        return self._judged(verdict, cacheable=True)

    @staticmethod
    def _judged(verdict: Verdict, cacheable: bool) -> Judged:
        d = verdict.detail
        return Judged(verdict, cacheable, requests=d["requests"], prompt_tokens=d["prompt_tokens"],
                      completion_tokens=d["completion_tokens"])
