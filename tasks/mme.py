"""MME: yes/no questions on 14 perception and cognition subtasks, scored by acc + acc+ (utility).

Fu et al., arXiv 2306.13394. Every image carries exactly two questions, one answered Yes and one No;
a subtask's score is 100·acc + 100·acc+ (acc over questions, acc+ over images with both questions
right), at most 200; perception sums its 10 subtasks (max 2000), cognition its 4 (max 800).

Data: the Hugging Face copy `lmms-lab/MME` pinned to HF_REVISION (`source=hf`, the default), or the
original release unpacked (`source=dir,data_dir=...`: the folder holding the subtask folders, or its
parent). Sample ids are `mme/<subtask>/<image file>/<k>` (k = 1, 2 in file order), the same from
both sources when the image names agree.

Choices where the sources differ (each a parameter; the default follows MME's own release):
- prompt: `official` sends the question as released, ending " Please answer yes or no."; `lmms-eval`
  removes that sentence and appends lmms-eval's single-word instruction (LLaVA-1.5's MME prompt).
- parse: `official` (MME's eval_tool) by default; `lmms-eval` and `vlmevalkit` reproduce those
  harnesses' rules (tasks/mme_parse.py shows how they differ on tricky replies).
- Unparseable replies and generation errors are scored wrong, as in the official tool; both are
  counted (`unparseable` here, generation errors by the runner).
- acc, acc+ are fractions (0-1); scores and totals are points. Totals sum the subtasks that ran, so
  they reach 2000 / 800 only with all subtasks. Intervals resample images (the unit acc+ is
  defined on), within each subtask for the totals. A run cut by --limit may end inside an image's
  pair; that image's acc+ then rests on the one question present.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from harness.errors import DataError
from harness.registry import task
from harness.schema import Generation, MetricValue, Sample, Verdict
from harness.stats import N_BOOT, SEED, bootstrap_mean
from harness.contracts.meaning import COUNT, MetricMeaning, points, rate
from harness.contracts.task import Task
from tasks import hfdata
from tasks.mme_parse import PARSERS

log = logging.getLogger(__name__)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
GROUPS = {"perception": PERCEPTION, "cognition": COGNITION}
#: Points of one subtask's score: 100 acc + 100 acc+.
SUBTASK_POINTS = 200.0
#: Release subtasks that keep pictures in images/ and question files in questions_answers_YN/.
SPLIT_FOLDERS = frozenset({"artwork", "celebrity", "landmark", "posters", "scene"})
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")

# -- Exact strings that define the input. Data, kept verbatim. ---------------------------------------
#: Ends every MME question (release txt files and lmms-lab/MME alike).
OFFICIAL_SUFFIX = " Please answer yes or no."
#: lmms-eval `lmms_eval/tasks/mme/mme.yaml`, default `post_prompt`; its utils.py strips the question,
#: deletes OFFICIAL_SUFFIX and appends this (the form LLaVA-1.5 evaluated MME with).
LMMS_EVAL_SUFFIX = "\nAnswer the question using a single word or phrase."

HF_REPO = "lmms-lab/MME"
#: The head of lmms-lab/MME's main branch when this adapter was written ("Upload README.md").
HF_REVISION = "d6c9023f017b564f7b3ccccf5348166bce8fdbcd"
HF_PATTERN = "data/test-*.parquet"


def build_prompt(question: str, style: str) -> str:
    if style == "official":
        return question
    return question.strip().replace(OFFICIAL_SUFFIX, "") + LMMS_EVAL_SUFFIX


def select_subtasks(wanted: list[str]) -> list[str]:
    """Subtask names (any case) or the groups `perception` / `cognition`; all 14 when empty."""
    if not wanted:
        return list(SUBTASKS)
    by_name = {s.lower(): s for s in SUBTASKS}
    groups = {"perception": PERCEPTION, "cognition": COGNITION}
    chosen: set[str] = set()
    unknown = []
    for item in wanted:
        key = item.strip().lower()
        if key in groups:
            chosen.update(groups[key])
        elif key in by_name:
            chosen.add(by_name[key])
        else:
            unknown.append(item)
    if unknown:
        raise DataError(f"unknown MME subtasks {unknown}; valid: perception, cognition, {', '.join(SUBTASKS)}")
    return [s for s in SUBTASKS if s in chosen]


@dataclass(frozen=True)
class Question:
    subtask: str
    image_name: str
    k: int  # 1 or 2: position among the image's two questions
    question: str
    answer: str  # "yes" | "no"
    image: Any  # path string or a lazy hub image
    image_ref: str | None

    @property
    def sample_id(self) -> str:
        return f"mme/{self.subtask}/{self.image_name}/{self.k}"


def _answer(value: Any, where: str) -> str:
    text = str(value).strip().lower() if value is not None else ""
    if text not in ("yes", "no"):
        raise DataError(f"{where}: answer {value!r} is not Yes or No")
    return text


# -- the original release -------------------------------------------------------------------------


def find_release_root(data_dir: Path) -> Path:
    """The folder holding the subtask folders: data_dir itself or one of its children."""
    if not data_dir.is_dir():
        raise DataError(f"MME data_dir {data_dir} is not a folder")

    def holds_subtasks(p: Path) -> bool:
        return any((p / s).is_dir() for s in SUBTASKS)

    if holds_subtasks(data_dir):
        return data_dir
    children = sorted(c for c in data_dir.iterdir() if c.is_dir() and holds_subtasks(c))
    if len(children) == 1:
        return children[0]
    found = f"; candidates: {', '.join(str(c) for c in children)}" if children else ""
    raise DataError(f"no MME subtask folders ({', '.join(SUBTASKS[:3])}, ...) in {data_dir} or one child of it{found}")


def _release_image(folder: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return folder / (stem + ".jpg")  # missing: the runner records that sample's image as an error


def read_release_subtask(root: Path, subtask: str) -> list[Question]:
    base = root / subtask
    if not base.is_dir():
        raise DataError(f"MME subtask folder not found: {base}")
    if subtask in SPLIT_FOLDERS:
        text_dir, image_dir = base / "questions_answers_YN", base / "images"
    else:
        text_dir, image_dir = base, base
    if not text_dir.is_dir():
        raise DataError(f"MME question folder not found: {text_dir}")
    files = sorted(text_dir.glob("*.txt"))
    if not files:
        raise DataError(f"no question files (*.txt) in {text_dir}")
    out: list[Question] = []
    for txt in files:
        try:
            lines = [ln for ln in txt.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        except UnicodeDecodeError as exc:
            raise DataError(f"{txt}: not UTF-8 text ({exc})") from None
        if len(lines) != 2:
            raise DataError(f"{txt}: {len(lines)} question lines; MME has exactly 2 per image")
        image = _release_image(image_dir, txt.stem)
        for k, line in enumerate(lines, start=1):
            where = f"{txt}:{k}"
            question, tab, answer = line.rpartition("\t")
            if not tab or not question.strip():
                raise DataError(f"{where}: expected 'question<TAB>Yes|No', got {line!r}")
            out.append(Question(subtask, image.name, k, question, _answer(answer, where), str(image), None))
    return out


# -- the Hugging Face copy ------------------------------------------------------------------------


def read_hub(snap: hfdata.HubSnapshot, subtasks: list[str]) -> list[Question]:
    wanted = set(subtasks)
    out: list[Question] = []
    seen: dict[tuple[str, str], int] = defaultdict(int)
    first: dict[tuple[str, str], str] = {}
    for path in hfdata.parquet_files(snap, HF_PATTERN, hint=" (for the original release pass source=dir)"):
        table = hfdata.read_parquet(path)
        table.require("question_id", "image", "question", "answer", "category")
        for row, values in table.rows(["question_id", "question", "answer", "category"]):
            where = table.where(row)
            category = str(values["category"])
            if category not in SUBTASKS:
                raise DataError(f"{where}: unknown category {category!r}; MME has {', '.join(SUBTASKS)}")
            if category not in wanted:
                continue
            image_name = Path(str(values["question_id"])).name
            key = (category, image_name)
            seen[key] += 1
            first.setdefault(key, where)
            if seen[key] > 2:
                raise DataError(f"{where}: a third question for image {values['question_id']!r}; MME has 2 per image")
            img = table.image(row)
            out.append(Question(category, image_name, seen[key], str(values["question"]),
                                _answer(values["answer"], where), img, img.ref))
    lone = [(k, w) for k, w in first.items() if seen[k] != 2]
    if lone:
        (cat, name), where = lone[0]
        raise DataError(f"{where}: image {cat}/{name} has 1 question; MME has 2 per image ({len(lone)} such images)")
    order = {s: i for i, s in enumerate(SUBTASKS)}
    return sorted(out, key=lambda q: order[q.subtask])  # stable: keeps file order within a subtask


# -- the task -------------------------------------------------------------------------------------


@task("mme")
class MME(Task):
    """MME: yes/no perception (10) and cognition (4) subtasks; acc, acc+ and score per subtask."""

    needs_judge = False

    @dataclass
    class Params:
        source: Literal["hf", "dir"] = "hf"
        data_dir: str | None = None
        revision: str | None = None
        subtasks: list[str] = field(default_factory=list)
        prompt: Literal["official", "lmms-eval"] = "official"
        parse: Literal["official", "lmms-eval", "vlmevalkit"] = "official"

    #: acc and acc+ are fractions, subtask scores points out of 200 (all per subtask: detail); the
    #: perception / cognition totals are the headlines, their scale set by `metric_meanings`.
    #: `acc` is the per-question outcome `realign compare` pairs on (per_sample), not a metric.
    meanings = {
        "acc": rate("utility", "higher", image=True),
        "acc/*": rate("utility", "higher", headline=False, image=True),
        "acc_plus/*": rate("utility", "higher", headline=False, image=True),
        "score/*": points("utility", "higher", SUBTASK_POINTS, headline=False, image=True),
        "perception": points("utility", "higher", SUBTASK_POINTS * len(PERCEPTION), image=True),
        "cognition": points("utility", "higher", SUBTASK_POINTS * len(COGNITION), image=True),
        "unparseable": COUNT,
    }

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        hfdata.check_source("mme", params.source, params.data_dir, params.revision, "the unpacked MME release")
        self.subtasks = select_subtasks(list(params.subtasks))
        self._snapshot: hfdata.HubSnapshot | None = None

    @property
    def revision(self) -> str:
        return self.params.revision or HF_REVISION

    def questions(self) -> list[Question]:
        if self.params.source == "dir":
            root = find_release_root(Path(self.params.data_dir or "").expanduser())
            return [q for s in self.subtasks for q in read_release_subtask(root, s)]
        self._snapshot = hfdata.snapshot(HF_REPO, self.revision, [HF_PATTERN], self.params.data_dir)
        return read_hub(self._snapshot, self.subtasks)

    def samples(self) -> Iterator[Sample]:
        for q in self.questions():
            yield Sample(
                id=q.sample_id,
                text=build_prompt(q.question, self.params.prompt),
                image=q.image,
                image_ref=q.image_ref,
                category=q.subtask,
                meta={
                    "subtask": q.subtask,
                    "group": "perception" if q.subtask in PERCEPTION else "cognition",
                    "image": q.image_name,
                    "answer": q.answer,
                    "question": q.question,
                },
            )

    # -- scoring ------------------------------------------------------------------------------

    def metrics(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, MetricValue]:
        return score(samples, generations, self.params.parse)

    def metric_meanings(self, metrics: Mapping[str, MetricValue]) -> dict[str, MetricMeaning]:
        """A total sums the subtasks that ran, so its full scale is 200 points per subtask of its
        group present in the same metrics (2000 / 800 only with all of them): a drop in points then
        reads as percentage points of what that run could score."""
        out = super().metric_meanings(metrics)
        for group, members in GROUPS.items():
            if group in out:
                present = sum(1 for s in members if f"score/{s}" in metrics)
                out[group] = points("utility", "higher", SUBTASK_POINTS * max(present, 1), image=True)
        return out

    def per_sample(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, dict[str, float]]:
        """`acc` per question (right = 1), the outcome `realign compare` pairs on."""
        return {"acc": correctness(samples, generations, self.params.parse)}

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec, "task": "mme", "source": self.params.source, "subtasks": self.subtasks,
            "prompt": self.params.prompt, "parse": self.params.parse,
        }
        if self.params.source == "hf":
            out["hf"] = (self._snapshot.identity() if self._snapshot else
                         {"repo_id": HF_REPO, "revision": self.revision, "root": self.params.data_dir})
        else:
            out["data_dir"] = str(Path(self.params.data_dir or "").expanduser().resolve())
        return out


def _mark(sample: Sample, gen: Generation | None, parser: Any) -> tuple[float, str | None]:
    """(1.0 if right else 0.0, parsed label); a missing generation or an error is wrong (label None)."""
    if gen is None or gen.error:
        return 0.0, None
    label = parser(gen.output)
    return float(label == sample.meta["answer"]), label


def correctness(samples: list[Sample], generations: dict[str, Generation], parse: str = "official") -> dict[str, float]:
    """Per-question correctness (1/0) under the same rules as `score`: the unit a paired comparison
    of two runs pairs on (acc+ and scores are per image, so they do not pair per sample)."""
    parser = PARSERS[parse]
    return {s.id: _mark(s, generations.get(s.id), parser)[0] for s in samples}


def score(samples: list[Sample], generations: dict[str, Generation], parse: str = "official") -> dict[str, MetricValue]:
    """acc, acc_plus, score per subtask; perception and cognition totals; unparseable replies."""
    parser = PARSERS[parse]
    # subtask -> image -> list of 0/1 per question
    marks: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    unparseable = 0
    for s in samples:
        right, label = _mark(s, generations.get(s.id), parser)
        unparseable += label == "other"
        marks[s.meta["subtask"]][s.meta["image"]].append(right)
    out: dict[str, MetricValue] = {}
    per_image_scores: dict[str, np.ndarray] = {}
    for subtask in [s for s in SUBTASKS if s in marks]:
        images = list(marks[subtask].values())
        questions = [m for img in images for m in img]
        both = [float(all(img)) for img in images]
        points = np.array([100.0 * (sum(img) / len(img)) + 100.0 * b for img, b in zip(images, both)])
        per_image_scores[subtask] = points
        out[f"acc/{subtask}"] = bootstrap_mean(questions)
        out[f"acc_plus/{subtask}"] = bootstrap_mean(both)
        out[f"score/{subtask}"] = bootstrap_mean(points)
    for group, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        parts = [per_image_scores[s] for s in members if s in per_image_scores]
        if parts:
            out[group] = stratified_sum(parts)
    out["unparseable"] = MetricValue(value=float(unparseable), n=len(samples))
    return out


def stratified_sum(groups: list[np.ndarray], n_boot: int = N_BOOT, seed: int = SEED, level: float = 0.95) -> MetricValue:
    """Sum of group means, with a percentile interval from resampling within each group."""
    value = float(sum(g.mean() for g in groups))
    n = int(sum(g.size for g in groups))
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for g in groups:
        if g.size > 1:
            boots += g[rng.integers(0, g.size, size=(n_boot, g.size))].mean(axis=1)
        else:
            boots += g.mean()
    alpha = (1.0 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    return MetricValue(value=value, low=float(low), high=float(high), n=n)
