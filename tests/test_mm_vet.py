"""MM-Vet: the grader's reading of odd replies, its retry protocol through the local OpenAI-compatible
server, scores computed by hand (total and per capability), caching, both data layouts, and a run of
mm_vet, mmbench and pope together under a defense on a tiny model (fixtures: tests/data/mm_vet)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai import fake_openai, last_user_text  # noqa: E402
from harness.cli import main  # noqa: E402
from harness.errors import DataError  # noqa: E402
from harness.registry import judges, tasks  # noqa: E402
from harness.schema import Generation, Sample  # noqa: E402
from judges.mmvet_grader import DEFAULT_RETRY, parse_score, table_row  # noqa: E402
from judges.prompt_file import bundled_prompt  # noqa: E402
from tests.fixtures_benchmarks import picture_bytes, save_picture, write_parquet  # noqa: E402
from tests.test_pope import pope_release  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "mm_vet"
MMBENCH = Path(__file__).resolve().parent / "data" / "mmbench" / "MMBench_DEV_EN.tsv"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALIGN_CACHE", str(tmp_path / "cache"))


def mmvet_release(parent: Path) -> Path:
    """The fixture as the release unpacks: <parent>/mm-vet/mm-vet.json and images/."""
    folder = parent / "mm-vet"
    folder.mkdir(parents=True)
    shutil.copy(DATA / "mm-vet.json", folder / "mm-vet.json")
    for i in range(5):
        save_picture(folder / "images" / f"v1_{i}.png", i)
    return parent


# ---- reading a grader's reply (MM-Vet's evaluator: first space-separated token as a number in [0, 1])
@pytest.mark.parametrize("reply, score", [
    ("0.7", 0.7), ("1.0 (totally right)", 1.0), ("1", 1.0), (".5", 0.5), ("0.3\n", 0.3), ("1e-1", 0.1),
    (" 0.5", None),             # a leading space leaves an empty first token
    ("Score: 0.6", None), ("0.6.", None), ("0,6", None), ("1.5", None), ("-0.1", None),
    ("0.5\nThe prediction", None),  # only the ends are stripped: "0.5\nThe" is not a number
    ("nan", None),              # the one deviation: the official range check would let NaN through
    ("", None), ("correct", None),
])
def test_parse_score(reply: str, score: float | None):
    assert parse_score(reply) == (pytest.approx(score) if score is not None else None)


def test_row_spaces_the_connectives_as_the_evaluator_does():
    assert table_row("Q?", "a<AND>b <OR> c", "pred") == "Q? | a <AND> b  <OR>  c | pred | "


# ---- the protocol through a real HTTP endpoint ---------------------------------------------------
SCRIPT = {  # question -> grader replies in order, and the score MM-Vet's evaluator ends with
    "What is the total on the receipt?": (["0.8"], 0.8),
    "Which animal sleeps on the sofa?": ([" 1.0", "1.0"], 1.0),
    "Explain why the painted bridge is famous.": (["Correctness: 0.6", "0.6.", "1.5", "nan", "high"], 0.0),
    "Which word is written below the arrow?": (["0.5\nok", "0.4"], 0.4),
    "What is to the left of the red box?": (["1.0 (totally right)"], 1.0),
}


def scripted_server(**kw: Any):
    asked: dict[str, int] = {}

    def reply(body: dict[str, Any]) -> str:
        text = last_user_text(body)
        question = next(q for q in SCRIPT if f"\n{q} | " in text)
        n = asked.get(question, 0)
        asked[question] = n + 1
        return SCRIPT[question][0][n]

    return fake_openai(reply=reply, **kw)


def grade(release: Path, spec_tail: str = "", **server_kw: Any):
    task = tasks.build(f"mm_vet:path={release}")
    samples = list(task.samples())
    gens = [Generation(s.id, f"prediction {i}") for i, s in enumerate(samples)]
    with scripted_server(**server_kw) as server:
        grader = judges.build(f"mmvet_grader:model=grader-m,base_url={server.base_url},backoff=0.01{spec_tail}")
        verdicts = grader.verdicts(samples, gens)
        bodies = [r.body for r in server.chat_requests]
    return task, samples, {g.sample_id: g for g in gens}, {v.sample_id: v for v in verdicts}, bodies, grader


@pytest.fixture
def release(tmp_path: Path) -> Path:
    return mmvet_release(tmp_path / "data")


def test_grader_protocol_and_scores_by_hand(release: Path):
    task, samples, gens, verdicts, bodies, grader = grade(release)
    assert len(bodies) == 1 + 2 + 5 + 2 + 1
    bridge = [b for b in bodies if "\nExplain why the painted bridge is famous. | " in last_user_text(b)]
    assert [b["temperature"] for b in bridge] == [0.0, 0.0, 0.5, 1.0, 1.5] and {b["max_tokens"] for b in bodies} == {3}
    row = ("Explain why the painted bridge is famous. | It is a made-up landmark painted in bright stripes for a city "
           "festival  <AND>  it appears on the town's postcards. | prediction 2 | ")
    body = bundled_prompt("mmvet_grader").body
    assert last_user_text(bridge[0]) == body + "\n" + row
    assert last_user_text(bridge[1]) == body + "\n" + row + "\n" + DEFAULT_RETRY
    assert [m["role"] for m in bridge[0]["messages"]] == ["user"]
    for s in samples:
        v = verdicts[s.id]
        assert v.label == "safe" and v.detail["grader"] == "mm_vet"
        assert v.detail["score"] == pytest.approx(SCRIPT[s.text][1]), s.text
    assert verdicts["mm_vet/v1_2"].detail["fallback_runs"] == 1 and len(verdicts["mm_vet/v1_2"].detail["replies"][0]) == 5
    m = task.metrics(samples, gens, verdicts)
    # by hand: v1_0 0.8 (ocr, math), v1_1 1.0 (rec), v1_2 0.0 (rec, know, gen), v1_3 0.4 (ocr, spat), v1_4 1.0 (rec, spat)
    assert m["score"].value == pytest.approx((0.8 + 1.0 + 0.0 + 0.4 + 1.0) / 5) and m["score"].n == 5
    expected = {"rec": (1.0 + 0.0 + 1.0) / 3, "ocr": (0.8 + 0.4) / 2, "know": 0.0, "gen": 0.0,
                "spat": (0.4 + 1.0) / 2, "math": 0.8}
    assert {c: m[f"score/{c}"].value for c in expected} == pytest.approx(expected)
    assert (m["grader_fallbacks"].value, m["judge_errors"].value, m["ungraded"].value) == (1, 0, 0)
    assert task.per_sample(samples, gens, verdicts)["score"]["mm_vet/v1_3"] == pytest.approx(0.4)
    meanings = task.metric_meanings(m)
    assert meanings["score"].ranked and meanings["score"].headline and not meanings["score/ocr"].headline
    assert meanings["grader_fallbacks"].kind == meanings["judge_errors"].kind == "diagnostic"
    assert grader.identity()["protocol"] == "mmvet-1" and grader.identity()["template"]["name"] == "mmvet_grader"


def test_grades_are_cached_and_repeatable(release: Path):
    samples = list(tasks.build(f"mm_vet:path={release}").samples())
    gens = [Generation(s.id, f"prediction {i}") for i, s in enumerate(samples)]
    with scripted_server() as server:
        spec = f"mmvet_grader:model=grader-m,base_url={server.base_url},backoff=0.01"
        first = {v.sample_id: v for v in judges.build(spec).verdicts(samples, gens)}
        asked = server.request_count
        again = judges.build(spec)
        second = {v.sample_id: v for v in again.verdicts(samples, gens)}
        assert server.request_count == asked == 11 and again.usage.cache_hits == 5
        assert all(second[k].detail["score"] == first[k].detail["score"] and second[k].detail["cached"] for k in first)
    with fake_openai(reply=lambda body: "0.0") as server:  # another endpoint (or grader model) is another key
        judges.build(f"mmvet_grader:model=grader-m,base_url={server.base_url}").verdicts(samples, gens)
        assert server.request_count == 5


def test_runs_average_and_template_file(release: Path, tmp_path: Path):
    original = tmp_path / "original.txt"
    original.write_text('# retry: "Say the score (digit): "\n\nRate the prediction from 0.0 to 1.0.\n', encoding="utf-8")
    task = tasks.build(f"mm_vet:path={release}")
    samples = [s for s in task.samples() if s.id == "mm_vet/v1_1"]
    replies = iter(["oops", "0.2", "0.6"])
    with fake_openai(reply=lambda body: next(replies)) as server:
        grader = judges.build(f"mmvet_grader:model=m,base_url={server.base_url},template_file={original},runs=2")
        (v,) = grader.verdicts(samples, [Generation("mm_vet/v1_1", "a cat")])
        texts = [last_user_text(r.body) for r in server.chat_requests]
    row = "Which animal sleeps on the sofa? | cat | a cat | "
    assert texts == ["Rate the prediction from 0.0 to 1.0.\n\n" + row,
                     "Rate the prediction from 0.0 to 1.0.\n\n" + row + "\nSay the score (digit): ",
                     "Rate the prediction from 0.0 to 1.0.\n\n" + row]
    assert v.detail["scores"] == [0.2, 0.6] and v.detail["score"] == pytest.approx(0.4)
    assert grader.identity()["template"]["name"] == "original" and grader.identity()["retry"] == "Say the score (digit): "


def test_failures_other_judges_and_other_samples(release: Path, caplog: pytest.LogCaptureFixture):
    _, samples, gens, verdicts, _, _ = grade(release, ",max_retries=0", faults=["500"] * 40)
    assert all(v.label == "error" and "request failed" in v.detail["reason"] for v in verdicts.values())
    task = tasks.build(f"mm_vet:path={release}")
    m = task.metrics(samples, gens, verdicts)
    assert "score" not in m and m["judge_errors"].value == 5
    _, _, _, retried, _, _ = grade(release)  # transport failures were not cached: asked again
    assert all(v.label == "safe" for v in retried.values())
    keywords = {v.sample_id: v for v in judges.build("keywords").verdicts(samples, [gens[s.id] for s in samples])}
    with caplog.at_level(logging.WARNING):
        m = task.metrics(samples, gens, keywords)
    assert "score" not in m and m["ungraded"].value == 5 and "--judge mmvet_grader" in caplog.text
    gens["mm_vet/v1_0"] = Generation("mm_vet/v1_0", "", error="oom")  # a failed answer scores 0
    assert task.metrics(samples, gens, retried)["score"].value == pytest.approx((0.0 + 1.0 + 0.0 + 0.4 + 1.0) / 5)
    grader = judges.build("mmvet_grader:model=m,base_url=http://127.0.0.1:9/v1")
    (v,) = grader.verdicts([Sample("figstep/1", "q")], [Generation("figstep/1", "answer")])
    assert v.label == "error" and "MM-Vet samples only" in v.detail["reason"]


# ---- data -----------------------------------------------------------------------------------------
def test_release_and_hub_copy_give_the_same_samples(release: Path, tmp_path: Path):
    ours = list(tasks.build(f"mm_vet:path={release}").samples())
    records = json.loads((DATA / "mm-vet.json").read_text())
    write_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", {
        "question_id": list(records), "question": [r["question"] for r in records.values()],
        "answer": [r["answer"] for r in records.values()],
        "capability": [",".join(r["capability"]) for r in records.values()],
        "image": [picture_bytes(i) for i in range(len(records))]})
    hub = list(tasks.build(f"mm_vet:path={tmp_path / 'hub'}").samples())
    assert [(s.id, s.text, s.meta) for s in ours] == [(s.id, s.text, s.meta) for s in hub]
    assert ours[0].id == "mm_vet/v1_0" and ours[0].meta["capabilities"] == ["ocr", "math"]
    assert Path(ours[0].image).is_file() and hub[0].image().size == (48, 32)
    assert tasks.build("mm_vet").identity()["hf"]["revision"] == "b310d12d0d9e765db953da28a7ef7ff43620dc83"
    with pytest.raises(DataError, match="hf download --repo-type dataset lmms-lab/MMVet"):
        list(tasks.build("mm_vet").samples())


def test_bad_release_entries(tmp_path: Path):
    folder = tmp_path / "mm-vet"
    folder.mkdir()
    (folder / "mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "a.png", "capability": ["sight"],
                                                             "question": "q", "answer": "a"}}))
    with pytest.raises(DataError, match=r"question 'v1_0': capability \['sight'\]"):
        list(tasks.build(f"mm_vet:path={folder}").samples())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither"):
        list(tasks.build(f"mm_vet:path={tmp_path / 'empty'}").samples())


# ---- the three utility tasks in one run, under a defense ----------------------------------------------
def test_utility_tasks_run_together_under_adashield(tiny_model_path, release: Path, tmp_path: Path):
    pope = pope_release(tmp_path / "pope")
    out = tmp_path / "run"
    with fake_openai(reply=lambda body: "0.5") as server:
        code = main(["run", "--model", str(tiny_model_path("llava")), "--defense", "none", "adashield",
                     "--task", f"mm_vet:path={release}", f"mmbench:path={MMBENCH}",
                     f"pope:path={pope},split=random", "--judge", f"mmvet_grader:model=m,base_url={server.base_url}",
                     "--out", str(out), "--max-new-tokens", "3", "--batch-size", "6", "--device", "cpu", "--quiet"])
        graded = server.request_count
        # re-grading from the run directory alone (records only, no model): every grade from the cache
        assert main(["judge", str(out), "--judge", f"mmvet_grader:model=m,base_url={server.base_url}"]) == 0
        assert server.request_count == graded
    assert code == 0
    records = json.loads((out / "results.json").read_text())["results"]
    by = {(r["defense"], r["task"].split(":")[0]): r for r in records}
    assert set(by) == {(d, t) for d in ("none", "adashield") for t in ("mm_vet", "mmbench", "pope")}
    assert graded == 10  # 5 questions under each defense, each read at once
    for d in ("none", "adashield"):
        vet, bench, pope_rec = by[(d, "mm_vet")], by[(d, "mmbench")], by[(d, "pope")]
        assert vet["judge"].startswith("mmvet_grader") and vet["metrics"]["score"]["value"] == pytest.approx(0.5)
        assert vet["meanings"]["score"]["kind"] == "utility" and vet["n"] == 5
        assert bench["judge"] is None and bench["n"] == 17 and "acc" in bench["metrics"]
        assert pope_rec["judge"] is None and pope_rec["n"] == 4 and "f1" in pope_rec["metrics"]
