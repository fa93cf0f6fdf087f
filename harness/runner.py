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

from harness import calibration
from harness.batching import ordered, prefetched, prepare
from harness.contracts.attack import Attack
from harness.contracts.backend import Backend, GenerationParams
from harness.contracts.defense import Defense, DefenseContext
from harness.contracts.judge import Judge
from harness.contracts.task import Task
from harness.distributed import Shard
from harness.errors import DataError, RunDirError
from harness.judging import score_cell
from harness.models.resolve import resolve_backend
from harness.progress import RunProgress, cell_label
from harness.provenance import git_commit, host_info, package_versions
from harness.registry import attacks, defenses, judges, tasks
from harness.samples import load_samples
from harness.schema import Generation, ResultRecord, RunConfig, Sample
from harness.spec import SpecError

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
    attacks: list[Attack]

    @classmethod
    def build(cls, config: RunConfig) -> Plan:
        if not (config.models and config.defenses and config.tasks):
            raise DataError("a run needs at least one --model, --defense and --task")
        built_attacks = [attacks.build(a) for a in config.attacks]
        built_tasks = [tasks.build(t) for t in config.tasks]
        check_attackable(built_tasks, built_attacks)
        overrides = {"device": config.device, "dtype": config.dtype}
        models = [(m, *resolve_backend(m, overrides)) for m in config.models]
        built_defenses = [defenses.build(d) for d in config.defenses]
        for spec, entry, _ in models:
            for d in built_defenses:
                d.check_backend_class(entry.cls, spec)  # capabilities, on the class: nothing loads
        for d in built_defenses:
            check_calibration(d)
        return cls(
            config=config,
            models=models,
            defenses=built_defenses,
            tasks=built_tasks,
            judges=[judges.build(j) for j in config.judges],
            attacks=built_attacks,
        )


def is_plain(attack: Attack) -> bool:
    """Whether the attack is `none`: the task's samples as released, which every task accepts."""
    return getattr(type(attack), "registered_name", None) == "none"


def prepares_ahead(attack: Attack) -> bool:
    """Whether the next batch may be attacked and loaded in a worker thread during generation: never
    for an attack that runs a model itself (white-box optimisation, a helper LLM), which must not
    share the device or torch's random state with the generation in flight."""
    return not attack.needs_model and attack.calls_per_sample == 0


def check_attackable(built_tasks: list[Task], built_attacks: list[Attack]) -> None:
    """Refuse, before anything loads or is written, an attack on a task whose samples are not plain
    harmful requests (a utility benchmark, or a release with its own attack built in): the numbers
    would mean nothing."""
    for task in built_tasks:
        for attack in built_attacks:
            if not task.attackable and not is_plain(attack):
                raise SpecError(f"task {task.spec!r} is not attackable (its samples are not plain harmful requests), "
                                f"so attack {attack.spec!r} cannot apply to it; run it with --attack none only")


def check_calibration(defense: Defense) -> None:
    """A defense's calibration task specs and fitted file, checked before anything is written: a
    typo there must fail in a second, not after the run directory claims a configuration."""
    plan = defense.calibration()
    if plan is None:
        return
    if plan.file and not Path(plan.file).expanduser().exists():
        raise DataError(f"defense {defense.spec!r}: fitted file {plan.file} does not exist")
    for role, spec in plan.sets.items():
        try:
            tasks.build(spec)
        except SpecError as exc:
            raise SpecError(f"defense {defense.spec!r}, calibration set {role!r}: {exc}") from None


def generate_batch(defense: Defense, backend: Backend, batch: list[Sample], params: GenerationParams) -> list[Generation]:
    """Generate for one batch; a sample whose image cannot be read is recorded as an error."""
    return generate_loaded(defense, backend, *prepare(batch), params)


def generate_loaded(defense: Defense, backend: Backend, batch: list[Sample], ready: list[Sample],
                    failed: dict[str, str], params: GenerationParams) -> list[Generation]:
    """Generate for one batch whose images are loaded (`harness.batching.prepare`)."""
    produced = {g.sample_id: g for g in defense.generate(backend, ready, params)} if ready else {}
    return [Generation(sample_id=s.id, output="", error=failed[s.id]) if s.id in failed else produced[s.id]
            for s in batch]


def _generation_record(sample: Sample, gen: Generation) -> dict[str, Any]:
    rec = gen.to_json()
    rec["sample"] = sample.to_json()
    return rec


class Runner:
    def __init__(self, config: RunConfig, out: str | Path, progress: bool = True, argv: list[str] | None = None,
                 retry_errors: bool = True) -> None:
        self.config = config
        self.plan = Plan.build(config)
        self.shard = Shard.from_env()  # data parallel under torchrun / accelerate (harness.distributed)
        progress = progress and self.shard.main
        self.rundir = self.shard.rundir(Path(out))
        self.progress = progress
        self.argv = argv if argv is not None else sys.argv
        self.retry_errors = retry_errors
        self.info: dict[str, Any] = {}
        self.results: list[dict[str, Any]] = []
        cells = [t.spec for _ in self.plan.models for _ in self.plan.attacks for _ in self.plan.defenses for t in self.plan.tasks]
        self.reporter = RunProgress(cells, enabled=progress)

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
        """Generate, judge and score every cell; one writer at a time per run directory."""
        with self.shard.owner_lock(self.rundir.root, "realign run"):
            self._warn_short_budget()
            with self.shard.main_first():
                self._start()
            try:
                for model_spec, entry, params in self.plan.models:
                    self._run_model(model_spec, entry, params)
            except BaseException as exc:
                self.reporter.close()  # a live bar must not outlive the run it draws
                self._finish("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
                raise
            self._finish("complete")
        return [ResultRecord.from_json(r) for r in self.results]

    def _finish(self, status: str) -> None:
        self.info["status"] = status
        self.info["sessions"][-1]["finished_at"] = _now()
        try:
            self.rundir.write_run_info(self.info)
        except RunDirError as exc:  # the original error matters more than the bookkeeping
            log.warning("%s", exc)

    def _warn_short_budget(self) -> None:
        """A judge that needs longer answers than the run generates would score truncations."""
        for judge in self.plan.judges:
            need = judge.min_new_tokens() if hasattr(judge, "min_new_tokens") else None
            if need is not None and self.config.max_new_tokens < need:
                log.warning("judge %s needs answers of at least %d new tokens to read them, but --max-new-tokens "
                            "is %d: truncated answers may be misjudged", judge.spec, need, self.config.max_new_tokens)

    def _run_model(self, model_spec: str, entry: Any, params: Any) -> None:
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
            for attack in self.plan.attacks:
                for defense in self.plan.defenses:
                    for task in self.plan.tasks:
                        self._run_cell(model_spec, get_backend, attack, defense, task)
        finally:
            if backend is not None:
                backend.close()

    def _run_cell(self, model_spec: str, get_backend: Callable[[], Backend], attack: Attack, defense: Defense,
                  task: Task) -> None:
        plain = is_plain(attack)
        cell = self.rundir.cell(model_spec, defense.spec, task.spec, attack.spec)
        samples = load_samples(task, self.config.limit)
        done = cell.generations()
        pending = [s for s in samples if s.id not in done or (self.retry_errors and done[s.id].get("error"))]
        pending = self.shard.agree(pending, samples)
        self.reporter.start_cell(cell_label(model_spec, defense.spec, task.spec, attack.spec), task.spec, len(samples),
                                 len(samples) - len(pending))
        if pending:
            backend = get_backend()
            with self.shard.main_first():  # rank 0 fits and caches; the others load its state
                calibration.prepare(defense, backend, DefenseContext(
                    cache_dir=cell.fitted_dir,
                    eval_ids=frozenset(s.id for s in samples),
                    batch_size=self.config.batch_size,
                    progress=self.progress,
                ))
            if attack.needs_model:  # a white-box attack: the model, and the defense it optimises through
                from harness.whitebox.handover import prepare_attack
                with self.shard.main_first():
                    prepare_attack(attack, backend, defense, DefenseContext(cache_dir=cell.fitted_dir, eval_ids=frozenset(
                        s.id for s in samples), batch_size=self.config.batch_size), self.rundir.root, self.progress)
            params = self._params()
            bar = self.reporter.bar("generate", len(samples), len(samples) - len(pending))
            # This process's batch of each round, in `--order`. The attack runs per batch, on pending
            # samples only (its own model calls, an LLM rewriter, are not repeated for samples already
            # done), and with the image loading one batch ahead unless it uses the model itself.
            rounds = self.shard.rounds(ordered(pending, self.config.order), self.config.batch_size)
            seed = self.config.seed
            for batch, ready, failed in prefetched(rounds, lambda mine: attack.apply_batch(mine, seed),
                                                   ahead=prepares_ahead(attack)):
                gens = generate_loaded(defense, backend, batch, ready, failed, params)
                # Rank 0 writes every process's records of the round, in the single-process order.
                for records in self.shard.collect([_generation_record(s, g) for s, g in zip(batch, gens)]):
                    cell.append_generations(records, replace=any(r["sample_id"] in done for r in records))
                    bar.update(len(records))
            bar.close()
            done = cell.generations()
        if not self.shard.main:  # rank 0 alone judges and scores
            return
        generations = {s.id: Generation.from_json(done[s.id]) for s in samples}
        if not plain:  # judge and score the samples as they were sent (the record keeps the plain request)
            samples = [Sample.from_json(done[s.id]["sample"]) for s in samples]
        identity = {
            "model": self.info["backends"].get(model_spec, {"spec": model_spec}),
            "attack": attack.cell_identity(defense.spec),
            "defense": defense.identity(),
            "task": task.identity(),
        }
        cell.write_identity(identity)
        for record in score_cell(cell, task, self.plan.judges, samples, generations, identity, self.reporter,
                                 retry_errors=self.retry_errors):
            self.results.append(record)
            self.rundir.write_results(self.results)
        self.reporter.end_cell(len(samples))


def run(config: RunConfig, out: str | Path, progress: bool = True, retry_errors: bool = True) -> list[ResultRecord]:
    """Run (or resume) a configuration into `out` and return its result records. Samples whose
    generation or verdict failed before are tried again unless `retry_errors` is false."""
    start = time.perf_counter()
    records = Runner(config, out, progress=progress, retry_errors=retry_errors).run()
    log.info("run finished in %.1f s", time.perf_counter() - start)
    return records
