"""The `realign` lm-eval model, against `realign run` and against lm-eval's own hf-multimodal.

Offline: the tiny VLMs of tests/conftest.py and the local lm-eval task folder of tests/lm_eval_data.py.
- A defense (AdaShield-S; CMRM fitted on calibration data) gives the same answers, document for
  document, through `realign run --task lm_eval:...` and through lm-eval with `--model realign`, and
  both report lm-eval's same metric.
- `none` through the bridge gives exactly hf-multimodal's answers. Both sides apply the chat template
  (hf-multimodal with apply_chat_template: its user turn is [image, text], as realign builds it) and
  decode greedily for the same number of new tokens, one request per batch. (Exact on the three tiny
  architectures; on real checkpoints see the README: hf-multimodal tokenizes its templated prompt with the
  processor's default special tokens, realign leaves BOS out when the template wrote one.)
- lm-eval's CLI, through `realign lm-eval` (harness.lm_eval_cli), runs the model too.
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

import tests.lm_eval_data as D
from harness.errors import DataError
from harness.lm_eval_model import ChatPrompt, RealignLM
from harness.spec import SpecError
from harness.tiny import TINY_ARCHS

CALIBRATED = "cmrm:calibration=organism:split=calibration,calibration_limit=4"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return D.write_task_dir(tmp_path_factory.mktemp("lm-eval-model"))


@pytest.fixture(scope="module")
def llava(tiny_model_path) -> str:
    return str(tiny_model_path("llava"))


def lm_eval_run(model: str, folder: Path, model_args: str, batch_size: int = 2, chat: bool = False) -> dict:
    """lm-eval's own evaluation of `tiny_vqa` (greedy, its 8 new tokens), samples logged."""
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["tiny_vqa"], batch_size=batch_size,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False), apply_chat_template=chat,
        log_samples=True, bootstrap_iters=0)


def answers(result: dict) -> list[str]:
    rows = sorted(result["samples"]["tiny_vqa"], key=lambda r: r["doc_id"])
    return [r["resps"][0][0] for r in rows]


def realign_run(llava: str, folder: Path, defense: str, out: Path) -> tuple[list[dict], dict]:
    from harness.cli import main

    code = main(["run", "--model", llava, "--defense", defense, "--task", D.task_spec(folder), "--out", str(out),
                 "--batch-size", "2", "--max-new-tokens", str(D.MAX_GEN_TOKS), "--device", "cpu", "--quiet"])
    assert code == 0
    (path,) = list(out.rglob("generations.jsonl"))
    gens = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda g: g["sample_id"])
    (record,) = json.loads((out / "results.json").read_text())["results"]
    return gens, record


def cut(text: str) -> str:
    return text.split("zzz")[0]


@pytest.mark.parametrize("defense", ["adashield", CALIBRATED], ids=["adashield", "cmrm-calibrated"])
def test_a_defense_answers_the_same_through_realign_run_and_through_lm_eval(llava, folder, tmp_path, defense):
    gens, record = realign_run(llava, folder, defense, tmp_path / "run")
    assert all(not g["error"] for g in gens)
    fitted = tmp_path / "fitted"
    quoted = defense.replace(",", ";")  # lm-eval's model_args split on commas: the spec's own are `;`
    result = lm_eval_run("realign", folder, f"model={llava},defense={quoted},device=cpu,cache_dir={fitted}")
    assert answers(result) == [cut(g["output"]) for g in gens]
    assert any(g["output"] for g in gens)
    ours = record["metrics"]["tiny_vqa/exact_match"]["value"]
    assert ours == pytest.approx(float(result["results"]["tiny_vqa"]["exact_match,none"]))
    info = result["config"]["realign"]
    assert info["defense"]["spec"] == defense and info["model"] == llava
    if defense == CALIBRATED:  # the calibration stage ran, fitted the same state and cached it where told
        names = sorted(p.name for p in fitted.glob("cmrm-*.safetensors"))
        assert names and names == sorted(p.name for p in (tmp_path / "run").rglob("cmrm-*.safetensors"))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_none_through_the_bridge_equals_lm_evals_hf_multimodal(tiny_model_path, folder, arch):
    path = tiny_model_path(arch)
    hf = lm_eval_run("hf-multimodal", folder, f"pretrained={path},device=cpu", batch_size=1, chat=True)
    ours = lm_eval_run("realign", folder, f"model={path},defense=none,device=cpu", batch_size=1, chat=True)
    assert answers(ours) == answers(hf)
    assert any(answers(hf))
    prompts = sorted(hf["samples"]["tiny_vqa"], key=lambda r: r["doc_id"])
    assert prompts[0]["arguments"][0][0].startswith("<s><|user|>")  # hf-multimodal applied the chat template
    key = "exact_match,none"
    assert ours["results"]["tiny_vqa"][key] == hf["results"]["tiny_vqa"][key]
    if arch == "llava":  # the backend templates either way: a 0-shot prompt is the same without the flag
        plain = lm_eval_run("realign", folder, f"model={path},defense=none,device=cpu", batch_size=1, chat=False)
        assert answers(plain) == answers(ours)


@pytest.fixture(scope="module")
def model(llava) -> RealignLM:
    return RealignLM(model=llava, defense="none", device="cpu")


def test_likelihoods_are_refused_with_the_reason(model):
    for method in (model.loglikelihood, model.loglikelihood_rolling):
        with pytest.raises(NotImplementedError, match="generation procedure .* no likelihood"):
            method([])


def test_bad_model_args_and_generation_kwargs_are_refused(llava, model):
    with pytest.raises(SpecError, match="no argument.*pretrained"):
        RealignLM(model=llava, pretrained="x")
    with pytest.raises(SpecError, match="integer batch size"):
        RealignLM(model=llava, batch_size="auto")
    with pytest.raises(SpecError, match="unknown defense"):
        RealignLM(model=llava, defense="no_such_defense")
    settings = {"until": [], "max_gen_toks": 4, "do_sample": False, "temperature": 0.0}
    params, until = model._decoding(dict(settings), "here")
    assert (params.max_new_tokens, params.do_sample, until) == (4, False, [])
    for extra, message in (({"num_beams": 3}, "beam search"), ({"repetition_penalty": 1.2}, "repetition_penalty"),
                           ({"do_sample": True, "temperature": 0.7, "top_k": 5}, "top_k")):
        with pytest.raises(DataError, match=message):
            model._decoding({**settings, **extra}, "here")
    sampled, _ = model._decoding({**settings, "do_sample": True, "temperature": 0.7, "top_p": 0.9}, "here")
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 0.7, 0.9)


def test_chat_turns_a_realign_sample_cannot_carry_are_refused(model):
    one = model.apply_chat_template([{"role": "user", "content": "<image>Hi"}])
    assert isinstance(one, ChatPrompt) and model._user_text(one, "doc") == "<image>Hi"
    system = model.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    with pytest.raises(DataError, match="one user turn .* --system_instruction"):
        model._user_text(system, "doc")
    with pytest.raises(DataError, match="prefilled answer"):
        model.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)


def test_lm_evals_command_line_runs_the_realign_model(llava, folder, tmp_path):
    from harness.cli import main  # `realign lm-eval ...`: harness.lm_eval_cli with lm-eval's arguments

    out = tmp_path / "out"
    code = main(["lm-eval", "run", "--model", "realign", "--model_args", f"model={llava},defense=adashield", "--device", "cpu",
                 "--tasks", "tiny_vqa", "--include_path", str(folder), "--batch_size", "2",
                 "--output_path", str(out), "--log_samples"])
    assert code == 0
    (results,) = list(out.rglob("results_*.json"))
    data = json.loads(results.read_text())
    assert data["config"]["model"] == "realign" and data["config"]["realign"]["defense"]["spec"] == "adashield"
    (samples,) = list(out.rglob("samples_tiny_vqa_*.jsonl"))
    cli_answers = [json.loads(line)["resps"][0][0] for line in samples.read_text().splitlines()]
    direct = lm_eval_run("realign", folder, f"model={llava},defense=adashield,device=cpu")
    assert cli_answers == answers(direct)


def test_an_unreadable_image_is_one_empty_answer_not_a_failed_evaluation(model):
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["zzz"], "max_gen_toks": 4, "do_sample": False}
    good, bad = D.images()[0], {"bytes": b"not a picture", "path": None}
    requests = [Instance("generate_until", {}, ("<image>Hi", kwargs, {"visual": [image]}), 0, ("t", i, 1))
                for i, image in enumerate([good, bad, good])]
    out = model.generate_until(requests, disable_tqdm=True)
    assert out[1] == "" and out[0] == out[2] and out[0]
