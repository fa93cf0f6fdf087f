"""The attack axis without a model: config and identity, refusal of attacks on utility tasks,
`realign list attacks`, and results written before attacks existed (tests/data/pre_attack_run)
still loading, reporting, gating, comparing, judging and resuming as attack `none`.

tests/data/pre_attack_run was written by realign at commit 957904d (the last commit before the
run axis existed) with `realign run --model openai:model=vlm,base_url=<local test server>,...
--task demo:images=none --judge keywords --limit 6`; its records carry no `attack` anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.registry import tasks
from harness.runner import Plan
from harness.schema import RunConfig
from harness.spec import SpecError
from tests.fake_openai import fake_openai, last_user_text
from tests.fixtures_benchmarks import write_sqa_release

REPO = Path(__file__).resolve().parents[1]
OLD_RUN = REPO / "tests" / "data" / "pre_attack_run"
JBB = REPO / "tests" / "data" / "behaviors" / "jbb"


def test_config_defaults_to_no_attack_and_keeps_old_identities():
    config = RunConfig(models=["m"], defenses=["none"], tasks=["demo"])
    assert config.attacks == ["none"]
    assert "attacks" not in config.generation_identity()  # a directory written before attacks resumes
    attacked = RunConfig(models=["m"], defenses=["none"], tasks=["demo"], attacks=["none", "figstep"])
    assert attacked.generation_identity()["attacks"] == ["none", "figstep"]
    assert RunConfig.from_json(json.loads((OLD_RUN / "run.json").read_text())["config"]).attacks == ["none"]
    with pytest.raises(SpecError, match="--attack"):
        RunConfig(models=["m"], defenses=["none"], tasks=["demo"], attacks=[])


def test_utility_task_refuses_an_attack_with_exit_2_and_writes_nothing(tmp_path, capsys):
    data = write_sqa_release(tmp_path / "sqa")
    task = f"scienceqa:source=dir,data_dir={data}"
    out = tmp_path / "run"
    code = main(["run", "--model", "openai:model=vlm,base_url=http://127.0.0.1:9/v1", "--task", task,
                 "--attack", "none", "figstep", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1
    assert "not attackable" in err and repr(task) in err and "'figstep'" in err
    # attack `none` is the task as released: every task accepts it
    Plan.build(RunConfig(models=["openai:model=vlm,base_url=http://127.0.0.1:9/v1"], defenses=["none"], tasks=[task]))
    assert main(["run", "--model", "m", "--task", "demo", "--attack", "nope", "--out", str(out)]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err and not out.exists()


def test_list_attacks_shows_params_and_cost(capsys):
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attacks:\n")
    assert "  none " in out and "  figstep " in out
    assert "text: Literal['auto', 'query'] = 'auto'" in out
    assert "(cost with default parameters: 0 model calls of its own per sample)" in out
    # white-box attacks count their optimisation passes at their default steps
    lines = out.splitlines()
    cost = {lines[i].split()[0]: lines[i + 1] for i in range(len(lines) - 1) if lines[i + 1].startswith("      (cost")}
    assert "500 optimisation passes" in cost["pgd"] and "per batch of samples" in cost["pgd"]
    assert "5000 optimisation passes" in cost["visual_adv"] and "once per model and defense" in cost["visual_adv"]
    assert "0 model calls" in cost["figstep"]


@pytest.fixture()
def old_run(tmp_path: Path) -> Path:
    """A writable copy of the run written before attacks existed."""
    return Path(shutil.copytree(OLD_RUN, tmp_path / "old"))


def _spec(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["config"]["models"][0]


def test_results_written_before_attacks_read_as_attack_none(old_run, tmp_path, capsys):
    old = json.loads((old_run / "results.json").read_text())["results"]
    assert all("attack" not in r and "attack" not in r["identity"] for r in old)

    assert main(["report", str(old_run)]) == 0
    table = capsys.readouterr().out
    assert "| model | defense |" in table and "attack" not in table  # no attack column without attacks

    assert main(["report", str(old_run), "--matrix", "--json", str(tmp_path / "m.json")]) == 0
    assert "| none | 0.667 [0.33, 1.00] |" in capsys.readouterr().out
    (table_json,) = json.loads((tmp_path / "m.json").read_text())["tables"]
    assert table_json["attacks"] == ["none"] and table_json["defenses"] == ["none"]
    assert table_json["cells"]["none"]["none"]["value"] == old[0]["metrics"]["asr"]["value"]

    assert main(["leaderboard", str(old_run), "--out", str(tmp_path / "lb")]) == 0
    doc = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert doc["schema_version"] == "1.0" and all("attack" not in e for e in doc["entries"])

    gate = ["--max-asr-increase", "0"]
    assert main(["gate", "--baseline", str(old_run / "results.json"), "--run", str(old_run), *gate]) == 0
    assert main(["gate", "--baseline", str(tmp_path / "lb" / "leaderboard.json"), "--run", str(old_run), *gate]) == 0
    assert main(["compare", str(old_run), str(old_run), "--attack-a", "none", "--format", "json"]) == 0
    capsys.readouterr()


def test_run_written_before_attacks_resumes_and_rejudges_unchanged(old_run, capsys):
    """The same command resumes it: nothing is regenerated (the model's server is long gone, so any
    generation would be an error and exit 1), and the records gain `attack: none` only."""
    generations = sorted(old_run.rglob("generations.jsonl"))
    before = [p.read_bytes() for p in generations]
    old = json.loads((old_run / "results.json").read_text())["results"]
    args = ["run", "--model", _spec(old_run), "--task", "demo:images=none", "--judge", "keywords", "--limit", "6",
            "--out", str(old_run), "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert [p.read_bytes() for p in generations] == before
    assert sorted(old_run.rglob("generations.jsonl")) == generations  # no new cell directory
    (new,) = json.loads((old_run / "results.json").read_text())["results"]
    assert new["attack"] == "none" and new["identity"]["attack"] == {"spec": "none"}
    assert new["metrics"] == old[0]["metrics"]
    assert main(["judge", str(old_run), "--judge", "keywords", "--quiet"]) == 0
    (again,) = json.loads((old_run / "results.json").read_text())["results"]
    assert again["attack"] == "none" and again["metrics"] == old[0]["metrics"]
    info = json.loads((old_run / "run.json").read_text())
    assert "attacks" not in info["generation_identity"] and len(info["sessions"]) == 2


def test_figstep_on_a_harmful_behaviour_set(tmp_path, monkeypatch):
    """JBB-Behaviors (fixture rows) under figstep: the model gets FigStep's prompt and an image,
    the records keep each Goal as the plain request."""
    monkeypatch.setenv("REALIGN_TEST_AXIS_KEY", "sk-axis")
    with fake_openai(reply=lambda body: f"Sure: {last_user_text(body)}") as srv:
        model = f"openai:model=vlm,base_url={srv.base_url},api_key_env=REALIGN_TEST_AXIS_KEY"
        assert main(["run", "--model", model, "--task", f"jbb:path={JBB}", "--attack", "figstep", "--out",
                     str(tmp_path / "r"), "--quiet"]) == 0
        bodies = [r.body for r in srv.chat_requests]
    goals = [s.text for s in tasks.build(f"jbb:path={JBB}").samples()]
    assert len(bodies) == len(goals) > 0
    assert all(any(p.get("type") == "image_url" for p in b["messages"][-1]["content"]) for b in bodies)
    (rec,) = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    assert rec["attack"] == "figstep" and rec["metrics"]["asr"]["value"] == 1.0
    gens = [json.loads(x) for x in next((tmp_path / "r").rglob("generations.jsonl")).read_text().splitlines()]
    assert [g["sample"]["meta"]["query"] for g in gens] == goals
    assert {g["sample"]["meta"]["attack"]["typeset_from"] for g in gens} == {"query"}
