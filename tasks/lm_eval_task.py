"""lm-eval task definitions as a realign task: `lm_eval:tasks=mmmu_val+chartqa,include_path=DIR`.

Hundreds of VLM benchmarks already exist as lm-eval YAML (dataset, `doc_to_text`, `doc_to_image`,
`process_results`, aggregation); rewriting each for realign would fork their scoring. This task
builds the named tasks (or groups, or tags) through lm-eval's own TaskManager, exactly as
`lm_eval.simple_evaluate` does (its few-shot seed, its `num_fewshot` rule), so they run through
realign's runner under every defense, with resume, provenance, compare, gate and the leaderboard.

Each document of each `generate_until` task becomes one sample (harness.lm_eval_shared, shared
with the `realign` lm-eval model so both directions hand a defense the same sample): id
`lm_eval/<task>/<doc index>`, text lm-eval's context (few-shot examples included) without its
`<image>` placeholders, the document's one image (read when its batch runs), and the task's
generation kwargs recorded in `meta`. The run's own `--max-new-tokens` decides the length; set it to
the task's `max_gen_toks` for lm-eval's numbers. Answers are cut at the task's `until` strings and
scored by lm-eval's code (tasks.lm_eval_metrics). Loglikelihood and multiple-choice tasks are
refused: a defense generates, it gives no likelihoods. A multi-image document is refused unless
`multi_image=skip` leaves it out (counted in the identity).

`include_defaults=false` skips indexing lm-eval's thousands of built-in YAML files (seconds) when
every task comes from `include_path`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping

from harness.contracts.meaning import MetricMeaning, lookup
from harness.contracts.task import Task
from harness.errors import DataError
from harness.lm_eval_shared import as_image, generation_settings, make_sample, require_lm_eval, single_image
from harness.registry import task
from harness.schema import Generation, MetricValue, Sample, Verdict
from tasks import lm_eval_metrics

log = logging.getLogger(__name__)

#: lm-eval's default few-shot sampler seed (lm_eval.defaults.DEFAULT_OTHER_SEED), as simple_evaluate sets it.
FEWSHOT_SEED = 1234


@dataclass
class Entry:
    """One evaluation document: its task, index, lm-eval context and generation settings."""

    task: str
    doc_id: int
    context: str
    settings: dict[str, Any]
    has_image: bool


@dataclass
class Loaded:
    """The built lm-eval tasks and groups, their eval docs, and our documents in order."""

    tasks: dict[str, Any]
    groups: dict[str, Any]
    docs: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    version: str = ""


@task("lm_eval")
class LmEvalTask(Task):
    """lm-eval tasks (YAML, doc_to_image, process_results, aggregation) run through realign."""

    @dataclass
    class Params:
        tasks: list[str]
        include_path: str | None = None
        include_defaults: bool = True  # false: only tasks under include_path (no index of the built-ins)
        num_fewshot: int | None = None  # as lm-eval's --num_fewshot (a task whose YAML says 0 keeps 0)
        multi_image: Literal["error", "skip"] = "error"
        bootstrap_iters: int = 100000  # lm-eval's stderr bootstrap (only for non-mean aggregations); 0: none

        def __post_init__(self) -> None:
            if not self.tasks:
                raise ValueError("tasks= needs at least one lm-eval task, group or tag name (join several with +)")
            if self.num_fewshot is not None and self.num_fewshot < 0:
                raise ValueError("num_fewshot must be at least 0")
            if self.bootstrap_iters < 0:
                raise ValueError("bootstrap_iters must be at least 0")

    needs_judge = False

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self._loaded: Loaded | None = None

    # ---- loading ----------------------------------------------------------------------------------
    def load(self) -> Loaded:
        """Build the tasks once: the few-shot sampler draws in document order, so building twice
        could give other few-shot examples; metrics must see the contexts the samples carried."""
        if self._loaded is None:
            self._loaded = self._build()
        return self._loaded

    def _build(self) -> Loaded:
        version = require_lm_eval()
        from lm_eval.tasks import TaskManager

        p = self.params
        manager = TaskManager(include_path=p.include_path, include_defaults=p.include_defaults)
        try:
            loaded = manager.load(list(p.tasks))
        except (KeyError, ValueError) as exc:
            where = f" (include_path={p.include_path})" if p.include_path else ""
            raise DataError(f"lm_eval: cannot load task(s) {'+'.join(p.tasks)}{where}: {exc}") from None
        state = Loaded(tasks=dict(loaded["tasks"]), groups=dict(loaded["groups"]), docs={}, version=version)
        if not state.tasks:
            raise DataError(f"lm_eval: {'+'.join(p.tasks)} names no lm-eval task")
        for name, obj in state.tasks.items():
            self._configure(name, obj)
            state.docs[name] = obj.eval_docs
            self._add_entries(state, name, obj)
        return state

    def _configure(self, name: str, obj: Any) -> None:
        """Refuse what a defense cannot run; set num_fewshot and the few-shot seed as simple_evaluate does."""
        output = obj.get_config("output_type")
        if output != "generate_until":
            raise DataError(f"lm_eval: task {name} is a {output} task (scored by likelihoods); realign runs "
                            "generate_until tasks only, because a defense generates answers and gives no likelihoods")
        if (obj.get_config("repeats") or 1) != 1:
            raise DataError(f"lm_eval: task {name} asks for {obj.get_config('repeats')} answers per document; "
                            "realign generates one")
        if self.params.num_fewshot is not None and obj.get_config("num_fewshot") != 0:
            obj.set_config(key="num_fewshot", value=self.params.num_fewshot)
        elif obj.get_config("num_fewshot") is None:
            obj.set_config(key="num_fewshot", value=0)
        obj.set_fewshot_seed(seed=FEWSHOT_SEED)

    def _add_entries(self, state: Loaded, name: str, obj: Any) -> None:
        """lm-eval's own requests (build_all_requests: context, few-shot examples, generation kwargs),
        kept as text and settings only; images are read again per batch, not held for the whole set."""
        obj.build_all_requests(limit=None, rank=0, world_size=1)
        for inst in obj.instances:
            context, gen_kwargs, *aux = inst.args
            visual = aux[0].get("visual") if aux else None
            where = f"lm-eval task {name} doc {inst.doc_id}"
            try:
                has_image = single_image(visual, where) is not None
            except DataError:
                if self.params.multi_image == "error":
                    raise DataError(f"{where}: several images per document (multi_image=skip leaves such "
                                    "documents out)") from None
                state.skipped[name] = state.skipped.get(name, 0) + 1
                continue
            state.entries.append(Entry(name, int(inst.doc_id), str(context), generation_settings(gen_kwargs), has_image))
        obj._instances = None  # the requests hold every image; ours are read back per batch

    # ---- the task contract ------------------------------------------------------------------------
    def samples(self) -> Iterator[Sample]:
        state = self.load()
        for e in state.entries:
            obj, docs = state.tasks[e.task], state.docs[e.task]
            image = (lambda obj=obj, docs=docs, e=e: _first_image(obj, docs, e)) if e.has_image else None
            yield make_sample(e.task, e.doc_id, e.context, image, e.settings)

    def metrics(self, samples: list[Sample], generations: dict[str, Generation],
                verdicts: dict[str, Verdict] | None) -> dict[str, MetricValue]:
        return lm_eval_metrics.score(self.load(), self.params, samples, generations).metrics

    def per_sample(self, samples: list[Sample], generations: dict[str, Generation],
                   verdicts: dict[str, Verdict] | None) -> dict[str, dict[str, float]]:
        return lm_eval_metrics.score(self.load(), self.params, samples, generations).per_sample

    def metric_meanings(self, metrics: Mapping[str, MetricValue]) -> dict[str, MetricMeaning]:
        """From each lm-eval task's `higher_is_better` (groups take their children's): utility, ranked
        in that direction; a metric lm-eval gives no direction is shown, never ranked."""
        table = lm_eval_metrics.meanings(self.load(), list(self.params.tasks))
        return {name: lookup(name, table) or lm_eval_metrics.UNKNOWN for name in metrics}

    def identity(self) -> dict[str, Any]:
        state = self.load()
        return {
            "spec": self.spec,
            "lm_eval": state.version,
            "include_path": self.params.include_path,
            "tasks": {name: {"version": obj.VERSION, "config_sha256": config_hash(obj),
                             "num_fewshot": obj.get_config("num_fewshot"), "docs": len(state.docs[name]),
                             "skipped_multi_image": state.skipped.get(name, 0)}
                      for name, obj in state.tasks.items()},
            "groups": {name: getattr(g, "version", None) for name, g in state.groups.items()},
        }


def _first_image(obj: Any, docs: Any, e: Entry) -> Any:
    """The document's one image, read from the (memory-mapped) eval docs when its batch runs."""
    where = f"lm-eval task {e.task} doc {e.doc_id}"
    return as_image(single_image(obj.doc_to_image(docs[e.doc_id]), where), where)


def config_hash(obj: Any) -> str:
    """sha256 of lm-eval's own dump of the task config (functions as their source), so a changed
    YAML, prompt function or metric shows up in the results."""
    text = json.dumps(obj.dump_config(), sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
