"""MMBench: the two choice-reading rule sets, CircularEval computed by hand (a question right in 3
of 4 rotations is wrong), released vs generated rotations, the hub layout, the test split, and the
optional LLM extractor through the local OpenAI-compatible server (fixtures: tests/data/mmbench)."""

from __future__ import annotations

import base64
import csv
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai import fake_openai, last_user_text  # noqa: E402
from harness.choice_rules import read_choice  # noqa: E402
from harness.errors import DataError  # noqa: E402
from harness.registry import judges, tasks  # noqa: E402
from harness.schema import Generation, Sample  # noqa: E402
from tasks.mmbench import build_prompt  # noqa: E402
from tests.fixtures_benchmarks import write_parquet  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "mmbench"
BASE = DATA / "MMBench_DEV_EN.tsv"
RELEASED = DATA / "released" / "MMBench_DEV_EN.tsv"
COLOURS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALIGN_CACHE", str(tmp_path / "cache"))


# ---- reading a reply ---------------------------------------------------------------------------
@pytest.mark.parametrize("reply, lmms_eval, vlmevalkit", [
    ("C", "C", "C"),
    ("The answer is B", "B", "B"),
    ("(B) green", "B", "B"),
    ("B. green", "B", "B"),
    ("Answer: D", "D", "D"),
    ("blue", "C", "C"),                       # no letter: the option's text
    ("A and B", None, None),                  # two letters, no text
    ("It is blue or green", None, None),      # two options' texts
    ("A cat is blue", "C", "A"),              # lmms-eval: "A" may be an article in a long reply; VLMEvalKit: last four words
    ("the answer is b", None, "B"),           # VLMEvalKit's "answer is X" is case-blind
    ("E", "E", None),                         # lmms-eval tries A-E whatever the question has
    ("Cannot determine the answer", None, "Z"),
    ("Z", None, "Z"),
    # lmms-eval's patterns find the one "C,"; VLMEvalKit sees three letters and a reply too long for option text
    ("B is right, not C, although one could argue for D after a long look at it", "C", None),
])
def test_rules(reply: str, lmms_eval: str | None, vlmevalkit: str | None):
    assert read_choice(reply, COLOURS, "lmms-eval") == lmms_eval
    assert read_choice(reply, COLOURS, "vlmevalkit") == vlmevalkit


# ---- passes ------------------------------------------------------------------------------------
def test_rotations_are_generated_as_released():
    made = list(tasks.build(f"mmbench:path={BASE}").samples())
    released = list(tasks.build(f"mmbench:path={RELEASED}").samples())
    assert len(made) == 4 + 3 + 2 + 4 + 4
    key = lambda s: (s.id, s.text, s.meta["answer"])  # noqa: E731
    assert sorted(map(key, made)) == sorted(map(key, released))
    assert [s.meta["index"] for s in released if s.meta["g_index"] == 0] == [0, 1_000_000, 2_000_000, 3_000_000]
    q0 = [s for s in made if s.meta["g_index"] == 0]
    # pass k shows option (j + k) mod 4 under letter j: blue (the answer) moves C, B, A, D
    assert [s.meta["answer"] for s in q0] == ["C", "B", "A", "D"]
    assert q0[1].text == ("What colour is the square in the picture?\nA. green\nB. blue\nC. yellow\nD. red\n"
                          "Answer with the option's letter from the given choices directly.")
    hinted = next(s for s in made if s.id == "mmbench/en/dev/2/1")
    assert hinted.text.startswith("The drawing shows a made-up street corner.\nWhich sign stands left of the lamp?\nA. yield sign\nB. stop sign\n")
    assert hinted.meta["l1"] == "perception" and hinted.meta["l2"] == "finegrained_perception (cross-instance)"
    single = list(tasks.build(f"mmbench:path={BASE},circular=false").samples())
    assert [s.id for s in single] == [f"mmbench/en/dev/{g}/0" for g in range(5)]


def test_prompt_styles():
    options = {"A": "cat", "B": "dog"}
    assert build_prompt("Q?", None, options, "llava", "cn") == "Q?\nA. cat\nB. dog\n请直接回答选项字母。"
    assert build_prompt("Q?", "H.", options, "vlmevalkit", "en") == (
        "Hint: H.\nQuestion: Q?\nOptions:\nA. cat\nB. dog\nPlease select the correct answer from the options above. \n")


# ---- CircularEval by hand ----------------------------------------------------------------------
# Each question's passes (rotation k shows option (j + k) mod N under letter j) and the right letters:
#   q0 red/green/blue/yellow, blue:  C B A D      q1 one/two/three, two: B A C
#   q2 stop/yield sign, stop:        A B          q3 calm/tense/joyful/sad, calm: A D C B
#   q4 rained/pipe/paint/snow, rain: A D C B
REPLIES = {
    0: ["C", "The answer is B", "D. green", "(D)"],        # pass 2 wrong (A): right 3 of 4 -> wrong
    1: ["B", "A", "two"],                                   # "two" is option C's text on pass 2 -> right
    2: ["A", "It is the stop sign"],                        # option text, B on pass 1 -> right
    3: ["A", "Hard to say.", "C", "B"],                     # pass 1 unreadable -> wrong
    4: ["A", "D", "C", "B"],                                # right
}


def replies_for(samples) -> dict[str, Generation]:
    return {s.id: Generation(s.id, REPLIES[s.meta["g_index"]][s.meta["pass"]]) for s in samples}


def test_circular_eval_by_hand():
    task = tasks.build(f"mmbench:path={BASE}")
    samples = list(task.samples())
    m = task.metrics(samples, replies_for(samples), None)
    assert m["acc"].value == pytest.approx(3 / 5) and m["acc"].n == 5
    assert m["acc_vanilla"].value == 1.0  # every first pass is right
    assert m["acc/l1/perception"].value == pytest.approx(2 / 4) and m["acc/l1/reasoning"].value == 1.0
    assert m["acc/l2/finegrained_perception (instance-level)"].value == pytest.approx(1 / 2)
    assert m["acc/l2/coarse_perception"].value == 0.0 and m["acc/l2/attribute_reasoning"].value == 1.0
    assert m["acc/l3/attribute_recognition"].value == 0.0 and m["acc/l3/object_localization"].value == 1.0
    assert m["failed_extractions"].value == 1 and "llm_extractions" not in m
    per = task.per_sample(samples, replies_for(samples), None)["acc"]
    assert per == {"mmbench/en/dev/0/0": 0.0, "mmbench/en/dev/1/0": 1.0, "mmbench/en/dev/2/0": 1.0,
                   "mmbench/en/dev/3/0": 0.0, "mmbench/en/dev/4/0": 1.0}
    gens = replies_for(samples)
    gens["mmbench/en/dev/4/2"] = Generation("mmbench/en/dev/4/2", "", error="oom")  # a failed pass fails its question
    assert task.metrics(samples, gens, None)["acc"].value == pytest.approx(2 / 5)
    meanings = task.metric_meanings(m)
    assert meanings["acc"].ranked and meanings["acc"].headline and not meanings["acc/l2/coarse_perception"].headline
    assert meanings["failed_extractions"].kind == "diagnostic"


def test_vlmevalkit_rules_read_differently():
    task = tasks.build(f"mmbench:path={BASE},extract=vlmevalkit")
    samples = list(task.samples())
    gens = replies_for(samples)
    gens["mmbench/en/dev/1/2"] = Generation("mmbench/en/dev/1/2", "two")  # same as before
    gens["mmbench/en/dev/3/1"] = Generation("mmbench/en/dev/3/1", "the answer is d")  # case-blind here only
    assert task.metrics(samples, gens, None)["acc"].value == pytest.approx(4 / 5)
    lmms = tasks.build(f"mmbench:path={BASE}")
    assert lmms.metrics(list(lmms.samples()), gens, None)["acc"].value == pytest.approx(3 / 5)


# ---- the LLM extractor -------------------------------------------------------------------------
def test_llm_extractor_reads_only_what_the_rules_cannot():
    task = tasks.build(f"mmbench:path={BASE},extractor=judge")
    assert task.needs_judge and not tasks.build(f"mmbench:path={BASE}").needs_judge
    samples = list(task.samples())
    gens = replies_for(samples)
    with fake_openai(reply=lambda body: "D") as server:
        extractor = judges.build(f"mmbench_extractor:model=m,base_url={server.base_url},backoff=0.01")
        verdicts = {v.sample_id: v for v in extractor.verdicts(samples, [gens[s.id] for s in samples])}
        assert server.request_count == 1  # only "Hard to say." went to the LLM
        prompt = last_user_text(server.chat_requests[0].body)
        assert "Question: What is the mood of the scene?\nOptions:\nA. tense\nB. joyful\nC. sad\nD. calm\nReply: Hard to say.\n" in prompt
        again = judges.build(f"mmbench_extractor:model=m,base_url={server.base_url}")
        again.verdicts(samples, [gens[s.id] for s in samples])
        assert server.request_count == 1 and again.usage.cache_hits == 1  # cached
    assert verdicts["mmbench/en/dev/3/1"].detail["by"] == "llm" and verdicts["mmbench/en/dev/3/1"].detail["choice"] == "D"
    assert verdicts["mmbench/en/dev/0/0"].detail == {"extractor": "mmbench", "choice": "C", "by": "rule", "requests": 0}
    m = task.metrics(samples, gens, verdicts)
    assert m["acc"].value == pytest.approx(4 / 5) and m["llm_extractions"].value == 1
    assert m["failed_extractions"].value == 0 and m["judge_errors"].value == 0


def test_llm_extractor_gives_up_after_three_unreadable_replies():
    task = tasks.build(f"mmbench:path={BASE},extractor=judge")
    samples = [s for s in task.samples() if s.meta["g_index"] == 3]
    gens = replies_for(samples)
    with fake_openai(reply=lambda body: "Hmm, not sure") as server:
        extractor = judges.build(f"mmbench_extractor:model=m,base_url={server.base_url},backoff=0.01")
        verdicts = {v.sample_id: v for v in extractor.verdicts(samples, [gens[s.id] for s in samples])}
        assert server.request_count == 3
    v = verdicts["mmbench/en/dev/3/1"]
    assert v.detail["choice"] is None and v.detail["by"] == "llm-failed" and len(v.detail["replies"]) == 3
    m = task.metrics(samples, gens, verdicts)
    assert m["acc"].value == 0.0 and m["failed_extractions"].value == 1
    other = judges.build("mmbench_extractor:model=m,base_url=http://127.0.0.1:9/v1")
    (bad,) = other.verdicts([Sample("x", "q")], [Generation("x", "A")])
    assert bad.label == "error" and "MMBench passes only" in bad.detail["reason"]


# ---- data sources and the test split ------------------------------------------------------------
def _tsv_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_hub_copy_gives_the_same_samples(tmp_path: Path):
    rows = _tsv_rows(BASE)
    cols = {"index": [r["index"] for r in rows]}  # the hub's en config stores index as text
    for name in ("question", "hint", "answer", "A", "B", "C", "D", "category", "source"):
        cols[name] = [None if r[name] == "nan" else r[name] for r in rows]
    cols["L2-category"] = [r["l2-category"] for r in rows]
    cols["image"] = [base64.b64decode(r["image"]) for r in rows]
    write_parquet(tmp_path / "hub" / "en" / "dev-00000-of-00001.parquet", cols)
    hub = list(tasks.build(f"mmbench:path={tmp_path / 'hub'}").samples())
    tsv = list(tasks.build(f"mmbench:path={BASE}").samples())
    assert [(s.id, s.text, s.meta["answer"], s.meta["l2"]) for s in hub] == [(s.id, s.text, s.meta["answer"], s.meta["l2"]) for s in tsv]
    assert hub[0].image().size == tsv[0].image().size == (8, 8)
    with pytest.raises(DataError, match="holds neither"):
        list(tasks.build(f"mmbench:path={tmp_path / 'hub'},lang=cn").samples())


def test_test_split_has_no_accuracy(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    rows = _tsv_rows(BASE)
    path = tmp_path / "MMBench_TEST_EN.tsv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows({**r, "answer": "", "split": "test"} for r in rows)
    task = tasks.build(f"mmbench:path={tmp_path},split=test")
    samples = list(task.samples())
    assert len(samples) == 17 and all(s.meta["answer"] is None for s in samples)
    with caplog.at_level(logging.WARNING):
        m = task.metrics(samples, replies_for(samples), None)
    assert "acc" not in m and m["failed_extractions"].value == 1 and "evaluation server" in caplog.text


def test_bad_rows_and_pins(tmp_path: Path):
    rows = _tsv_rows(BASE)
    rows[1]["answer"] = "E"
    path = tmp_path / "bad.tsv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=r"bad\.tsv:3: answer 'E' names none of the options"):
        list(tasks.build(f"mmbench:path={path}").samples())
    assert tasks.build("mmbench").identity()["hf"]["revision"] == "56ba1af8954932c4804bd3f522e05ed96e63b654"
    with pytest.raises(DataError, match="hf download --repo-type dataset lmms-lab/MMBench"):
        list(tasks.build("mmbench:lang=cn").samples())
