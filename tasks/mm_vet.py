"""MM-Vet: 218 open-ended questions over six capabilities, graded 0-1 by an LLM (utility).

Yu et al., "MM-Vet: Evaluating Large Multimodal Models for Integrated Capabilities", ICML 2024.
Each question needs one or more of recognition (rec), OCR (ocr), knowledge (know), language
generation (gen), spatial awareness (spat) and math (math). There is no answer key a rule could
apply: an LLM grader scores each answer against the ground truth, so this task needs the judge
`mmvet_grader` (judges/mmvet_grader.py, any OpenAI-compatible endpoint):

    realign run --task mm_vet --judge mmvet_grader:model=gpt-4-0613 ...

Data, one of:
- the Hugging Face copy `lmms-lab/MMVet` (what lmms-eval reads) pinned to HF_REVISION, file
  `data/test-*.parquet` (columns question_id, question, answer, capability as "rec,ocr", image;
  taken from lmms-eval's use of it, not read here);
- `path=` the official release unpacked (`mm-vet.json` keyed by question id, with imagename,
  capability list, question and answer; pictures in `images/`), or its parent folder, or a local
  copy of the hub repository.
The question is sent as released (MM-Vet's own inference scripts add nothing). Sample ids:
`mm_vet/<question id>` (v1_0 ... v1_217).

Scores, as MM-Vet's evaluator computes them (fractions 0-1; the paper prints x100): `score` is the
mean over graded questions; `score/<cap>` is the mean over the questions that need that capability
(a question counts in each of its capabilities). A failed generation scores 0. Verdicts that carry
no grader score are left out and counted: `judge_errors` (the grader failed; asked again on the next
run) and `ungraded` (a verdict from another judge, e.g. the default `keywords`: pass
`--judge mmvet_grader:...`). `grader_fallbacks` counts answers the grader could not score in five
tries, scored 0 as the official evaluator does.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness.contracts.meaning import COUNT, rate
from harness.contracts.task import Task
from harness.errors import DataError
from harness.registry import task
from harness.schema import Generation, MetricValue, Sample, Verdict
from harness.stats import bootstrap_mean
from tasks import hfdata

log = logging.getLogger(__name__)

CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
HF_REPO = "lmms-lab/MMVet"
#: The head of lmms-lab/MMVet's main branch when this adapter was written ("Update README.md", b310d12);
#: its data file last changed at 6f71fda ("Upload dataset").
HF_REVISION = "b310d12d0d9e765db953da28a7ef7ff43620dc83"
HF_PATTERN = "data/test-*.parquet"
RELEASE_FILE = "mm-vet.json"
#: Names the grader in verdict details (judges/mmvet_grader.py writes it).
GRADER = "mm_vet"


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    answer: str
    capabilities: tuple[str, ...]
    image: Any
    image_ref: str | None


def capabilities_of(value: Any, where: str) -> tuple[str, ...]:
    """A capability list (release) or comma-separated string (hub), checked against the six."""
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    caps = tuple(dict.fromkeys(str(c).strip() for c in items if str(c).strip()))
    unknown = [c for c in caps if c not in CAPABILITIES]
    if not caps or unknown:
        raise DataError(f"{where}: capability {value!r} must name some of {', '.join(CAPABILITIES)}")
    return caps


def _text(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing {name!r}")
    return value


def find_release(root: Path) -> Path | None:
    for folder in (root, root / "mm-vet"):
        if (folder / RELEASE_FILE).is_file():
            return folder
    return None


def read_release(folder: Path) -> list[Question]:
    path = folder / RELEASE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected an object keyed by question id")
    out = []
    for qid, record in data.items():
        where = f"{path}: question {qid!r}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object")
        image = folder / "images" / _text(record, "imagename", where)
        out.append(Question(str(qid), _text(record, "question", where), _text(record, "answer", where),
                            capabilities_of(record.get("capability"), where), str(image), None))
    return out


def read_hub(snap: hfdata.HubSnapshot) -> list[Question]:
    out = []
    for path in hfdata.parquet_files(snap, HF_PATTERN, hint=" (or pass path= to the unpacked release)"):
        table = hfdata.read_parquet(path)
        table.require("question_id", "question", "answer", "capability", "image")
        for row, values in table.rows(["question_id", "question", "answer", "capability"]):
            where = table.where(row)
            img = table.image(row)
            out.append(Question(str(values["question_id"]), _text(values, "question", where),
                                _text(values, "answer", where), capabilities_of(values["capability"], where), img, img.ref))
    return out


def graded_scores(samples: list[Sample], generations: dict[str, Generation],
                  verdicts: dict[str, Verdict] | None) -> tuple[dict[str, float], dict[str, int]]:
    """Score per sample (graded ones, and 0 for failed generations) and the counts of the rest."""
    scores: dict[str, float] = {}
    counts = {"judge_errors": 0, "ungraded": 0, "grader_fallbacks": 0}
    for s in samples:
        gen = generations.get(s.id)
        if gen is None or gen.error:
            scores[s.id] = 0.0
            continue
        verdict = (verdicts or {}).get(s.id)
        if verdict is None or verdict.label == "error":
            counts["judge_errors"] += 1
        elif verdict.detail.get("grader") != GRADER or not isinstance(verdict.detail.get("score"), (int, float)):
            counts["ungraded"] += 1
        else:
            scores[s.id] = float(verdict.detail["score"])
            counts["grader_fallbacks"] += int(verdict.detail.get("fallback_runs") or 0) > 0
    return scores, counts


@task("mm_vet")
class MMVet(Task):
    """MM-Vet (218 questions): LLM-graded 0-1 scores, total and per capability; needs --judge mmvet_grader."""

    needs_judge = True

    @dataclass
    class Params:
        path: str | None = None
        revision: str | None = None

    meanings = {
        "score": rate("utility", "higher"),
        "score/*": rate("utility", "higher", headline=False),
        "ungraded": COUNT,
        "grader_fallbacks": COUNT,
    }

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if params.path and params.revision:
            raise DataError("mm_vet: revision= pins the hub download; a path= copy is read as it is")
        self._snapshot: hfdata.HubSnapshot | None = None
        self._release: Path | None = None

    @property
    def revision(self) -> str:
        return self.params.revision or HF_REVISION

    def questions(self) -> list[Question]:
        if not self.params.path:
            self._snapshot = hfdata.snapshot(HF_REPO, self.revision, [HF_PATTERN], None)
            return read_hub(self._snapshot)
        root = Path(self.params.path).expanduser()
        if not root.is_dir():
            raise DataError(f"mm_vet: path {root} is not a folder")
        release = find_release(root)
        if release is not None:
            self._release = release
            return read_release(release)
        if not list(root.glob(HF_PATTERN)):
            raise DataError(f"mm_vet: {root} holds neither {RELEASE_FILE} (the release, or mm-vet/{RELEASE_FILE}) "
                            f"nor {HF_PATTERN} (a copy of {HF_REPO})")
        self._snapshot = hfdata.snapshot(HF_REPO, self.revision, [HF_PATTERN], str(root))
        return read_hub(self._snapshot)

    def samples(self) -> Iterator[Sample]:
        for q in self.questions():
            yield Sample(id=f"mm_vet/{q.qid}", text=q.question, image=q.image, image_ref=q.image_ref,
                         category="+".join(q.capabilities),
                         meta={"capabilities": list(q.capabilities),
                               "mmvet": {"question": q.question, "answer": q.answer}})

    def metrics(self, samples: list[Sample], generations: dict[str, Generation],
                verdicts: dict[str, Verdict] | None) -> dict[str, MetricValue]:
        scores, counts = graded_scores(samples, generations, verdicts)
        out: dict[str, MetricValue] = {}
        if scores:
            out["score"] = bootstrap_mean(scores.values())
            by_cap: dict[str, list[float]] = defaultdict(list)
            for s in samples:
                if s.id in scores:
                    for cap in s.meta["capabilities"]:
                        by_cap[cap].append(scores[s.id])
            for cap in CAPABILITIES:
                if by_cap[cap]:
                    out[f"score/{cap}"] = bootstrap_mean(by_cap[cap])
        elif counts["ungraded"]:
            log.warning("mm_vet: no verdict carries an MM-Vet grade; run with --judge mmvet_grader:model=...")
        out.update({name: MetricValue(float(v), n=len(samples)) for name, v in counts.items()})
        return out

    def per_sample(self, samples: list[Sample], generations: dict[str, Generation],
                   verdicts: dict[str, Verdict] | None) -> dict[str, dict[str, float]]:
        """`score` per question (0-1; its mean is the total), the outcome `realign compare` pairs on."""
        return {"score": graded_scores(samples, generations, verdicts)[0]}

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "task": "mm_vet"}
        if self._release is not None:
            out["release"] = str(self._release.resolve())
        elif self._snapshot is not None:
            out["hf"] = self._snapshot.identity()
        else:
            out["hf"] = {"repo_id": HF_REPO, "revision": self.revision, "root": self.params.path}
        return out
