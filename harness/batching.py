"""How a cell's pending samples become batches: ordered by length, prepared one batch ahead.

Why order by length: a left-padded batch runs every row to the longest prompt, so mixing a
30-token request with a 600-token one pays for 600 twice. Sorting the pending samples (longest
first, as lm-eval does, so an out-of-memory batch shows up at the start and not after an hour)
keeps similar lengths together. The key is the request's character count, with image samples
grouped before text-only ones: it is known before anything is tokenized or rendered, and the
order is a pure function of the samples, so every data-parallel rank computes the same batches.
Outputs do not depend on the order (each defense's batched output equals its one-at-a-time
output, which the tests check), so `--order` is not part of a run's identity and a run may resume
under the other order.

Why prepare ahead: the attack's images (FigStep typography, a file on a slow disk) are rendered
and decoded for the next batch in a worker thread while the current batch generates, so the model
never waits for PIL. Attacks that call the model themselves (white-box optimisation) are prepared
in line instead, never concurrently with generation on the same model.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from harness.samples import split_loadable
from harness.schema import Sample

Prepared = tuple[list[Sample], list[Sample], dict[str, str]]  # (batch, loadable samples, {id: image error})


def length_key(sample: Sample) -> tuple[int, int]:
    """Longest first; image samples before text-only ones at equal length."""
    return (sample.image is None, -len(sample.text or ""))


def ordered(samples: list[Sample], order: str) -> list[Sample]:
    """The samples in generation order (`task`: as the task yields them; `length`: by `length_key`,
    ties kept in task order); the names are `harness.schema.ORDERS`."""
    return sorted(samples, key=length_key) if order == "length" else list(samples)


def prepare(batch: list[Sample]) -> Prepared:
    """A batch with its images loaded; an unreadable image is that sample's error, not the batch's."""
    ready, failed = split_loadable(batch)
    return batch, ready, failed


def prefetched(batches: Iterable[list[Sample]], attack: Callable[[list[Sample]], list[Sample]],
               ahead: bool) -> Iterator[Prepared]:
    """Each batch attacked and loaded; with `ahead`, the next one is attacked and loaded in a worker
    thread while the caller generates the current one (an error there surfaces when its turn comes)."""
    def work(mine: list[Sample]) -> Prepared:
        return prepare(attack(mine) if mine else [])

    if not ahead:
        for mine in batches:
            yield work(mine)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="realign-prefetch") as pool:
        pending: Future[Prepared] | None = None
        for mine in batches:
            nxt = pool.submit(work, mine)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()
