"""MMBench: single-choice questions over 20 abilities, scored by CircularEval (utility).

Liu et al., "MMBench: Is Your Multi-modal Model an All-around Player?", ECCV 2024. `split=dev`
has answers; `split=test` withholds them: a test run produces generations (each pass keeps its
official index in `meta["index"]`) for the MMBench evaluation server, and its metrics carry no
accuracy, only extraction counts. `lang=en|cn` picks the English or Chinese edition.

Data, one of:
- the Hugging Face copy `lmms-lab/MMBench` (what lmms-eval reads) pinned to HF_REVISION, files
  `<lang>/<split>-*.parquet` (columns index, question, hint, A-D, answer, category, L2-category,
  image; the rotated copies included, 4,329 dev rows per language per its card);
- `path=` a release TSV (`MMBench_DEV_EN.tsv` ...: pictures in base64), a folder holding
  `MMBench_<SPLIT>_<LANG>.tsv`, or a local copy of the hub repository.

Each question becomes its CircularEval passes (tasks/mmbench_data.py; `circular=false` asks pass
0 only). Sample ids: `mmbench/<lang>/<split>/<question index>/<pass>`. Prompt: `llava` (LLaVA-1.5
and lmms-eval: hint, question, "A. ..." lines, then the single-letter instruction in the edition's
language) or `vlmevalkit` (VLMEvalKit's "Hint: / Question: / Options:" layout). The letter a reply
names is read by rule (`extract=lmms-eval|vlmevalkit`, harness/choice_rules.py); `extractor=judge`
adds the LLM extractor the official tool offers for replies the rules cannot read: run with
`--judge mmbench_extractor:model=...` (judges/mmbench_extractor.py). Scoring: tasks/mmbench_score.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from harness.contracts.meaning import COUNT, rate
from harness.contracts.task import Task
from harness.errors import DataError
from harness.registry import task
from harness.schema import Generation, MetricValue, Sample, Verdict
from tasks import hfdata
from tasks.mmbench_data import Pass, Row, passes, read_tsv, row_from
from tasks.mmbench_score import l1_of, question_hits, score

log = logging.getLogger(__name__)

HF_REPO = "lmms-lab/MMBench"
#: The head of lmms-lab/MMBench's main branch when this adapter was written ("Upload dataset", 56ba1af).
HF_REVISION = "56ba1af8954932c4804bd3f522e05ed96e63b654"
HF_COLUMNS = ("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "L2-category", "image")

# -- Exact strings that define the input. Data, kept verbatim. ---------------------------------------
#: LLaVA `llava/eval/model_vqa_mmbench.py` (`--single-pred-prompt`), per `--lang`.
LLAVA_INSTRUCTION = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}
#: VLMEvalKit `ImageMCQDataset.build_prompt`'s closing line (trailing space and newline included).
VLMEVALKIT_INSTRUCTION = "Please select the correct answer from the options above. \n"


def build_prompt(question: str, hint: str | None, options: dict[str, str], style: str, lang: str) -> str:
    if style == "llava":
        text = f"{hint}\n{question}" if hint is not None else question
        for letter, option in options.items():
            text += f"\n{letter}. {option}"
        return text + "\n" + LLAVA_INSTRUCTION[lang]
    text = f"Hint: {hint}\n" if hint is not None else ""
    text += f"Question: {question}\n" + "Options:\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in options.items())
    return text + VLMEVALKIT_INSTRUCTION


def read_hub(snap: hfdata.HubSnapshot, pattern: str) -> list[Row]:
    rows: list[Row] = []
    for path in hfdata.parquet_files(snap, pattern, hint=" (or pass path= to a release TSV)"):
        table = hfdata.read_parquet(path)
        table.require("index", "question", "A", "B", "image")
        columns = [c for c in table.columns if c != "image" and (c in HF_COLUMNS or c.lower() == "l2-category")]
        for i, values in table.rows(columns):
            image = table.image(i)
            rows.append(row_from(values, image, image.ref, table.where(i)))
    return rows


@task("mmbench")
class MMBench(Task):
    """MMBench (dev/test, en/cn): CircularEval accuracy overall and per L1/L2/leaf ability."""

    #: True only with extractor=judge (set per instance): then the judge stage supplies letters.
    needs_judge = False

    @dataclass
    class Params:
        split: Literal["dev", "test"] = "dev"
        lang: Literal["en", "cn"] = "en"
        path: str | None = None
        revision: str | None = None
        circular: bool = True
        prompt: Literal["llava", "vlmevalkit"] = "llava"
        extract: Literal["lmms-eval", "vlmevalkit"] = "lmms-eval"
        extractor: Literal["rule", "judge"] = "rule"

    #: CircularEval accuracy (headline) and its breakdowns; single-pass accuracy for comparison.
    meanings = {
        "acc": rate("utility", "higher"),
        "acc/*": rate("utility", "higher", headline=False),
        "acc_vanilla": rate("utility", "higher", headline=False),
        "failed_extractions": COUNT,
        "llm_extractions": COUNT,
    }

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if params.path and params.revision:
            raise DataError("mmbench: revision= pins the hub download; a path= copy is read as it is")
        self.needs_judge = params.extractor == "judge"  # type: ignore[misc]
        self._snapshot: hfdata.HubSnapshot | None = None
        self._file: Path | None = None

    @property
    def revision(self) -> str:
        return self.params.revision or HF_REVISION

    @property
    def pattern(self) -> str:
        return f"{self.params.lang}/{self.params.split}-*.parquet"

    def rows(self) -> list[Row]:
        p = self.params
        if not p.path:
            self._snapshot = hfdata.snapshot(HF_REPO, self.revision, [self.pattern], None)
            return read_hub(self._snapshot, self.pattern)
        root = Path(p.path).expanduser()
        if root.is_file():
            self._file = root
            return read_tsv(root)
        if not root.is_dir():
            raise DataError(f"mmbench: path {root} is neither a TSV file nor a folder")
        tsv = root / f"MMBench_{p.split.upper()}_{p.lang.upper()}.tsv"
        if tsv.is_file():
            self._file = tsv
            return read_tsv(tsv)
        if not list(root.glob(self.pattern)):
            raise DataError(f"mmbench: {root} holds neither {tsv.name} nor {self.pattern} (a copy of {HF_REPO})")
        self._snapshot = hfdata.snapshot(HF_REPO, self.revision, [self.pattern], str(root))
        return read_hub(self._snapshot, self.pattern)

    def sample(self, item: Pass) -> Sample:
        p, row = self.params, item.row
        options = item.option_map()
        l1 = l1_of(row.l2)
        return Sample(
            id=f"mmbench/{p.lang}/{p.split}/{item.g_index}/{item.k}",
            text=build_prompt(row.question, row.hint, options, p.prompt, p.lang),
            image=row.image, image_ref=row.image_ref, category=row.l2 or None,
            meta={"g_index": item.g_index, "pass": item.k, "index": row.index, "answer": item.answer,
                  "category": row.category, "l2": row.l2, "l1": l1, "question": row.question,
                  "mmbench": {"question": row.question, "options": options, "rules": p.extract}},
        )

    def samples(self) -> Iterator[Sample]:
        for item in passes(self.rows(), self.params.circular):
            yield self.sample(item)

    # -- scoring --------------------------------------------------------------------------------

    def metrics(self, samples: list[Sample], generations: dict[str, Generation],
                verdicts: dict[str, Verdict] | None) -> dict[str, MetricValue]:
        out = score(samples, generations, verdicts if self.needs_judge else None)
        if "acc" not in out and samples:
            log.warning("mmbench %s: no answers in the data (the test split withholds them): no accuracy; "
                        "submit the generations to the MMBench evaluation server", self.params.split)
        return out

    def per_sample(self, samples: list[Sample], generations: dict[str, Generation],
                   verdicts: dict[str, Verdict] | None) -> dict[str, dict[str, float]]:
        """`acc` per question (CircularEval, 1 = every pass right), keyed by the question's first pass."""
        hits, first, _ = question_hits(samples, generations, verdicts if self.needs_judge else None)
        return {"acc": {first[g].id: hit for g, hit in hits.items()}}

    def identity(self) -> dict[str, Any]:
        p = self.params
        out: dict[str, Any] = {"spec": self.spec, "task": "mmbench", "split": p.split, "lang": p.lang,
                               "circular": p.circular, "prompt": p.prompt, "extract": p.extract,
                               "extractor": p.extractor}
        if self._file is not None:
            out["file"] = str(self._file.resolve())
        elif self._snapshot is not None:
            out["hf"] = self._snapshot.identity()
        else:
            out["hf"] = {"repo_id": HF_REPO, "revision": self.revision, "root": p.path}
        return out
