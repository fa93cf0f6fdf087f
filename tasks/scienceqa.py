"""ScienceQA: multiple-choice science questions, many with a picture; accuracy (utility).

Lu et al., NeurIPS 2022. `config=IMG` keeps the questions that have an image (LLaVA's "SQA-IMG",
2,017 in test); `config=FULL` keeps all of them (4,241 in test), the others running text-only.

Data: the Hugging Face copy `lmms-lab/ScienceQA` pinned to HF_REVISION (`source=hf`, the default;
configs ScienceQA-IMG / ScienceQA-FULL), or the original release (`source=dir,data_dir=<folder with
problems.json>`, with pid_splits.json and images/<split>/<pid>/image.png beside it, or
<split>/<pid>/image.png as LLaVA lays them out). Sample ids: `scienceqa/<pid>` from the release;
the hub copy has no problem ids, so there `scienceqa/<config>/<split>/<row>`.

Prompt (LLaVA-1.5 and lmms-eval): "Context: <hint>" line only when the hint is non-empty, the
question, the options "A. ...", one per line, then INSTRUCTION. Answers are read with LLaVA's
`eval_science_qa.py` rules (tasks/scienceqa_extract.py); a reply they cannot read counts wrong and
is counted in `failed_extractions`. Generation errors count wrong too (the runner counts them).

Metrics (fractions, 0-1; papers print percentages): `acc`; by subject `acc/subject/NAT|SOC|LAN`;
by context `acc/context/TXT|IMG|NO` (has a non-empty hint / has an image / has neither: they overlap,
as in ScienceQA's own scorer); by grade `acc/grade/G1-6|G7-12`; and with config=FULL also
`acc_img`, the accuracy on questions with an image, LLaVA's "IMG-Accuracy".
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from harness.errors import DataError
from harness.registry import task
from harness.schema import Generation, MetricValue, Sample, Verdict
from harness.stats import bootstrap_mean
from harness.contracts.meaning import COUNT, rate
from harness.contracts.task import Task
from tasks import hfdata
from tasks.scienceqa_extract import OPTIONS, extract_letter, predicted_index

#: The fixed last line of every prompt. Data, kept verbatim: lmms-eval
#: `lmms_eval/tasks/scienceqa/scienceqa_img.yaml` (default `post_prompt`, after a newline) and
#: LLaVA's `llava/eval/model_vqa_science.py` (`--single-pred-prompt`).
INSTRUCTION = "Answer with the option's letter from the given choices directly."

HF_REPO = "lmms-lab/ScienceQA"
#: The head of lmms-lab/ScienceQA's main branch when this adapter was written ("Update README.md").
HF_REVISION = "69dd4d6b67373d38f96a5badd5d24d0eb5bcdc50"
RELEASE_SPLIT = {"test": "test", "validation": "val"}  # our split name -> pid_splits.json key
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
GRADES = {f"grade{i}": ("G1-6" if i <= 6 else "G7-12") for i in range(1, 13)}


def build_prompt(hint: str, question: str, choices: list[str]) -> str:
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(OPTIONS, choices))
    return f"{context}{question}\n{options}\n{INSTRUCTION}"


@dataclass(frozen=True)
class Problem:
    sample_id: str
    question: str
    choices: list[str]
    answer: int
    hint: str
    subject: str
    grade: str
    image: Any  # None (text-only), a path string, or a lazy hub image
    image_ref: str | None
    extra: dict[str, Any]


def validate(record: Any, where: str) -> tuple[str, list[str], int, str, str, str]:
    """(question, choices, answer, hint, subject, grade) of one problem, or DataError naming it."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    for name in ("question", "choices", "answer", "subject", "grade"):
        if record.get(name) is None:
            raise DataError(f"{where}: missing {name!r}")
    choices = record["choices"]
    if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(OPTIONS):
        raise DataError(f"{where}: choices must be a list of 2 to {len(OPTIONS)} options, got {choices!r}")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: answer {answer!r} is not an index into {len(choices)} choices")
    hint = record.get("hint") or ""
    if record["subject"] not in SUBJECTS:
        raise DataError(f"{where}: subject {record['subject']!r} is not one of {', '.join(SUBJECTS)}")
    if record["grade"] not in GRADES:
        raise DataError(f"{where}: grade {record['grade']!r} is not grade1..grade12")
    return str(record["question"]), [str(c) for c in choices], answer, str(hint), record["subject"], record["grade"]


def _extra(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("task", "topic", "category", "skill") if record.get(k) is not None}


# -- the original release -------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"ScienceQA file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def read_release(root: Path, config: str, split: str) -> list[Problem]:
    problems_path = root / "problems.json"
    problems = _load_json(problems_path)
    if not isinstance(problems, dict):
        raise DataError(f"{problems_path}: expected an object keyed by problem id")
    key = RELEASE_SPLIT[split]
    splits_path = root / "pid_splits.json"
    if splits_path.is_file():
        splits = _load_json(splits_path)
        if not isinstance(splits, dict) or not isinstance(splits.get(key), list):
            raise DataError(f"{splits_path}: no list under {key!r}")
        pids = [str(p) for p in splits[key]]
    else:  # the split is also recorded in every problem
        pids = [pid for pid, rec in problems.items() if isinstance(rec, dict) and rec.get("split") == key]
    if not pids:
        raise DataError(f"{problems_path}: no problems in split {key!r}")
    out: list[Problem] = []
    for pid in pids:
        if pid not in problems:
            raise DataError(f"{splits_path}: problem {pid!r} ({key}) is not in {problems_path}")
        record = problems[pid]
        question, choices, answer, hint, subject, grade = validate(record, f"{problems_path}: problem {pid!r}")
        image_name = record.get("image")
        if config == "IMG" and not image_name:
            continue
        image = None
        if image_name:
            candidates = [root / "images" / key / pid / image_name, root / key / pid / image_name]
            image = str(next((c for c in candidates if c.is_file()), candidates[0]))
        out.append(Problem(f"scienceqa/{pid}", question, choices, answer, hint, subject, grade, image, None,
                           {"pid": pid, **_extra(record)}))
    return out


# -- the Hugging Face copy ------------------------------------------------------------------------


def read_hub(snap: hfdata.HubSnapshot, config: str, split: str) -> list[Problem]:
    pattern = f"ScienceQA-{config}/{split}-*.parquet"
    out: list[Problem] = []
    offset = 0
    for path in hfdata.parquet_files(snap, pattern, hint=" (for the original release pass source=dir)"):
        table = hfdata.read_parquet(path)
        table.require("question", "choices", "answer", "hint", "subject", "grade", "image")
        present = table.image_present("image")
        columns = [c for c in table.columns if c != "image"]
        for row, record in table.rows(columns):
            question, choices, answer, hint, subject, grade = validate(record, table.where(row))
            image = table.image(row) if present[row] else None
            out.append(Problem(f"scienceqa/{config}/{split}/{offset + row}", question, choices, answer, hint,
                               subject, grade, image, image.ref if image else None,
                               {"row": offset + row, **_extra(record)}))
        offset += len(table)
    return out


# -- the task -------------------------------------------------------------------------------------


@task("scienceqa")
class ScienceQA(Task):
    """ScienceQA multiple choice (IMG or FULL); accuracy by subject, context and grade."""

    needs_judge = False

    @dataclass
    class Params:
        source: Literal["hf", "dir"] = "hf"
        data_dir: str | None = None
        revision: str | None = None
        config: Literal["IMG", "FULL"] = "IMG"
        split: Literal["test", "validation"] = "test"

    #: Accuracies are utility fractions (by subject, context, grade: detail); `acc_img` is LLaVA's
    #: IMG-Accuracy headline; replies the extractor cannot read are a count.
    meanings = {
        "acc": rate("utility", "higher"),
        "acc/*": rate("utility", "higher", headline=False),
        "acc_img": rate("utility", "higher", image=True),
        "failed_extractions": COUNT,
    }

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        hfdata.check_source("scienceqa", params.source, params.data_dir, params.revision, "folder holding problems.json")
        self._snapshot: hfdata.HubSnapshot | None = None

    @property
    def revision(self) -> str:
        return self.params.revision or HF_REVISION

    def problems(self) -> list[Problem]:
        p = self.params
        if p.source == "dir":
            return read_release(Path(p.data_dir or "").expanduser(), p.config, p.split)
        self._snapshot = hfdata.snapshot(HF_REPO, self.revision, [f"ScienceQA-{p.config}/{p.split}-*"], p.data_dir)
        return read_hub(self._snapshot, p.config, p.split)

    def samples(self) -> Iterator[Sample]:
        for prob in self.problems():
            yield Sample(
                id=prob.sample_id,
                text=build_prompt(prob.hint, prob.question, prob.choices),
                image=prob.image,
                image_ref=prob.image_ref,
                category=prob.subject,
                meta={
                    "answer": prob.answer,
                    "answer_letter": OPTIONS[prob.answer],
                    "n_choices": len(prob.choices),
                    "subject": SUBJECTS[prob.subject],
                    "grade": prob.grade,
                    "has_text": bool(prob.hint),
                    "has_image": prob.image is not None,
                    "config": self.params.config,
                    **prob.extra,
                },
            )

    def metrics(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, MetricValue]:
        return score(samples, generations, with_img_accuracy=self.params.config == "FULL")

    def per_sample(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, dict[str, float]]:
        """`acc` per problem (right = 1), the outcome `realign compare` pairs on."""
        return {"acc": correctness(samples, generations)}

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "task": "scienceqa", "source": self.params.source,
                               "config": self.params.config, "split": self.params.split}
        if self.params.source == "hf":
            out["hf"] = (self._snapshot.identity() if self._snapshot else
                         {"repo_id": HF_REPO, "revision": self.revision, "root": self.params.data_dir})
        else:
            out["data_dir"] = str(Path(self.params.data_dir or "").expanduser().resolve())
        return out


def _mark(sample: Sample, gen: Generation | None) -> tuple[float, bool | None]:
    """(1.0 if right else 0.0, whether a letter was extracted); None when there is no reply to read."""
    if gen is None or gen.error:
        return 0.0, None
    letter = extract_letter(gen.output)
    return float(predicted_index(letter, sample.meta["n_choices"]) == sample.meta["answer"]), letter is not None


def correctness(samples: list[Sample], generations: dict[str, Generation]) -> dict[str, float]:
    """Per-problem correctness (1/0) under the same rules as `score`, for paired comparisons."""
    return {s.id: _mark(s, generations.get(s.id))[0] for s in samples}


def score(samples: list[Sample], generations: dict[str, Generation], with_img_accuracy: bool = False) -> dict[str, MetricValue]:
    marks: list[float] = []
    groups: dict[str, list[float]] = defaultdict(list)
    img_only: list[float] = []
    failed = 0
    for s in samples:
        right, extracted = _mark(s, generations.get(s.id))
        failed += extracted is False
        marks.append(right)
        groups[f"subject/{s.meta['subject']}"].append(right)
        groups[f"grade/{GRADES[s.meta['grade']]}"].append(right)
        if s.meta["has_text"]:
            groups["context/TXT"].append(right)
        if s.meta["has_image"]:
            groups["context/IMG"].append(right)
            img_only.append(right)
        if not s.meta["has_text"] and not s.meta["has_image"]:
            groups["context/NO"].append(right)
    out = {"acc": bootstrap_mean(marks)}
    order = ["subject/NAT", "subject/SOC", "subject/LAN", "context/TXT", "context/IMG", "context/NO",
             "grade/G1-6", "grade/G7-12"]
    for key in order:
        if key in groups:
            out[f"acc/{key}"] = bootstrap_mean(groups[key])
    if with_img_accuracy:
        out["acc_img"] = bootstrap_mean(img_only)
    out["failed_extractions"] = MetricValue(value=float(failed), n=len(samples))
    return out
