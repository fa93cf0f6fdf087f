"""The part every paid judge shares: skip what needs no asking, answer from the cache, count the cost.

Why a base class: the LLM judge and Llama Guard differ only in how one verdict is obtained (a
rubric and a strict word parser over HTTP; a classifier's own template, over HTTP or locally).
Everything around that must behave the same for both, or their numbers and bills would not be
comparable, so it is written here once:

- a generation that failed is an `error` verdict (`{"reason": "generation failed"}`) without
  asking anyone;
- each verdict is cached (judges/cache.py) under the judge's `cache_identity()`, a per-sample
  template hash, the sample id and the response; a hit comes back with `"cached": True` in
  its detail and is counted, so re-runs and resumed crashes pay only for what is new;
- the subclass judges the rest and says which verdicts may be cached: transport failures are
  not (a later run asks again), real verdicts are, an unreadable reply included;
- a remote judge's verdicts are cached the moment each arrives, so a killed run loses only the
  requests in flight;
- usage (verdicts, errors, cache hits, requests, tokens) is summed per judge instance, so a
  run's judge bill is visible (`usage_record`);
- `cache=false` turns the cache off; it is opened lazily, so a judge that is never asked
  never touches the cache file;
- the cache never stops a judge: a failure to open, read or write it warns once and the judge
  goes on without it (`judges.cache.FailSoftCache`), with the verdicts of `cache=false`.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from harness.contracts.judge import Judge
from harness.models.remote import ChatSession, RemoteChat, run_sync
from harness.schema import Generation, Sample, Verdict, dumps
from judges.cache import FailSoftCache, cache_key

C = TypeVar("C")


@dataclass
class Usage:
    """What judging cost in this process: summed into results so a run's judge bill is visible."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    verdicts: int = 0
    cache_hits: int = 0
    errors: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Prepared(Generic[C]):
    """What a subclass needs to judge one sample: the hash of the template it will use, and its context."""

    template_hash: str
    context: C


@dataclass
class Pending(Generic[C]):
    """A sample to judge (not cached, generation fine), with its cache key and the subclass's context."""

    index: int
    sample: Sample
    generation: Generation
    key: str
    context: C


@dataclass
class Judged:
    """A subclass's verdict and its cost; `cacheable` is False for transport failures."""

    verdict: Verdict
    cacheable: bool
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CachedJudge(Judge, Generic[C]):
    """A judge whose verdicts cost something: cached, counted, failed generations skipped.

    Subclasses implement `cache_identity` and `prepare`, and then either `remote` and
    `judge_one` (one coroutine per sample over a shared session of that endpoint) or
    `judge_batch` (a local, sync batch, used when `remote()` is None). Their Params need
    `cache: bool`.
    """

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        self.usage = Usage()
        self._cache: FailSoftCache | None = None

    # ---- what subclasses say --------------------------------------------------------------
    @abstractmethod
    def cache_identity(self) -> dict[str, Any]:
        """What decides a verdict besides the template and the answer: part of every cache key."""

    @abstractmethod
    def prepare(self, sample: Sample, generation: Generation) -> Prepared[C] | Verdict:
        """The template hash and context for judging this sample, or a verdict given without asking."""

    def remote(self) -> RemoteChat | None:
        """The endpoint verdicts are asked from, or None to judge locally with `judge_batch`."""
        return None

    async def judge_one(self, session: ChatSession, item: Pending[C]) -> Judged:
        """Judge one sample over the endpoint's session (remote judges)."""
        raise NotImplementedError(f"{type(self).__name__} does not judge over an endpoint")

    def judge_batch(self, items: list[Pending[C]]) -> list[Judged]:
        """Judge samples locally, one Judged per item, in order (judges without an endpoint)."""
        raise NotImplementedError(f"{type(self).__name__} has no local judging")

    # ---- shared machinery -----------------------------------------------------------------
    def cache(self) -> FailSoftCache | None:
        """The verdict cache (its file is opened on first read or write); None with cache=false."""
        if self.params.cache and self._cache is None:
            self._cache = FailSoftCache()
        return self._cache

    def usage_record(self) -> dict[str, int]:
        return self.usage.to_json()

    def verdicts(self, samples: list[Sample], generations: list[Generation]) -> list[Verdict]:
        """One verdict per pair, in order; cached ones free, the rest judged by the subclass."""
        out, pending = self._lookup(samples, generations)
        if pending:
            if self.remote() is None:
                self._record_all(pending, self.judge_batch(pending), out)
            else:
                run_sync(lambda: self._judge_remote(pending, out), thread_name="judge")
        return self._finish(out)

    async def averdicts(self, samples: list[Sample], generations: list[Generation]) -> list[Verdict]:
        """`verdicts` from inside an event loop (a local judge runs its batch in a worker thread)."""
        out, pending = self._lookup(samples, generations)
        if pending:
            if self.remote() is None:
                self._record_all(pending, await asyncio.to_thread(self.judge_batch, pending), out)
            else:
                await self._judge_remote(pending, out)
        return self._finish(out)

    def _lookup(self, samples: list[Sample], generations: list[Generation]
                ) -> tuple[list[Verdict | None], list[Pending[C]]]:
        """Verdicts known without asking (failed generations, subclass refusals, cache hits), and the rest."""
        out: list[Verdict | None] = [None] * len(samples)
        items: list[Pending[C]] = []
        ident = dumps(self.cache_identity())
        for i, (sample, gen) in enumerate(zip(samples, generations)):
            if gen.error:
                out[i] = Verdict(sample.id, "error", self.spec, None, {"reason": "generation failed"})
                continue
            prepared = self.prepare(sample, gen)
            if isinstance(prepared, Verdict):
                out[i] = prepared
                continue
            key = cache_key(ident, prepared.template_hash, sample.id, gen.output)
            items.append(Pending(i, sample, gen, key, prepared.context))
        cache = self.cache() if items else None  # nothing to look up: leave the file alone
        hits = cache.get_many(it.key for it in items) if cache else {}
        pending: list[Pending[C]] = []
        for it in items:
            hit = hits.get(it.key)
            if hit is None:
                pending.append(it)
                continue
            self.usage.cache_hits += 1
            out[it.index] = Verdict(it.sample.id, hit.label, self.spec, hit.raw,  # type: ignore[arg-type]
                                    {**hit.detail, "cached": True})
        return out, pending

    async def _judge_remote(self, pending: list[Pending[C]], out: list[Verdict | None]) -> None:
        endpoint = self.remote()
        assert endpoint is not None
        async with endpoint.session() as session:

            async def one(item: Pending[C]) -> None:
                self._record(item, await self.judge_one(session, item), out)

            await asyncio.gather(*(one(item) for item in pending))

    def _record_all(self, pending: list[Pending[C]], judged: list[Judged], out: list[Verdict | None]) -> None:
        if len(judged) != len(pending):
            raise RuntimeError(f"{type(self).__name__}.judge_batch returned {len(judged)} verdicts "
                               f"for {len(pending)} samples")
        for item, result in zip(pending, judged):
            self._record(item, result, out)

    def _record(self, item: Pending[C], judged: Judged, out: list[Verdict | None]) -> None:
        """Place a fresh verdict, count its cost, and cache it at once when it may be cached."""
        out[item.index] = v = judged.verdict
        self.usage.requests += judged.requests
        self.usage.prompt_tokens += judged.prompt_tokens
        self.usage.completion_tokens += judged.completion_tokens
        cache = self.cache()
        if judged.cacheable and cache is not None:
            cache.put(item.key, self.spec, item.sample.id, v.label, v.raw, v.detail)

    def _finish(self, out: list[Verdict | None]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for v in out:
            assert v is not None
            self.usage.verdicts += 1
            self.usage.errors += v.label == "error"
            verdicts.append(v)
        return verdicts
