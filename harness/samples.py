"""Taking samples out of a task and loading their images: shared by the runner and the calibration
stage, so neither needs the other and a defense never needs either.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

from harness.contracts.task import Task
from harness.errors import DataError, ImageLoadError
from harness.images import load_image
from harness.schema import Sample

log = logging.getLogger(__name__)


def load_samples(task: Task, limit: int | None) -> list[Sample]:
    """The first `limit` samples of a task (all when None), refusing a repeated id."""
    samples = list(itertools.islice(task.samples(), limit))
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"task {task.spec!r} yields sample id {s.id!r} twice; ids must be unique")
        seen.add(s.id)
    return samples


def with_loaded_image(sample: Sample) -> Sample:
    """The sample with its image (path, renderer or in-memory) as an RGB PIL image."""
    if sample.image is None:
        return sample
    return dataclasses.replace(sample, image=load_image(sample.image))


def load_images(samples: list[Sample]) -> list[Sample]:
    """Samples with their images loaded (for calibration sets, where a bad image is an error)."""
    return [with_loaded_image(s) for s in samples]


def split_loadable(batch: list[Sample]) -> tuple[list[Sample], dict[str, str]]:
    """(samples with images loaded, {sample id: error} for those whose image cannot be read).

    During generation an unreadable image is one sample's error, recorded and never dropped."""
    ready: list[Sample] = []
    failed: dict[str, str] = {}
    for sample in batch:
        try:
            ready.append(with_loaded_image(sample))
        except ImageLoadError as exc:
            failed[sample.id] = f"image: {exc}"
            log.warning("sample %s: %s", sample.id, exc)
    return ready, failed
