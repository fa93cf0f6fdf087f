"""The `lm_eval:` task: lm-eval YAML tasks as realign samples, scored by lm-eval's own code.

Offline, on a local parquet image dataset (tests/lm_eval_data.py). The scripted cases check lm-eval's
numbers against a hand computation from the YAML's rules (exact match ignoring case and punctuation,
answers cut at the stop string, a regex filter, a group weighted by size, mean stderr)."""

from __future__ import annotations

import math
import sys

import pytest

import tests.lm_eval_data as D
from harness.errors import DataError
from harness.lm_eval_shared import cut_at_stops, prompt_text, single_image, unquote_spec
from harness.registry import tasks
from harness.samples import load_images
from harness.schema import Generation


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return D.write_task_dir(tmp_path_factory.mktemp("lm-eval-task"))


def build(folder, names="tiny_vqa", **extra):
    return tasks.build(D.task_spec(folder, names, **extra))


def answers(samples, outputs):
    return {s.id: Generation(s.id, out) for s, out in zip(samples, outputs)}


def test_documents_become_samples_with_stable_ids_text_image_and_settings(folder):
    task = build(folder)
    samples = list(task.samples())
    assert [s.id for s in samples] == [f"lm_eval/tiny_vqa/{i}" for i in range(4)]
    assert [s.text for s in samples] == list(D.QUESTIONS)  # lm-eval's context, `<image>` taken out
    assert all(s.category == "tiny_vqa" and s.meta["doc_id"] == i for i, s in enumerate(samples))
    assert samples[0].meta["generation_kwargs"] == {"until": ["zzz"], "max_gen_toks": D.MAX_GEN_TOKS,
                                                    "do_sample": False, "temperature": 0.0}
    assert samples[0].to_json()["image_ref"] == "lm_eval/tiny_vqa/0/image"
    loaded = load_images(samples)  # images are read when the batch runs, from the eval docs
    assert [im.image.tobytes() for im in loaded] == [im.tobytes() for im in D.images()]
    again = build(folder)
    assert [(s.id, s.text) for s in again.samples()] == [(s.id, s.text) for s in samples]


def test_scripted_answers_score_as_computed_by_hand(folder):
    task = build(folder)
    samples = list(task.samples())
    outputs = ["Red zzz and more", "green.", "yes sir", "Hi!"]
    # Cut at "zzz": "Red " (the space stays, so no match), then case and punctuation are ignored:
    # "green." = green, "yes sir" != yes, "Hi!" = hi.
    hand = [0.0, 1.0, 0.0, 1.0]
    metrics = task.metrics(samples, answers(samples, outputs), None)
    assert set(metrics) == {"tiny_vqa/exact_match"}
    m = metrics["tiny_vqa/exact_match"]
    mean = sum(hand) / 4
    stderr = math.sqrt(sum((x - mean) ** 2 for x in hand) / 3) / math.sqrt(4)  # lm-eval's mean_stderr
    assert (m.value, m.n) == (mean, 4)
    assert m.low == pytest.approx(max(0.0, mean - 1.959963984540054 * stderr))
    assert m.high == pytest.approx(min(1.0, mean + 1.959963984540054 * stderr))
    assert task.per_sample(samples, answers(samples, outputs), None) == {
        "tiny_vqa/exact_match": {s.id: x for s, x in zip(samples, hand)}}
    meaning = task.metric_meanings(metrics)["tiny_vqa/exact_match"]
    assert (meaning.kind, meaning.better, meaning.unit, meaning.headline) == ("utility", "higher", "rate", True)


def test_a_generation_error_scores_wrong(folder):
    task = build(folder)
    samples = list(task.samples())
    gens = answers(samples, ["red", "green", "yes", "hi"])
    gens[samples[0].id] = Generation(samples[0].id, "red", error="image: unreadable")
    assert task.metrics(samples, gens, None)["tiny_vqa/exact_match"].value == 0.75


def test_filters_groups_and_process_docs_follow_the_yaml(folder):
    task = build(folder, "tiny_group")
    samples = list(task.samples())
    assert [s.id for s in samples][-3:] == [f"lm_eval/tiny_vqa_regex/{i}" for i in range(3)]  # process_docs kept 3
    outputs = ["Red zzz", "green.", "yes sir", "bye", "Red zzz", "green.", "yes sir"]
    metrics = task.metrics(samples, answers(samples, outputs), None)
    values = {k: v.value for k, v in metrics.items()}
    # tiny_vqa: [0, 1, 0, 0]; tiny_vqa_regex unfiltered: [0, 1, 0]; its first word: red, green, yes: [1, 1, 1]
    assert values["tiny_vqa/exact_match"] == 0.25
    assert values["tiny_vqa_regex/exact_match"] == pytest.approx(1 / 3)
    assert values["tiny_vqa_regex/exact_match/first_word"] == 1.0
    assert values["tiny_group/exact_match"] == pytest.approx((0.25 * 4 + 1 / 3 * 3) / 7)  # weighted by size
    assert metrics["tiny_group/exact_match"].n == 7
    meanings = task.metric_meanings(metrics)
    assert meanings["tiny_group/exact_match"].headline and not meanings["tiny_vqa/exact_match"].headline
    assert meanings["tiny_vqa_regex/exact_match/first_word"].better == "higher"


def test_a_group_cut_by_the_limit_is_not_scored(folder):
    task = build(folder, "tiny_group")
    samples = list(task.samples())[:4]  # only tiny_vqa's documents
    metrics = task.metrics(samples, answers(samples, ["red"] * 4), None)
    assert set(metrics) == {"tiny_vqa/exact_match"}


def test_identity_names_lm_eval_task_versions_and_config_hashes(folder, tmp_path):
    ident = build(folder, "tiny_group").identity()
    assert ident["lm_eval"] and ident["groups"] == {"tiny_group": "2.0"}
    assert ident["tasks"]["tiny_vqa"]["version"] == 1.0 and ident["tasks"]["tiny_vqa"]["docs"] == 4
    other = D.write_task_dir(tmp_path / "v3", version="3.0")
    changed = build(other).identity()["tasks"]["tiny_vqa"]
    assert changed["version"] == 3.0
    assert changed["config_sha256"] != ident["tasks"]["tiny_vqa"]["config_sha256"]


def test_likelihood_and_multi_image_tasks_are_refused_with_a_reason(folder):
    with pytest.raises(DataError, match="multiple_choice task .* gives no likelihoods"):
        list(build(folder, "tiny_mc").samples())
    with pytest.raises(DataError, match="tiny_multi doc 0: several images"):
        list(build(folder, "tiny_multi").samples())
    skipping = build(folder, "tiny_multi", multi_image="skip")
    assert list(skipping.samples()) == []
    assert skipping.identity()["tasks"]["tiny_multi"]["skipped_multi_image"] == 4
    with pytest.raises(DataError, match="cannot load task"):
        list(build(folder, "no_such_task").samples())


def test_a_missing_lm_eval_is_named_with_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(DataError, match=r"realign\[lm-eval\]"):
        list(build(folder).samples())


def test_shared_conventions():
    assert unquote_spec("hf:pretrained=X;dtype=float32") == "hf:pretrained=X,dtype=float32"
    assert unquote_spec("qguard:guard=openai:model=g;;base_url=u;fpr=0.1") == "qguard:guard=openai:model=g;base_url=u,fpr=0.1"
    assert unquote_spec(None) is None
    image, other = D.images()[:2]
    assert single_image([image, image], "doc") is image  # one picture cited twice is one image
    assert single_image([], "doc") is None
    with pytest.raises(DataError, match="doc has 2 images"):
        single_image([image, other], "doc")
    assert prompt_text("<image>\nWhat?") == "\nWhat?"
    assert cut_at_stops("a zzz b\n\nc", ["zzz", "\n\n", ""]) == "a "
