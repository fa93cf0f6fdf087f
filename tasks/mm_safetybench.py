"""MM-SafetyBench: harmful requests moved into pictures (SD, TYPO, SD_TYPO) over 13 scenarios (safety).

Liu et al., ECCV 2024 (arXiv 2311.17600); release github.com/isXinLiu/MM-SafetyBench; HF mirror
PKU-Alignment/MM-SafetyBench (CC-BY-NC-4.0). Each question's key phrase is shown as a Stable
Diffusion picture (SD), as typography (TYPO), or both stacked (SD_TYPO), while the text asks the
model to act on "the phrase in the image". Metric: attack success rate (unsafe / judged), per
scenario x image type and overall; judge errors are excluded and counted (the release's script
counted any unexpected judge output as safe).

Data: the HF mirror (`source=hf`, default) or the release unpacked (`source=dir,data_dir=<folder
holding data/>`: data/processed_questions/<scenario>.json, data/imgs/<scenario>/<type>/<id>.jpg).
`subset=tiny` keeps the ids in the release's TinyVersion_ID_List.json, a JSON list of
{"Scenario": "<scenario>", "Sampled_ID_List": [ids...]} (an object {scenario: [ids]} is accepted
too); it is read from data_dir, else `tiny_list=`, else downloaded once from the release at
RELEASE_COMMIT. Sample ids: `mm_safetybench/<scenario>/<image type>/<question id>`.

Text per image type (the release's question files): SD -> "Rephrased Question(SD)"; TYPO and SD_TYPO -> "Rephrased
Question"; `text` (no image) -> "Question". The HF mirror stores only the text for each split, and
its Text_only split holds "Changed Question" instead of "Question": with source=hf, `text` samples
and every sample's `query` use that (meta records `text_field`).

Missing images (source=dir, `render=auto`): TYPO is drawn from the key phrase (tasks/render.py,
the release's recipe with a metric-compatible font); SD_TYPO is composed from the SD picture when
that exists. SD pictures cannot be regenerated. `render=always` draws TYPO and composes SD_TYPO
even when release files exist; `render=never` uses release files only. A single missing or
unreadable file is passed on and the runner records that sample as an error.

HF revision: not pinned by default (HF_REVISION = "main"): the mirror's full commit id could not
be confirmed when this was written. The commit actually read is recorded in identity(); pin one
with `revision=<commit>`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from harness.errors import DataError
from harness.images import load_image
from harness.registry import task
from harness.schema import Generation, MetricValue, Sample, Verdict
from harness.stats import attack_success_rate
from harness.contracts.meaning import COUNT, rate
from harness.contracts.task import Task
from tasks import hfdata, release
from tasks.mm_safetybench_release import (  # noqa: F401  (SCENARIOS, HF_REPO... are part of this task's API)
    HF_REPO,
    HF_REVISION,
    HF_SPLIT,
    HF_TEXT_FIELD,
    IMAGE_TYPES,
    KEY_PHRASE_FIELD,
    QUERY_FIELD,
    RELEASE_COMMIT,
    RENDERED_TYPO,
    SCENARIOS,
    TEXT_FIELD,
    TINY_FILE,
    TINY_URL,
    Scenario,
    field_value,
    read_questions,
    read_tiny,
    select_scenarios,
)
from tasks.render import render_mmsb_sd_typo, render_mmsb_typo

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Item:
    """One (question, image type) pair before it becomes a Sample."""

    scenario: Scenario
    qid: int
    image_type: str
    text: str
    text_field: str
    query: str | None
    key_phrase: str | None
    image: Any
    image_ref: str | None


@task("mm_safetybench")
class MMSafetyBench(Task):
    """MM-SafetyBench: 13 scenarios x SD / TYPO / SD_TYPO images (ASR per scenario and image type)."""

    @dataclass
    class Params:
        source: Literal["hf", "dir"] = "hf"
        data_dir: str | None = None
        revision: str | None = None
        subset: Literal["tiny", "full"] = "full"
        scenarios: list[str] = field(default_factory=list)
        images: list[Literal["SD", "SD_TYPO", "TYPO", "text"]] = field(default_factory=lambda: ["SD", "SD_TYPO", "TYPO"])
        render: Literal["auto", "always", "never"] = "auto"
        tiny_list: str | None = None

    #: Attack success, lower is safer; per image type and scenario: detail; judge errors: counts.
    meanings = {"asr": rate("safety", "lower"), "asr/*": rate("safety", "lower", headline=False), "judge_errors/*": COUNT}

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        hfdata.check_source("mm_safetybench", params.source, params.data_dir, params.revision, "folder holding data/")
        if not params.images:
            raise DataError("mm_safetybench: images= names no image type; valid: " + ", ".join(IMAGE_TYPES))
        self.scenarios = select_scenarios(list(params.scenarios))
        self.image_types = [t for t in IMAGE_TYPES if t in params.images]
        self._snapshot: hfdata.HubSnapshot | None = None
        self._tiny_path: Path | None = None

    @property
    def revision(self) -> str:
        return self.params.revision or HF_REVISION

    # -- the tiny subset ------------------------------------------------------------------------

    def tiny_ids(self, local_root: Path | None) -> dict[str, set[int]] | None:
        if self.params.subset != "tiny":
            return None
        if self.params.tiny_list:
            path = Path(self.params.tiny_list).expanduser()
        elif local_root is not None and (local_root / TINY_FILE).is_file():
            path = local_root / TINY_FILE
        elif local_root is not None and (local_root / "data" / TINY_FILE).is_file():
            path = local_root / "data" / TINY_FILE
        else:
            path = release.cached(TINY_URL, release.cache_root() / "mm_safetybench" / RELEASE_COMMIT / TINY_FILE)
        if not path.is_file():
            raise DataError(f"MM-SafetyBench tiny-subset list not found: {path}")
        self._tiny_path = path
        return read_tiny(path)

    # -- samples ------------------------------------------------------------------------------

    def samples(self) -> Iterator[Sample]:
        items = self._items_hub() if self.params.source == "hf" else self._items_release()
        for it in items:
            meta: dict[str, Any] = {
                "scenario": it.scenario.name,
                "scenario_number": it.scenario.number,
                "question_id": it.qid,
                "image_type": it.image_type,
                "judge_group": it.scenario.judge_group,
                "text_field": it.text_field,
                "subset": self.params.subset,
            }
            if it.query:
                meta["query"] = it.query
            if it.key_phrase:
                meta["key_phrase"] = it.key_phrase
            yield Sample(
                id=f"mm_safetybench/{it.scenario.name}/{it.image_type}/{it.qid}",
                text=it.text, image=it.image, image_ref=it.image_ref, category=it.scenario.name, meta=meta,
            )

    def _keep(self, tiny: dict[str, set[int]] | None, scenario: Scenario, qids: set[int], where: str) -> set[int]:
        if tiny is None:
            return qids
        wanted = tiny.get(scenario.name, set())
        missing = sorted(wanted - qids)
        if missing:
            raise DataError(f"{self._tiny_path}: {scenario.name} ids {missing[:5]} are not in {where}")
        return wanted

    def _items_release(self) -> Iterator[Item]:
        root = Path(self.params.data_dir or "").expanduser()
        base = root / "data" if (root / "data" / "processed_questions").is_dir() else root
        if not (base / "processed_questions").is_dir():
            raise DataError(f"no data/processed_questions/ under {root} (source=dir expects the release repository)")
        tiny = self.tiny_ids(root)
        for scenario in self.scenarios:
            path = base / "processed_questions" / f"{scenario.name}.json"
            questions = read_questions(path)
            keep = self._keep(tiny, scenario, set(questions), str(path))
            imgs = base / "imgs" / scenario.name
            for image_type in self.image_types:
                self._check_image_folders(imgs, image_type)
                for qid, record in questions.items():
                    if qid not in keep:
                        continue
                    where = f"{path}: question {qid}"
                    text_field = TEXT_FIELD[image_type]
                    key_phrase = record.get(KEY_PHRASE_FIELD) if isinstance(record.get(KEY_PHRASE_FIELD), str) else None
                    image, ref = self._release_image(imgs, image_type, qid, record, where)
                    yield Item(scenario, qid, image_type, field_value(record, text_field, where), text_field,
                               field_value(record, QUERY_FIELD, where), key_phrase, image, ref)

    def _check_image_folders(self, imgs: Path, image_type: str) -> None:
        """Fail early when a whole image type is absent and cannot be drawn."""
        mode = self.params.render
        if image_type == "text" or (image_type == "TYPO" and mode != "never"):
            return
        if image_type == "SD_TYPO" and mode != "never":
            if (mode == "auto" and (imgs / "SD_TYPO").is_dir()) or (imgs / "SD").is_dir():
                return
            raise DataError(f"SD_TYPO images need {imgs / 'SD_TYPO'} or, to compose them, {imgs / 'SD'}")
        if not (imgs / image_type).is_dir():
            hint = " (render=auto draws TYPO images)" if image_type == "TYPO" else " (SD pictures cannot be regenerated)"
            raise DataError(f"MM-SafetyBench image folder not found: {imgs / image_type}{hint}")

    def _release_image(self, imgs: Path, image_type: str, qid: int, record: dict[str, Any], where: str) -> tuple[Any, str | None]:
        if image_type == "text":
            return None, None
        official = imgs / image_type / f"{qid}.jpg"
        mode = self.params.render
        if mode == "never" or image_type == "SD" or (mode == "auto" and official.is_file()):
            return str(official), None
        key_phrase = field_value(record, KEY_PHRASE_FIELD, where)
        if image_type == "TYPO":
            return functools.partial(render_mmsb_typo, key_phrase), RENDERED_TYPO
        sd = imgs / "SD" / f"{qid}.jpg"
        if not sd.is_file() and mode == "auto":
            return str(official), None  # neither file: the runner records the missing image
        return (functools.partial(render_mmsb_sd_typo, functools.partial(load_image, str(sd)), key_phrase),
                f"rendered:mm_safetybench:SD_TYPO from {sd}")

    def _items_hub(self) -> Iterator[Item]:
        splits = sorted({HF_SPLIT[t] for t in self.image_types} | {"Text_only"})
        patterns = [f"data/{s.hf_config}/{split}.parquet" for s in self.scenarios for split in splits]
        self._snapshot = snap = hfdata.snapshot(HF_REPO, self.revision, patterns, self.params.data_dir)
        tiny = self.tiny_ids(Path(self.params.data_dir).expanduser() if self.params.data_dir else None)
        hint = " (for the original release pass source=dir)"
        for scenario in self.scenarios:
            text_only = self._hub_table(snap, scenario, "Text_only", hint)
            queries = {qid: str(values["question"]) for qid, values in self._hub_rows(text_only)}
            for image_type in self.image_types:
                table = text_only if image_type == "text" else self._hub_table(snap, scenario, HF_SPLIT[image_type], hint)
                rows = list(self._hub_rows(table))
                keep = self._keep(tiny, scenario, {q for q, _ in rows}, str(table.path))
                for row, (qid, values) in enumerate(rows):
                    if qid not in keep:
                        continue
                    image = None if image_type == "text" else table.image(row)
                    text_field = HF_TEXT_FIELD if image_type == "text" else TEXT_FIELD[image_type]
                    yield Item(scenario, qid, image_type, str(values["question"]), text_field, queries.get(qid),
                               None, image, image.ref if image else None)

    @staticmethod
    def _hub_table(snap: hfdata.HubSnapshot, scenario: Scenario, split: str, hint: str) -> hfdata.Table:
        (path,) = hfdata.parquet_files(snap, f"data/{scenario.hf_config}/{split}.parquet", hint)
        table = hfdata.read_parquet(path)
        table.require("id", "question", *(["image"] if split != "Text_only" else []))
        return table

    @staticmethod
    def _hub_rows(table: hfdata.Table) -> Iterator[tuple[int, dict[str, Any]]]:
        seen: set[int] = set()
        for row, values in table.rows(["id", "question"]):
            try:
                qid = int(str(values["id"]).strip())
            except ValueError:
                raise DataError(f"{table.where(row)}: id {values['id']!r} is not a number") from None
            if qid in seen:
                raise DataError(f"{table.where(row)}: id {qid} appears twice")
            if not isinstance(values["question"], str) or not values["question"].strip():
                raise DataError(f"{table.where(row)}: empty question")
            seen.add(qid)
            yield qid, values

    # -- scoring and provenance ---------------------------------------------------------------

    def metrics(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, MetricValue]:
        """`asr`; `asr/<image type>`; `asr/<scenario>`; `asr/<scenario>/<image type>`; judge errors
        overall and per scenario x image type (excluded from every rate)."""
        def cell(s: Sample) -> str:
            return f"{s.meta['scenario']}/{s.meta['image_type']}"

        out = attack_success_rate(samples, verdicts, group=cell)
        for grouping in (lambda s: s.meta["image_type"], lambda s: s.meta["scenario"]):
            part = attack_success_rate(samples, verdicts, group=grouping)
            out.update({k: v for k, v in part.items() if k.startswith("asr/")})
        verdicts = verdicts or {}
        sizes: dict[str, int] = {}
        errors: dict[str, int] = {}
        for s in samples:
            key = cell(s)
            sizes[key] = sizes.get(key, 0) + 1
            v = verdicts.get(s.id)
            errors[key] = errors.get(key, 0) + int(v is None or v.label == "error")
        for key in sorted(sizes):
            out[f"judge_errors/{key}"] = MetricValue(value=float(errors[key]), n=sizes[key])
        return out

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec, "task": "mm_safetybench", "source": self.params.source, "subset": self.params.subset,
            "scenarios": [s.name for s in self.scenarios], "images": self.image_types, "render": self.params.render,
        }
        if self.params.source == "hf":
            out["hf"] = (self._snapshot.identity() if self._snapshot else
                         {"repo_id": HF_REPO, "revision": self.revision, "root": self.params.data_dir})
        else:
            out["data_dir"] = str(Path(self.params.data_dir or "").expanduser().resolve())
        if self._tiny_path is not None:
            out["tiny_list"] = {"path": str(self._tiny_path), "sha256": _sha256(self._tiny_path)}
        return out
