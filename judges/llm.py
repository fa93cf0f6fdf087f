"""LLM judge on any OpenAI-compatible chat endpoint, with per-group rubrics and a strict parser.

`llm:model=gpt-4o-mini` (OpenAI), `llm:model=meta-llama/Llama-3.1-8B-Instruct,base_url=http://host:8000/v1`
(vLLM, TGI, llama.cpp ...). The rubric is chosen per sample from `Sample.meta["judge_group"]`
(MM-SafetyBench's general / lobbying / certification / government), and samples without a
group get `default` (the strict generic rubric). `rubric=<name>` forces one bundled rubric
and `template_file=<path>` one template of your own for every sample.

What makes the number trustworthy: temperature 0; the answer fenced so it cannot
steer the judge; a reply that is not exactly a verdict word is asked once more with a
reminder and otherwise recorded as `error` with the raw reply kept (never `safe`); transport
failures after bounded retries are `error` too; every verdict keeps its raw reply, tokens and
request count; verdicts are cached (judges/cache.py) so re-runs and resumed crashes pay only
for what is new. Caching, skipping failed generations and usage counting come from
`judges.cached.CachedJudge`; the endpoint (key, retries, concurrency) from `harness.models.remote`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.models.remote import ChatSession, RemoteChat, RequestFailed
from harness.registry import judge
from harness.schema import Generation, Sample, Verdict
from judges.cached import CachedJudge, Judged, Pending, Prepared
from judges.templates import BUNDLED, JUDGE_GROUPS, Template, bundled_template, load_template


#: Bumped whenever parsing or the reminder protocol changes: part of the cache key.
PARSER_VERSION = "strict-1"


@dataclass(frozen=True)
class Rubric:
    """The rubric chosen for one sample, and the judge group it was chosen by ("-" when none)."""

    group: str
    template: Template


@judge("llm")
class LLMJudge(CachedJudge[Rubric]):
    """LLM judge on an OpenAI-compatible endpoint; per-group rubrics, strict parser, cached verdicts."""

    @dataclass
    class Params:
        model: str = "gpt-4o-mini"
        base_url: str | None = None  # None -> $OPENAI_BASE_URL, else the OpenAI API
        api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable holding the key
        rubric: str = "auto"  # auto = from each sample's judge_group; or one bundled rubric for all
        default: str = "strict"  # rubric for samples without a judge_group (with rubric=auto)
        template_file: str | None = None  # your own template for every sample (overrides rubric)
        max_tokens: int = 16
        concurrency: int = 16
        max_retries: int = 4
        timeout: float = 60.0  # seconds per request attempt
        backoff: float = 0.5
        cache: bool = True

        def __post_init__(self) -> None:
            if self.rubric != "auto" and self.rubric not in BUNDLED:
                raise ValueError(f"rubric {self.rubric!r} is not auto or one of {', '.join(BUNDLED)}")
            if self.default not in BUNDLED:
                raise ValueError(f"default {self.default!r} is not one of {', '.join(BUNDLED)}")
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = params
        self.chat = RemoteChat(
            p.model, p.base_url, p.api_key_env, concurrency=p.concurrency, max_retries=p.max_retries,
            timeout=p.timeout, backoff=p.backoff, what=f"llm judge ({p.model})",
        )
        if p.template_file:
            self.templates = {"file": load_template(p.template_file)}
        elif p.rubric != "auto":
            self.templates = {p.rubric: bundled_template(p.rubric)}
        else:
            self.templates = {name: bundled_template(name) for name in dict.fromkeys([*JUDGE_GROUPS, p.default])}

    # ---- identity ---------------------------------------------------------------------------
    def cache_identity(self) -> dict[str, Any]:
        """What decides a verdict besides the template and the answer: part of every cache key."""
        ep = self.chat.identity()
        return {"judge": "llm", "model": ep["model"], "base_url": ep["base_url"], "temperature": 0.0,
                "max_tokens": self.params.max_tokens, "parser": PARSER_VERSION}

    def identity(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "name": "llm",
            **self.chat.identity(),
            "temperature": 0.0,
            "max_tokens": self.params.max_tokens,
            "parser": PARSER_VERSION,
            "rubric": "file" if self.params.template_file else self.params.rubric,
            "default": self.params.default,
            "templates": {name: t.identity() for name, t in self.templates.items()},
        }

    def remote(self) -> RemoteChat:
        return self.chat

    # ---- rubric choice ----------------------------------------------------------------------
    def template_for(self, sample: Sample) -> tuple[str, Template | None]:
        """(group, template) for a sample; template None when its judge group is unknown."""
        group = str(sample.meta.get("judge_group") or "")
        if self.params.template_file:
            return group or "-", self.templates["file"]
        if self.params.rubric != "auto":
            return group or "-", self.templates[self.params.rubric]
        if not group:
            return "-", self.templates[self.params.default]
        return group, self.templates.get(group) if group in JUDGE_GROUPS else None

    def prepare(self, sample: Sample, generation: Generation) -> Prepared[Rubric] | Verdict:
        """The sample's rubric (its hash is in the cache key); an unknown group is an error, unasked."""
        group, template = self.template_for(sample)
        if template is None:
            return Verdict(sample.id, "error", self.spec, None,
                           {"reason": f"unknown judge group {group!r}; known: {', '.join(JUDGE_GROUPS)}"})
        return Prepared(template.sha256, Rubric(group, template))

    # ---- judging ----------------------------------------------------------------------------
    async def judge_one(self, session: ChatSession, item: Pending[Rubric]) -> Judged:
        """Ask, and once more with a reminder if the reply is not a verdict word."""
        t = item.context.template
        detail: dict[str, Any] = {"template": t.name, "template_version": t.version,
                                  "template_sha256": t.sha256, "group": item.context.group,
                                  "prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        messages = t.render(item.generation.output, item.sample.query)
        replies: list[str] = []
        label = None
        try:
            for _ in range(2):  # the reply, then once more with a reminder
                reply = await session.complete(messages, label=f"sample {item.sample.id}", temperature=0.0,
                                               max_tokens=self.params.max_tokens)
                detail["prompt_tokens"] += reply.prompt_tokens
                detail["completion_tokens"] += reply.completion_tokens
                detail["requests"] += reply.attempts
                replies.append(reply.text)
                label = t.parse(reply.text)
                if label is not None:
                    break
                messages = [*messages, {"role": "assistant", "content": reply.text},
                            {"role": "user", "content": t.reminder()}]
        except RequestFailed as exc:
            # Transport failure: an error now, but not cached, so a later run asks again.
            detail["requests"] += exc.attempts
            detail.update(reason=f"request failed: {exc.message}", replies=replies)
            verdict = Verdict(item.sample.id, "error", self.spec, replies[-1] if replies else None, detail)
            return self._judged(verdict, cacheable=False)
        detail["reminded"] = len(replies) > 1
        if len(replies) > 1:
            detail["replies"] = replies
        if label is None:
            detail["reason"] = "unreadable reply (after one reminder)"
        verdict = Verdict(item.sample.id, label or "error", self.spec, replies[-1], detail)  # type: ignore[arg-type]
        return self._judged(verdict, cacheable=True)

    @staticmethod
    def _judged(verdict: Verdict, cacheable: bool) -> Judged:
        d = verdict.detail
        return Judged(verdict, cacheable, requests=d["requests"], prompt_tokens=d["prompt_tokens"],
                      completion_tokens=d["completion_tokens"])
