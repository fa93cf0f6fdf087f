"""POPE: the official reply rule, metrics computed by hand from it, both data layouts, and a run
under a defense on a tiny model (fixture questions of our own in tests/data/pope)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import DataError
from harness.registry import tasks
from harness.schema import Generation
from tasks.pope_score import parse_lmms_eval, parse_official
from tests.fixtures_benchmarks import picture_bytes, save_picture, write_parquet

DATA = Path(__file__).resolve().parent / "data" / "pope"
IMAGES = {"COCO_val2014_000000000011.jpg": 11, "COCO_val2014_000000000022.jpg": 22}


def pope_release(root: Path) -> Path:
    """The fixture questions as the official release lays them out, pictures in val2014/."""
    root.mkdir(parents=True, exist_ok=True)
    for f in DATA.glob("coco_pope_*.json"):
        shutil.copy(f, root / f.name)
    for name, seed in IMAGES.items():
        save_picture(root / "val2014" / name, seed)
    return root


def pope_hub(root: Path) -> Path:
    """The same questions in lmms-lab/POPE's layout: one parquet with a `category` column."""
    cols: dict[str, list] = {k: [] for k in ("id", "question_id", "question", "answer", "image_source", "image", "category")}
    for split in ("adversarial", "popular", "random"):  # hub row order differs from ours on purpose
        for line in (DATA / f"coco_pope_{split}.json").read_text().splitlines():
            row = json.loads(line)
            cols["id"].append(f"{split}-{row['question_id']}")
            cols["question_id"].append(str(row["question_id"]))
            cols["question"].append(row["text"])
            cols["answer"].append(row["label"])
            cols["image_source"].append(row["image"])
            cols["image"].append(picture_bytes(IMAGES[row["image"]]))
            cols["category"].append(split)
    write_parquet(root / "data" / "test-00000-of-00001.parquet", cols)
    return root


# ---- the official rule -------------------------------------------------------------------------
@pytest.mark.parametrize("reply, label", [
    ("Yes, there is", "yes"), ("No.", "no"), ("There is not", "no"), ("Yes", "yes"), ("no", "no"),
    ("No, there is no car.", "no"), ("Yes. It is not small.", "yes"),  # only the first sentence counts
    ("I do not see one", "no"), ("no, there isn't", "no"),
    ("NO", "yes"), ("Not at all", "yes"),  # case-sensitive: only No, no and not read as no
    ("There is no\nkite", "yes"),  # split on single spaces: "no\nkite" is one word
    ("", "yes"), ("Maybe", "yes"),  # everything else is yes
])
def test_official_rule(reply: str, label: str):
    assert parse_official(reply) == label


def test_lmms_eval_rule_is_exact_match():
    assert [parse_lmms_eval(r) for r in ("Yes", " no\n", "Yes, there is", "No.")] == ["yes", "no", "other", "other"]


# ---- metrics by hand ---------------------------------------------------------------------------
REPLIES = {  # split -> replies to questions 1-4 (answers: yes, no, yes, no)
    "random": ["Yes, there is a kite.", "No.", "There is not a bench.", "Yes"],        # TP TN FN FP
    "popular": ["Yes", "NO", "yes", "No, there is no car."],                           # TP FP TP TN
    "adversarial": ["No.", "There is not a surfboard.", "Yes. It is not small.", "I do not see one"],  # FN TN TP TN
}


def scripted(task_spec: str) -> tuple[object, list, dict]:
    task = tasks.build(task_spec)
    samples = list(task.samples())
    gens = {s.id: Generation(s.id, REPLIES[s.meta["split"]][int(s.meta["question_id"]) - 1]) for s in samples}
    return task, samples, gens


def test_metrics_computed_by_hand(tmp_path: Path):
    task, samples, gens = scripted(f"pope:path={pope_release(tmp_path / 'pope')}")
    m = task.metrics(samples, gens, None)
    expected = {  # (acc, precision, recall, f1, yes_ratio) from each split's TP/FP/TN/FN above
        "random": (2 / 4, 1 / 2, 1 / 2, 1 / 2, 2 / 4),                # TP1 FP1 TN1 FN1
        "popular": (3 / 4, 2 / 3, 2 / 2, 2 * (2 / 3) / (2 / 3 + 1), 3 / 4),  # TP2 FP1 TN1 FN0
        "adversarial": (3 / 4, 1 / 1, 1 / 2, 2 * 0.5 / 1.5, 1 / 4),   # TP1 FP0 TN2 FN1
    }
    for split, values in expected.items():
        got = tuple(m[f"{name}/{split}"].value for name in ("acc", "precision", "recall", "f1", "yes_ratio"))
        assert got == pytest.approx(values), split
    # pooled over the 12 questions: TP4 FP2 TN4 FN2
    assert (m["acc"].value, m["precision"].value, m["recall"].value, m["f1"].value, m["yes_ratio"].value) == \
        pytest.approx((8 / 12, 4 / 6, 4 / 6, 4 / 6, 6 / 12))
    assert m["f1_avg"].value == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["unparseable"].value == 0 and m["acc"].n == 12 and m["acc/random"].n == 4
    for v in m.values():
        if v.low is not None:
            assert v.low <= v.value + 1e-9 and v.value <= v.high + 1e-9
    per = task.per_sample(samples, gens, None)["acc"]
    assert sum(per.values()) / len(per) == pytest.approx(m["acc"].value)


def test_lmms_eval_rule_changes_the_numbers_and_failed_generations_count_wrong(tmp_path: Path):
    task, samples, gens = scripted(f"pope:path={pope_release(tmp_path / 'pope')},split=random,parse=lmms-eval")
    m = task.metrics(samples, gens, None)
    # only "Yes" (q4, answer no) is an exact yes/no: FP; the rest are neither: wrong, not counted as yes or no
    assert (m["acc"].value, m["precision"].value, m["recall"].value, m["yes_ratio"].value) == (0.0, 0.0, 0.0, 0.25)
    assert m["unparseable"].value == 3
    official, samples, gens = scripted(f"pope:path={tmp_path / 'pope'},split=random")
    gens["pope/random/1"] = Generation("pope/random/1", "", error="boom")
    m = official.metrics(samples, gens, None)
    assert m["acc"].value == pytest.approx(1 / 4) and m["recall"].value == 0.0 and m["unparseable"].value == 0


def test_metric_meanings_declared(tmp_path: Path):
    task, samples, gens = scripted(f"pope:path={pope_release(tmp_path / 'pope')}")
    meanings = task.metric_meanings(task.metrics(samples, gens, None))
    assert meanings["acc"].kind == "utility" and meanings["acc"].better == "higher" and meanings["acc"].headline
    assert meanings["f1_avg"].ranked and meanings["f1/adversarial"].ranked and not meanings["f1/adversarial"].headline
    assert meanings["yes_ratio"].better is None and not meanings["yes_ratio"].ranked
    assert meanings["yes_ratio/random"].better is None and meanings["unparseable"].kind == "diagnostic"


# ---- data --------------------------------------------------------------------------------------
def test_release_and_hub_copy_give_the_same_samples(tmp_path: Path):
    release = list(tasks.build(f"pope:path={pope_release(tmp_path / 'rel')}").samples())
    hub = list(tasks.build(f"pope:path={pope_hub(tmp_path / 'hub')}").samples())
    assert [s.id for s in release] == [s.id for s in hub]
    assert [s.id for s in release[:2]] == ["pope/random/1", "pope/random/2"] and len(release) == 12
    assert [(s.text, s.meta["answer"]) for s in release] == [(s.text, s.meta["answer"]) for s in hub]
    assert release[0].text == "Is there a kite in the image?" and Path(release[0].image).is_file()
    assert hub[0].image().size == (48, 32)
    only = list(tasks.build(f"pope:path={tmp_path / 'hub'},split=adversarial+popular").samples())
    assert [s.meta["split"] for s in only] == ["popular"] * 4 + ["adversarial"] * 4  # our split order


def test_llava_prompt_and_identity(tmp_path: Path):
    task = tasks.build(f"pope:path={pope_release(tmp_path / 'pope')},prompt=llava,split=random")
    first = next(iter(task.samples()))
    assert first.text == "Is there a kite in the image?\nAnswer the question using a single word or phrase."
    ident = task.identity()
    assert ident["release"] == str((tmp_path / "pope").resolve()) and ident["splits"] == ["random"]


def test_hub_is_pinned_and_offline_fails_with_advice():
    task = tasks.build("pope")
    assert task.identity()["hf"]["revision"] == "4db1276663dfa5eb8ad16a52d24c31a09e470896"
    with pytest.raises(DataError, match="hf download --repo-type dataset lmms-lab/POPE"):
        list(task.samples())


def test_bad_rows_name_file_and_line(tmp_path: Path):
    root = pope_release(tmp_path / "pope")
    path = root / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"label": "yes"', '"label": "maybe"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"coco_pope_random\.json:3: answer 'maybe'"):
        list(tasks.build(f"pope:path={root}").samples())
    with pytest.raises(DataError, match="holds neither"):
        list(tasks.build(f"pope:path={tmp_path}").samples())
    with pytest.raises(DataError, match="images= goes with path="):
        tasks.build("pope:images=/x")


# ---- a real run under a defense ------------------------------------------------------------------
def test_runs_under_adashield_on_a_tiny_model(tiny_model_path, tmp_path: Path):
    data = pope_release(tmp_path / "pope")
    (data / "val2014" / "COCO_val2014_000000000022.jpg").unlink()  # a missing picture: those samples only
    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_model_path("llava")), "--defense", "none", "adashield",
                 "--task", f"pope:path={data},split=random+adversarial", "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "4", "--device", "cpu", "--quiet"])
    assert code == 1  # finished, with the missing picture's samples recorded as errors
    records = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["defense"] for r in records) == ["adashield", "none"]
    for r in records:
        assert r["task"].startswith("pope") and r["judge"] is None and r["n"] == 8
        assert r["generation_errors"] == 4  # the four questions on the missing picture
        assert {"acc", "f1", "f1_avg", "acc/random", "yes_ratio/adversarial"} <= set(r["metrics"])
        assert r["meanings"]["acc"]["kind"] == "utility" and r["meanings"]["yes_ratio"]["better"] is None
        assert not math.isnan(r["metrics"]["acc"]["value"])
    gens = [json.loads(l) for l in next(out.glob("*/adashield/*/generations.jsonl")).read_text().splitlines()]
    assert any(g["trace"].get("defense_prompt") for g in gens if not g.get("error"))
