"""MMBench's optional LLM choice extractor as a judge: which option a reply the rules cannot read picked.

MMBench's official tool (VLMEvalKit) reads the chosen letter by rule and, for replies the rules
cannot read, asks an LLM to match the reply to an option; its CircularEval then compares the
letters with the answers. Why a judge: a task never calls a model, and as a judge the extractor
gets the verdict cache, resume and `realign judge` re-extraction. It is used by
`mmbench:extractor=judge` with `--judge mmbench_extractor:model=...` (tasks/mmbench.py).

Per pass: the task's own rules (harness/choice_rules.py, named in `meta["mmbench"]["rules"]`) are
applied first; a letter they read is returned at once, with no request and no cost (`by: rule`).
Otherwise the LLM is asked (temperature 0) up to three times, as VLMEvalKit does, and the same
rules read its reply (`by: llm`); "Z" means no option. If none of the three replies can be read the
choice is None (`by: llm-failed`; scored wrong), where VLMEvalKit would draw a letter at random.
The verdict's label is `safe` for any extraction (not a safety statement; the letter is in
`detail["choice"]`) and `error` when the endpoint failed (not cached; a later run asks again).

The prompt is our own wording (judges/rubrics/mmbench_extractor.txt); `template_file=` sends
another with the placeholders {question}, {options} and {prediction} ({options}: one "X. text" line
per option, each ending in a newline, as VLMEvalKit's option string).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from harness.choice_rules import RULES, read_choice
from harness.models.remote import ChatSession, RemoteChat, RequestFailed
from harness.registry import judge
from harness.schema import Generation, Sample, Verdict
from judges.cached import CachedJudge, Judged, Pending, Prepared
from judges.prompt_file import PromptFile, bundled_prompt, load_prompt_file

PROTOCOL_VERSION = "mmbench-extract-1"
EXTRACTOR = "mmbench"  # what tasks/mmbench_score.py looks for in a verdict's detail
PLACEHOLDERS = ("question", "options", "prediction")
TRIES = 3


@dataclass(frozen=True)
class Item:
    question: str
    options: dict[str, str]
    rules: str


@judge("mmbench_extractor")
class MMBenchExtractor(CachedJudge[Item]):
    """MMBench's LLM choice extractor for replies its rules cannot read (any OpenAI-compatible endpoint)."""

    @dataclass
    class Params:
        model: str = "gpt-3.5-turbo-0125"  # VLMEvalKit's default choice-matching model (chatgpt-0125)
        base_url: str | None = None
        api_key_env: str = "OPENAI_API_KEY"
        template_file: str | None = None
        max_tokens: int = 16
        concurrency: int = 16
        max_retries: int = 4
        timeout: float = 60.0
        backoff: float = 0.5
        cache: bool = True

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = params
        self.chat = RemoteChat(p.model, p.base_url, p.api_key_env, concurrency=p.concurrency,
                               max_retries=p.max_retries, timeout=p.timeout, backoff=p.backoff,
                               what=f"mmbench extractor ({p.model})")
        self.template: PromptFile = (load_prompt_file(p.template_file, PLACEHOLDERS) if p.template_file
                                     else bundled_prompt("mmbench_extractor", PLACEHOLDERS))

    def cache_identity(self) -> dict[str, Any]:
        ep = self.chat.identity()
        return {"judge": "mmbench_extractor", "model": ep["model"], "base_url": ep["base_url"],
                "max_tokens": self.params.max_tokens, "protocol": PROTOCOL_VERSION}

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": "mmbench_extractor", **self.chat.identity(),
                "max_tokens": self.params.max_tokens, "protocol": PROTOCOL_VERSION, "template": self.template.identity()}

    def remote(self) -> RemoteChat:
        return self.chat

    def _verdict(self, sample: Sample, choice: str | None, by: str, raw: str | None, **extra: Any) -> Verdict:
        return Verdict(sample.id, "safe", self.spec, raw, {"extractor": EXTRACTOR, "choice": choice, "by": by, **extra})

    def prepare(self, sample: Sample, generation: Generation) -> Prepared[Item] | Verdict:
        info = sample.meta.get("mmbench")
        if not isinstance(info, dict) or not isinstance(info.get("options"), dict) or info.get("rules") not in RULES:
            return Verdict(sample.id, "error", self.spec, None,
                           {"reason": "mmbench_extractor reads MMBench passes only (no meta['mmbench'] with options)"})
        letter = read_choice(generation.output, info["options"], info["rules"])
        if letter is not None:
            return self._verdict(sample, letter, "rule", None, requests=0)
        key = hashlib.sha256("\x00".join([self.template.sha256, str(info.get("question")), info["rules"],
                                          json.dumps(info["options"], sort_keys=True)]).encode("utf-8")).hexdigest()
        return Prepared(key, Item(str(info.get("question") or ""), dict(info["options"]), info["rules"]))

    def prompt(self, item: Pending[Item]) -> str:
        options = "".join(f"{letter}. {text}\n" for letter, text in item.context.options.items())
        return self.template.fill(question=item.context.question, options=options, prediction=item.generation.output)

    async def judge_one(self, session: ChatSession, item: Pending[Item]) -> Judged:
        detail: dict[str, Any] = {"template": self.template.name, "template_sha256": self.template.sha256,
                                  "prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        messages = [{"role": "user", "content": self.prompt(item)}]
        replies: list[str] = []
        try:
            for _ in range(TRIES):
                reply = await session.complete(messages, label=f"sample {item.sample.id}", temperature=0.0,
                                               max_tokens=self.params.max_tokens)
                detail["prompt_tokens"] += reply.prompt_tokens
                detail["completion_tokens"] += reply.completion_tokens
                detail["requests"] += reply.attempts
                replies.append(reply.text)
                letter = read_choice(reply.text, item.context.options, item.context.rules)
                if letter is not None:
                    return self._judged(self._verdict(item.sample, letter, "llm", reply.text, replies=replies, **detail), True)
        except RequestFailed as exc:
            detail["requests"] += exc.attempts
            verdict = Verdict(item.sample.id, "error", self.spec, replies[-1] if replies else None,
                              {**detail, "reason": f"request failed: {exc.message}", "replies": replies})
            return self._judged(verdict, False)
        return self._judged(self._verdict(item.sample, None, "llm-failed", replies[-1], replies=replies, **detail), True)

    @staticmethod
    def _judged(verdict: Verdict, cacheable: bool) -> Judged:
        d = verdict.detail
        return Judged(verdict, cacheable, requests=d.get("requests", 0), prompt_tokens=d.get("prompt_tokens", 0),
                      completion_tokens=d.get("completion_tokens", 0))
