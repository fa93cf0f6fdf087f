"""POPE: object-hallucination yes/no questions on COCO val2014 pictures (utility: hallucination kept low).

Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023. Three
splits of 3,000 questions ("Is there a <object> in the image?") over the same 500 pictures; the
absent objects of the "no" questions are drawn at random, among the most frequent COCO objects
(popular), or among objects that often co-occur with those present (adversarial).

Data, one of:
- the Hugging Face copy `lmms-lab/POPE` (what lmms-eval reads) pinned to HF_REVISION, default
  config `data/test-*.parquet` with a `category` column naming the split (columns question_id,
  question, answer, image, category; taken from lmms-eval's use and a copy's card, not read here);
- `path=` a local copy of that repository (same layout), or the official release: a folder holding
  `coco_pope_<split>.json` (JSON lines: question_id, image, text, label; RUCAIBox/POPE's
  `output/coco/`), with the COCO val2014 pictures in `images=` (default `<path>/val2014`, else
  `<path>` itself). A missing picture makes that one sample an error, not the run.

Sample ids are `pope/<split>/<question_id>`. Prompt: `official` sends the question as released;
`llava` appends LLaVA-1.5's short-answer instruction (lmms-eval's `post_prompt`). Scoring and the
two reading rules: tasks/pope_score.py. Metrics per split (`acc/random`, `f1/adversarial`, ...), the
same pooled over every question of the run (`acc`, `precision`, `recall`, `f1`, `yes_ratio`), and
`f1_avg`, the mean of the splits' F1 (the POPE number LLaVA-1.5 reports). A failed generation is
wrong in accuracy and counts as neither a yes nor a no.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from harness.contracts.meaning import COUNT, MetricMeaning, rate
from harness.contracts.task import Task
from harness.errors import DataError
from harness.registry import task
from harness.schema import Generation, MetricValue, Sample, Verdict
from tasks import hfdata
from tasks.pope_score import NAMES, PARSERS, mean_of, split_metrics

SPLITS = ("random", "popular", "adversarial")
HF_REPO = "lmms-lab/POPE"
#: The head of lmms-lab/POPE's main branch when this adapter was written ("Upload dataset", 4db1276).
HF_REVISION = "4db1276663dfa5eb8ad16a52d24c31a09e470896"
HF_PATTERN = "data/test-*.parquet"
RELEASE_FILE = "coco_pope_{split}.json"
#: Data, kept verbatim: LLaVA-1.5's POPE instruction (lmms-eval `pope.yaml` post_prompt).
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Question:
    split: str
    question_id: str
    question: str
    answer: str  # "yes" | "no"
    image: Any  # path string or a lazy hub image
    image_ref: str | None
    image_name: str


def _answer(value: Any, where: str) -> str:
    text = str(value).strip().lower() if value is not None else ""
    if text not in ("yes", "no"):
        raise DataError(f"{where}: answer {value!r} is not yes or no")
    return text


def _release_dir(root: Path) -> Path | None:
    """The folder holding coco_pope_<split>.json: root, or root/output/coco as in the POPE repository."""
    for folder in (root, root / "output" / "coco"):
        if any((folder / RELEASE_FILE.format(split=s)).is_file() for s in SPLITS):
            return folder
    return None


def read_release(folder: Path, images: Path, split: str) -> list[Question]:
    path = folder / RELEASE_FILE.format(split=split)
    if not path.is_file():
        raise DataError(f"POPE release file not found: {path}")
    out: list[Question] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict) or any(row.get(k) in (None, "") for k in ("question_id", "image", "text")):
            raise DataError(f"{where}: expected question_id, image, text and label")
        qid = str(row["question_id"])
        if qid in seen:
            raise DataError(f"{where}: question_id {qid} repeats")
        seen.add(qid)
        image = images / str(row["image"])
        out.append(Question(split, qid, str(row["text"]), _answer(row.get("label"), where), str(image), None,
                            str(row["image"])))
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def read_hub(snap: hfdata.HubSnapshot, splits: list[str]) -> list[Question]:
    by_split: dict[str, list[Question]] = {s: [] for s in splits}
    for path in hfdata.parquet_files(snap, HF_PATTERN, hint=" (or pass path= to the official release)"):
        table = hfdata.read_parquet(path)
        table.require("question_id", "question", "answer", "image", "category")
        names = [c for c in ("question_id", "question", "answer", "category", "image_source") if c in table.columns]
        for row, values in table.rows(names):
            where = table.where(row)
            split = str(values["category"]).strip().lower()
            if split not in SPLITS:
                raise DataError(f"{where}: category {values['category']!r} is not one of {', '.join(SPLITS)}")
            if split not in by_split:
                continue
            img = table.image(row)
            by_split[split].append(Question(split, str(values["question_id"]), str(values["question"]),
                                            _answer(values["answer"], where), img, img.ref,
                                            str(values.get("image_source") or "")))
    empty = [s for s, qs in by_split.items() if not qs]
    if empty:
        raise DataError(f"{snap.root}: no questions for split(s) {', '.join(empty)} in {HF_PATTERN}")
    return [q for s in splits for q in by_split[s]]


@task("pope")
class POPE(Task):
    """POPE object hallucination (random, popular, adversarial): accuracy, precision, recall, F1, yes-ratio."""

    needs_judge = False

    @dataclass
    class Params:
        split: list[Literal["random", "popular", "adversarial"]] = field(default_factory=lambda: list(SPLITS))
        path: str | None = None
        images: str | None = None
        revision: str | None = None
        prompt: Literal["official", "llava"] = "official"
        parse: Literal["official", "lmms-eval"] = "official"

    #: Utility, higher better, except yes_ratio: near 0.5 is unbiased, so it is shown, never ranked.
    meanings = {
        "acc": rate("utility", "higher"),
        "f1": rate("utility", "higher"),
        "f1_avg": rate("utility", "higher"),
        "precision": rate("utility", "higher", headline=False),
        "recall": rate("utility", "higher", headline=False),
        "yes_ratio": MetricMeaning("diagnostic", None, "rate", 1.0, headline=False),
        "yes_ratio/*": MetricMeaning("diagnostic", None, "rate", 1.0, headline=False),
        "acc/*": rate("utility", "higher", headline=False),
        "precision/*": rate("utility", "higher", headline=False),
        "recall/*": rate("utility", "higher", headline=False),
        "f1/*": rate("utility", "higher", headline=False),
        "unparseable": COUNT,
    }

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if not params.split:
            raise DataError("pope: split= needs at least one of random, popular, adversarial")
        if params.images and not params.path:
            raise DataError("pope: images= goes with path= (the official release); the hub copy embeds its pictures")
        self.splits = [s for s in SPLITS if s in params.split]
        self._snapshot: hfdata.HubSnapshot | None = None
        self._release: Path | None = None

    @property
    def revision(self) -> str:
        return self.params.revision or HF_REVISION

    def questions(self) -> list[Question]:
        p = self.params
        if p.path:
            root = Path(p.path).expanduser()
            if not root.is_dir():
                raise DataError(f"pope: path {root} is not a folder")
            release = _release_dir(root)
            if release is None and not list(root.glob(HF_PATTERN)):
                raise DataError(f"pope: {root} holds neither {RELEASE_FILE.format(split='<split>')} (the official "
                                f"release) nor {HF_PATTERN} (a copy of {HF_REPO})")
            if release is not None:
                self._release = release
                images = Path(p.images).expanduser() if p.images else (
                    root / "val2014" if (root / "val2014").is_dir() else root)
                return [q for s in self.splits for q in read_release(release, images, s)]
            self._snapshot = hfdata.snapshot(HF_REPO, self.revision, [HF_PATTERN], str(root))
        else:
            self._snapshot = hfdata.snapshot(HF_REPO, self.revision, [HF_PATTERN], None)
        return read_hub(self._snapshot, self.splits)

    def samples(self) -> Iterator[Sample]:
        for q in self.questions():
            text = q.question if self.params.prompt == "official" else q.question.strip() + LLAVA_SUFFIX
            yield Sample(id=f"pope/{q.split}/{q.question_id}", text=text, image=q.image, image_ref=q.image_ref,
                         category=q.split, meta={"split": q.split, "answer": q.answer, "question": q.question,
                                                 "question_id": q.question_id, "image": q.image_name})

    # -- scoring --------------------------------------------------------------------------------

    def _codes(self, samples: list[Sample], generations: dict[str, Generation]) -> list[tuple[str, int, int, bool]]:
        """(split, predicted, gold, unparseable) per question: 1 yes, 0 no, -1 neither (or no reply)."""
        parser = PARSERS[self.params.parse]
        out = []
        for s in samples:
            gen = generations.get(s.id)
            label = "other" if gen is None or gen.error else parser(gen.output)
            code = {"yes": 1, "no": 0}.get(label, -1)
            out.append((s.meta["split"], code, 1 if s.meta["answer"] == "yes" else 0,
                        label == "other" and gen is not None and not gen.error))
        return out

    def metrics(self, samples: list[Sample], generations: dict[str, Generation],
                verdicts: dict[str, Verdict] | None) -> dict[str, MetricValue]:
        codes = self._codes(samples, generations)
        out: dict[str, MetricValue] = {}
        pooled = split_metrics([c[1] for c in codes], [c[2] for c in codes])
        out.update(pooled)
        per_split_f1 = []
        for split in SPLITS:
            part = [c for c in codes if c[0] == split]
            if not part:
                continue
            values = split_metrics([c[1] for c in part], [c[2] for c in part])
            out.update({f"{name}/{split}": values[name] for name in NAMES})
            per_split_f1.append(values["f1"])
        if per_split_f1:
            out["f1_avg"] = mean_of(per_split_f1)
        out["unparseable"] = MetricValue(float(sum(c[3] for c in codes)), n=len(codes))
        return out

    def per_sample(self, samples: list[Sample], generations: dict[str, Generation],
                   verdicts: dict[str, Verdict] | None) -> dict[str, dict[str, float]]:
        """`acc` per question (right = 1), the outcome `realign compare` pairs on."""
        return {"acc": {s.id: float(c[1] == c[2]) for s, c in zip(samples, self._codes(samples, generations))}}

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "task": "pope", "splits": self.splits,
                               "prompt": self.params.prompt, "parse": self.params.parse}
        if self._release is not None:
            out["release"] = str(self._release.resolve())
            out["images"] = str(Path(self.params.images).expanduser().resolve()) if self.params.images else None
        elif self._snapshot is not None:
            out["hf"] = self._snapshot.identity()
        else:
            out["hf"] = {"repo_id": HF_REPO, "revision": self.revision, "root": self.params.path}
        return out
