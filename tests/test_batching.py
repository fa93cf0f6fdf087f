"""Generation order and one-batch-ahead preparation (harness.batching) and the runner's use of them.

The order must not change any output (only which samples share a batch), the worker thread must
prepare batch i+1 while batch i is consumed, an error in preparation must surface at its batch, and
attacks that run a model must never be prepared in the worker.
"""

from __future__ import annotations

import json
import threading

import pytest

from harness.batching import length_key, ordered, prefetched
from harness.registry import attacks, tasks
from harness.runner import prepares_ahead, run
from harness.schema import RunConfig, Sample
from tests.test_runner import Boom, ScriptedBackend  # noqa: F401  (registers scripted-test)


def _samples() -> list[Sample]:
    return [Sample("a", "short"), Sample("b", "a much longer request text", image="x.png"),
            Sample("c", "medium text", image="y.png"), Sample("d", "a much longer request text"),
            Sample("e", "tiny", image="z.png"), Sample("f", "medium text", image="w.png")]


def test_length_order_is_longest_first_images_first_and_stable():
    got = [s.id for s in ordered(_samples(), "length")]
    # image samples by length descending (c and f tie: task order), then text-only ones.
    assert got == ["b", "c", "f", "e", "d", "a"]
    assert [s.id for s in ordered(_samples(), "task")] == list("abcdef")
    keys = [length_key(s) for s in ordered(_samples(), "length")]
    assert keys == sorted(keys)


def test_prefetch_prepares_the_next_batch_in_a_worker_while_the_current_one_is_used():
    batches = [[Sample(f"s{i}{j}", "t") for j in range(2)] for i in range(4)]
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def attack(mine: list[Sample]) -> list[Sample]:
        with lock:
            seen.append((int(mine[0].id[1]), threading.current_thread().name))
        return mine

    out = []
    for i, (batch, ready, failed) in enumerate(prefetched(iter(batches), attack, ahead=True)):
        # by the time batch i is handed over, batch i+1 has been submitted to the worker
        if i + 1 < len(batches):
            for _ in range(200):
                with lock:
                    if any(k == i + 1 for k, _ in seen):
                        break
                threading.Event().wait(0.01)
            with lock:
                assert any(k == i + 1 for k, _ in seen), f"batch {i + 1} was not prepared during batch {i}"
        out.append([s.id for s in batch])
        assert ready == batch and failed == {}
    assert out == [[s.id for s in b] for b in batches]
    assert all(name.startswith("realign-prefetch") for _, name in seen)
    inline = [[s.id for s in b] for b, _, _ in prefetched(iter(batches), attack, ahead=False)]
    assert inline == out


def test_prefetch_error_surfaces_at_its_batch_and_unreadable_images_are_per_sample(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    batches = [[Sample("ok", "t"), Sample("bad", "t", image=str(bad))], [Sample("x", "boom")]]

    def attack(mine):
        if mine[0].text == "boom":
            raise ValueError("attack failed on x")
        return mine

    it = prefetched(iter(batches), attack, ahead=True)
    batch, ready, failed = next(it)
    assert [s.id for s in ready] == ["ok"] and set(failed) == {"bad"} and "image" in failed["bad"]
    with pytest.raises(ValueError, match="attack failed on x"):
        next(it)


def test_attacks_that_run_a_model_are_never_prepared_ahead():
    assert prepares_ahead(attacks.build("none")) and prepares_ahead(attacks.build("figstep"))
    assert not prepares_ahead(attacks.build("pgd:eps=8,steps=2"))
    assert not prepares_ahead(attacks.build("qr:rewriter=openai:model=m;base_url=http://127.0.0.1:9"))


def _config(order: str, **kw) -> RunConfig:
    base = dict(models=["scripted-test:tag=a"], defenses=["none"], tasks=["demo"], judges=["keywords"],
                batch_size=5, order=order)
    base.update(kw)
    return RunConfig(**base)


def _gens(out):
    cell = next(out.glob("*/none/demo"))
    return [json.loads(line) for line in (cell / "generations.jsonl").read_text().splitlines()]


def _results(out):
    return [{k: r[k] for k in ("n", "metrics")} for r in json.loads((out / "results.json").read_text())["results"]]


def test_order_changes_batches_not_outputs_and_a_run_resumes_under_the_other_order(tmp_path):
    ScriptedBackend.calls, ScriptedBackend.die_after = [], None
    run(_config("task"), tmp_path / "task", progress=False)
    run(_config("length"), tmp_path / "length", progress=False)
    by_task, by_length = _gens(tmp_path / "task"), _gens(tmp_path / "length")
    assert {g["sample_id"]: g["output"] for g in by_task} == {g["sample_id"]: g["output"] for g in by_length}
    assert [g["sample_id"] for g in by_task] != [g["sample_id"] for g in by_length]
    task = {s.id: s for s in tasks.build("demo").samples()}
    keys = [length_key(task[g["sample_id"]]) for g in by_length]
    assert keys == sorted(keys)  # written in generation order: longest image requests first
    assert _results(tmp_path / "task") == _results(tmp_path / "length")

    out = tmp_path / "resumed"
    ScriptedBackend.calls, ScriptedBackend.die_after = [], 2
    with pytest.raises(Boom):
        run(_config("length"), out, progress=False)
    assert len(_gens(out)) == 10
    ScriptedBackend.die_after, ScriptedBackend.calls = None, []
    run(_config("task"), out, progress=False)  # --order is not part of the run's identity
    assert sum(ScriptedBackend.calls) == 48 - 10
    ids = [g["sample_id"] for g in _gens(out)]
    assert len(ids) == len(set(ids)) == 48
    assert _results(out) == _results(tmp_path / "task")


def test_bad_order_is_refused_naming_the_option():
    with pytest.raises(Exception, match="--order must be length or task"):
        _config("shortest")


def test_length_order_gives_the_same_answers_on_a_real_model(tiny_model_path, tmp_path):
    model = str(tiny_model_path("llava"))
    common = dict(models=[model], defenses=["none"], tasks=["demo"], judges=[], batch_size=4, limit=12,
                  max_new_tokens=4, device="cpu", dtype="float32")
    run(RunConfig(order="task", **common), tmp_path / "t", progress=False)
    run(RunConfig(order="length", **common), tmp_path / "l", progress=False)
    outs = [{g["sample_id"]: g["output"] for g in _gens(d)} for d in (tmp_path / "t", tmp_path / "l")]
    assert outs[0] == outs[1] and len(outs[0]) == 12
