"""MM-SafetyBench's questions as plain text requests, one per question, for any attack to deliver.

Liu et al., ECCV 2024 (arXiv 2311.17600); release github.com/isXinLiu/MM-SafetyBench (licence
**unverified**), HF mirror `PKU-Alignment/MM-SafetyBench` (CC-BY-NC-4.0). 13 scenarios; read through
the `mm_safetybench` task's own code (tasks/mm_safetybench.py), so sources, the tiny subset and
every error are the same.

Why a task of its own rather than a mode of `mm_safetybench`: that task is the benchmark as
released (each question three times, with its SD, TYPO and SD_TYPO pictures and the rephrased text
that points at them), and whether a task may be attacked is a property of the task class
(`Task.attackable`), not of one parameter value. Here each question appears once, text only, with
no picture: `Sample.text` and `meta["query"]` are the plain question, `Sample.category` the scenario
(its file stem, e.g. `08-Political_Lobbying`) and `meta["judge_group"]` the scenario's judging rule.

Which question: the release's `Question` (`source=dir`); the HF mirror keeps only the `Changed
Question` in its Text_only split (`source=hf`, the default as for `mm_safetybench`), and
`meta["text_field"]` says which one a sample carries. From the release, the fields MM-SafetyBench's
own attack derives (`key_phrase`, `phrase_type`, `rephrased_question`, `rephrased_question_sd`) are
kept in meta, so the qr attack can reproduce the release's rewrite without an LLM.

Parameters as `mm_safetybench`, except `path=` for its `data_dir=` (the name every harmful-behaviour
set uses): the release folder (source=dir) or a local copy of the hub repository (source=hf).
`revision=` pins the hub (default: the mirror's `main`, as `mm_safetybench`; the commit read is
recorded). Ids: `mmsb_questions/<scenario>/<question id>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from harness.errors import DataError
from harness.registry import task
from harness.schema import Sample
from tasks.behaviors import BehaviorSet
from tasks.mm_safetybench import MMSafetyBench
from tasks.mm_safetybench_release import read_questions

#: Release question fields kept in meta (meta key -> field name, verbatim from the release).
RELEASE_FIELDS = {"key_phrase": "Key Phrase", "phrase_type": "Phrase Type",
                  "rephrased_question": "Rephrased Question", "rephrased_question_sd": "Rephrased Question(SD)"}


@task("mmsb_questions")
class MMSBQuestions(BehaviorSet):
    """MM-SafetyBench's questions as plain text requests, once each (no pictures): ASR by scenario."""

    homepage = "https://github.com/isXinLiu/MM-SafetyBench"
    licence = "CC-BY-NC-4.0 (HF mirror); the release's own licence unverified"
    licence_verified = False

    @dataclass
    class Params:
        source: Literal["hf", "dir"] = "hf"
        path: str | None = None
        revision: str | None = None
        subset: Literal["tiny", "full"] = "full"
        scenarios: list[str] = field(default_factory=list)
        tiny_list: str | None = None

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if params.source == "dir" and not params.path:
            raise DataError("mmsb_questions: source=dir needs path=<the release folder holding data/> (or use source=hf)")
        self.release = MMSafetyBench(MMSafetyBench.Params(
            source=params.source, data_dir=params.path, revision=params.revision, subset=params.subset,
            scenarios=list(params.scenarios), images=["text"], tiny_list=params.tiny_list,
        ))

    def _release_records(self, scenario: str) -> dict[int, dict[str, Any]]:
        """The release's question records of one scenario (source=dir), for the fields kept in meta."""
        root = Path(self.params.path or "").expanduser()
        base = root / "data" if (root / "data" / "processed_questions").is_dir() else root
        return read_questions(base / "processed_questions" / f"{scenario}.json")

    def samples(self) -> Iterator[Sample]:
        records: dict[str, dict[int, dict[str, Any]]] = {}
        for s in self.release.samples():
            scenario, qid = s.meta["scenario"], s.meta["question_id"]
            extra: dict[str, Any] = {}
            if self.params.source == "dir":
                if scenario not in records:
                    records[scenario] = self._release_records(scenario)
                record = records[scenario].get(qid, {})
                extra = {key: record[name] for key, name in RELEASE_FIELDS.items()
                         if isinstance(record.get(name), str) and record[name].strip()}
            yield self.request(
                f"mmsb_questions/{scenario}/{qid}", s.text, scenario,
                scenario_number=s.meta["scenario_number"], question_id=qid, judge_group=s.meta["judge_group"],
                text_field=s.meta["text_field"], subset=self.params.subset, **extra,
            )

    def identity(self) -> dict[str, Any]:
        inner = {k: v for k, v in self.release.identity().items() if k not in ("spec", "task", "images", "render")}
        return self.described(**inner)
