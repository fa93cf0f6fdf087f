"""plan -> generate -> judge -> score, resumable.

Every component is built (and every spec validated) before any model loads, so a typo fails
in a second rather than after an hour. Generations and verdicts are appended per batch; a
re-run with the same configuration skips what is on disk.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from harness import calibration
from harness.contracts.backend import Backend, GenerationParams
from harness.contracts.defense import Defense, DefenseContext
from harness.contracts.judge import Judge
from harness.contracts.task import Task
from harness.errors import DataError
from harness.judging import score_cell
from harness.models.resolve import resolve_backend
from harness.provenance import git_commit, host_info, package_versions
from harness.registry import defenses, judges, tasks
from harness.samples import load_samples, split_loadable
from harness.schema import Generation, ResultRecord, RunConfig, Sample
from harness.store import RunDir

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Plan:
    """All components of a run, built and validated up front."""

    config: RunConfig
    models: list[tuple[str, Any, Any]]  # (spec, registry entry, params)
    defenses: list[Defense]
    tasks: list[Task]
    judges: list[Judge]

    @classmethod
    def build(cls, config: RunConfig) -> Plan:
        if not (config.models and config.defenses and config.tasks):
            raise DataError("a run needs at least one --model, --defense and --task")
        overrides = {"device": config.device, "dtype": config.dtype}
        models = [(m, *resolve_backend(m, overrides)) for m in config.models]
        built_defenses = [defenses.build(d) for d in config.defenses]
        for spec, entry, _ in models:
            for d in built_defenses:
                d.check_backend_class(entry.cls, spec)  # capabilities, on the class: nothing loads
        return cls(
            config=config,
            models=models,
            defenses=built_defenses,
            tasks=[tasks.build(t) for t in config.tasks],
            judges=[judges.build(j) for j in config.judges],
        )


def generate_batch(defense: Defense, backend: Backend, batch: list[Sample], params: GenerationParams) -> list[Generation]:
    """Generate for one batch; a sample whose image cannot be read is recorded as an error."""
    ready, failed = split_loadable(batch)
    produced = {g.sample_id: g for g in defense.generate(backend, ready, params)} if ready else {}
    return [Generation(sample_id=s.id, output="", error=failed[s.id]) if s.id in failed else produced[s.id]
            for s in batch]


def _generation_record(sample: Sample, gen: Generation) -> dict[str, Any]:
    rec = gen.to_json()
    rec["sample"] = sample.to_json()
    return rec


class Runner:
    def __init__(self, config: RunConfig, out: str | Path, progress: bool = True, argv: list[str] | None = None) -> None:
        self.config = config
        self.plan = Plan.build(config)
        self.rundir = RunDir(Path(out))
        self.progress = progress
        self.argv = argv if argv is not None else sys.argv
        self.info: dict[str, Any] = {}
        self.results: list[dict[str, Any]] = []

    def _start(self) -> None:
        identity = self.config.generation_identity()
        stored = self.rundir.check_compatible(identity)
        self.info = stored or {
            "generation_identity": identity,
            "created_at": _now(),
            "sessions": [],
            "backends": {},
        }
        self.info.update(
            config=self.config.to_json(),
            versions=package_versions(),
            git=git_commit(),
            host=host_info(),
            seed=self.config.seed,
            status="running",
        )
        self.info["sessions"].append({"started_at": _now(), "finished_at": None, "argv": self.argv})
        self.rundir.write_run_info(self.info)

    def _params(self) -> GenerationParams:
        c = self.config
        return GenerationParams(c.max_new_tokens, c.min_new_tokens, c.do_sample, c.temperature, c.top_p, c.seed)

    def run(self) -> list[ResultRecord]:
        self._start()
        for model_spec, entry, params in self.plan.models:
            backend: Backend | None = None

            def get_backend() -> Backend:
                nonlocal backend
                if backend is None:
                    log.info("loading model %s", model_spec)
                    backend = entry.cls(params)
                    backend.spec = model_spec
                    self.info["backends"][model_spec] = backend.identity()
                    self.rundir.write_run_info(self.info)
                return backend

            try:
                for defense in self.plan.defenses:
                    for task in self.plan.tasks:
                        self._run_cell(model_spec, get_backend, defense, task)
            finally:
                if backend is not None:
                    backend.close()
        self.info["status"] = "complete"
        self.info["sessions"][-1]["finished_at"] = _now()
        self.rundir.write_run_info(self.info)
        return [ResultRecord.from_json(r) for r in self.results]

    def _run_cell(self, model_spec: str, get_backend: Callable[[], Backend], defense: Defense, task: Task) -> None:
        cell = self.rundir.cell(model_spec, defense.spec, task.spec)
        samples = load_samples(task, self.config.limit)
        done = cell.generations()
        pending = [s for s in samples if s.id not in done]
        label = f"{model_spec} | {defense.spec} | {task.spec}"
        if pending:
            backend = get_backend()
            calibration.prepare(defense, backend, DefenseContext(
                cache_dir=cell.dir.parent / "fitted",
                eval_ids=frozenset(s.id for s in samples),
                batch_size=self.config.batch_size,
                progress=self.progress,
            ))
            params = self._params()
            bar = tqdm(total=len(samples), initial=len(samples) - len(pending), desc=f"generate {label}",
                       disable=not self.progress, file=sys.stderr, unit="sample")
            for start in range(0, len(pending), self.config.batch_size):
                batch = pending[start : start + self.config.batch_size]
                gens = generate_batch(defense, backend, batch, params)
                cell.append_generations([_generation_record(s, g) for s, g in zip(batch, gens)])
                bar.update(len(batch))
            bar.close()
            done = cell.generations()
        generations = {s.id: Generation.from_json(done[s.id]) for s in samples}
        identity = {
            "model": self.info["backends"].get(model_spec, {"spec": model_spec}),
            "defense": defense.identity(),
            "task": task.identity(),
        }
        cell.write_identity(identity)
        for record in score_cell(cell, task, self.plan.judges, samples, generations, identity, self.progress):
            self.results.append(record)
            self.rundir.write_results(self.results)


def run(config: RunConfig, out: str | Path, progress: bool = True) -> list[ResultRecord]:
    """Run (or resume) a configuration into `out` and return its result records."""
    start = time.perf_counter()
    records = Runner(config, out, progress=progress).run()
    log.info("run finished in %.1f s", time.perf_counter() - start)
    return records
