"""Re-judging saved generations, judge agreement, the CLI commands, and a killed re-judge."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai import fake_openai  # noqa: E402
from harness.cli import main  # noqa: E402
from harness.errors import RunDirError  # noqa: E402
from harness.registry import tasks  # noqa: E402
from harness.agreement import agreement, cohen_kappa, format_agreement, split_judge_list  # noqa: E402
from harness.rejudge import rejudge  # noqa: E402
from harness.schema import Generation, RunConfig  # noqa: E402
from harness.store import RunDir  # noqa: E402
from judges.cache import CACHE_FILE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = "demo:images=none"  # 12 harmful-style + 12 benign requests, text only


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def answer_for(sample_id: str, kind: str, i: int) -> str:
    if kind == "harmful":
        return f"Sure, step 1 for request {i}: gather" if i % 2 == 0 else f"I'm sorry, I can't help with {i}."
    return f"Happy to help with request {i}: here is how."


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory as the runner leaves it: run.json and one cell of saved generations."""
    out = tmp_path / "run"
    rundir = RunDir(out)
    config = RunConfig(models=["scripted-model"], defenses=["none"], tasks=[TASK], judges=["keywords"])
    rundir.write_run_info({"config": config.to_json(), "generation_identity": config.generation_identity(),
                           "backends": {"scripted-model": {"spec": "scripted-model", "tag": "x"}}})
    cell = rundir.cell("scripted-model", "none", TASK)
    records = []
    for s in tasks.build(TASK).samples():
        i = int(s.id.split("/")[2])
        gen = Generation(s.id, answer_for(s.id, s.meta["kind"], i), trace={}, tokens={"completion": 5})
        if s.id == "demo/benign/11/none":
            gen = Generation(s.id, "", error="image: cannot be decoded")
        records.append({**gen.to_json(), "sample": s.to_json()})
    cell.append_generations(records)
    rundir.write_results([{"model": "scripted-model", "defense": "none", "task": TASK, "judge": "other-judge",
                           "n": 24, "metrics": {}, "identity": {"model": {"spec": "from-results"}}}])
    return out


def judge_reply(body: dict[str, Any]) -> str:
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return "unsafe" if "Sure, step 1" in user.split("<<<ANSWER", 1)[1] else "safe"


def llm_spec(server: Any, **kw: Any) -> str:
    opts = {"model": "judge-m", "base_url": server.base_url, "backoff": "0.01", **kw}
    return "llm:" + ",".join(f"{k}={v}" for k, v in opts.items())


def test_rejudge_scores_saved_generations_and_updates_results(run_dir: Path):
    with fake_openai(reply=judge_reply) as srv:
        spec = llm_spec(srv)
        records = rejudge(run_dir, ["keywords", spec], progress=False)
        assert srv.request_count == 23  # 24 samples, one failed generation is not sent
        by_judge = {r["judge"]: r for r in records}
        assert set(by_judge) == {"keywords", spec}
        for rec in records:
            assert rec["metrics"]["asr/none"]["value"] == 0.5 and rec["n"] == 24 and rec["generation_errors"] == 1
            assert rec["judge_errors"] == 1 and rec["identity"]["model"] == {"spec": "from-results"}
        kw = by_judge["keywords"]["metrics"]["benign_refusal/none"]["value"]
        assert kw == 0.0
        llm = by_judge[spec]
        assert llm["identity"]["judge_tokens"]["requests"] == 23 and llm["identity"]["judge_tokens"]["prompt_tokens"] > 0
        stored = RunDir(run_dir).read_results()
        assert [r["judge"] for r in stored] == ["other-judge", "keywords", spec]
        # Again: verdict files are complete, nothing is asked, records are replaced, not added.
        rejudge(run_dir, [spec], progress=False)
        assert srv.request_count == 23
        assert [r["judge"] for r in RunDir(run_dir).read_results()] == ["other-judge", "keywords", spec]
        # The verdict files alone lost (e.g. deleted): the cache still makes it free.
        for f in (run_dir / "scripted-model").rglob("verdicts/llm*.jsonl"):
            f.unlink()
        again = rejudge(run_dir, [spec], progress=False)[0]
        assert srv.request_count == 23 and again["identity"]["judge_tokens"]["cached_verdicts"] == 23
        assert again["metrics"]["asr"]["value"] == 0.5


def test_garbage_replies_become_errors_counted_in_results(run_dir: Path):
    with fake_openai(reply=lambda body: "Let me think about that.") as srv:
        rec = rejudge(run_dir, [llm_spec(srv)], progress=False)[0]
        assert srv.request_count == 46  # each asked twice (the reminder), then error
    assert rec["judge_errors"] == 24  # 23 unreadable + 1 failed generation
    assert rec["metrics"]["asr"]["n"] == 0
    verdicts = [json.loads(line) for line in next(run_dir.rglob("verdicts/llm*.jsonl")).read_text().splitlines()]
    assert {v["label"] for v in verdicts} == {"error"} and all(v["raw"] for v in verdicts if v["detail"].get("replies"))


def test_agreement_kappa_and_confusion_matrix(run_dir: Path):
    with fake_openai(reply=judge_reply) as srv:
        spec = llm_spec(srv)
        rejudge(run_dir, ["keywords", spec], progress=False)
    report = agreement(run_dir, "keywords", spec)
    # keywords: 6 harmful compliances + 11 benign answers unsafe, 6 refusals; llm: only the 6 compliances.
    assert report["matrix"] == [[6, 11], [0, 6]]
    assert report["compared"] == 23 and report["errors"] == {"a_only": 0, "b_only": 0, "both": 1}
    po, pe = 12 / 23, (17 * 6 + 6 * 17) / 23**2
    assert report["kappa"] == pytest.approx((po - pe) / (1 - pe))
    text = format_agreement(report)
    assert "Cohen's kappa" in text and "A unsafe" in text and f"{report['kappa']:.3f}" in text
    same = agreement(run_dir, spec, spec)
    assert same["kappa"] == 1.0 and same["matrix"] == [[6, 0], [0, 17]]
    with pytest.raises(RunDirError, match="judged here"):
        agreement(run_dir, "keywords", "keywords:preset=broad")


def test_kappa_and_judge_list_helpers():
    assert cohen_kappa([[5, 0], [0, 5]]) == 1.0
    assert cohen_kappa([[10, 0], [0, 0]]) is None  # one label everywhere: undefined
    assert cohen_kappa([[0, 0], [0, 0]]) is None
    assert cohen_kappa([[20, 5], [10, 15]]) == pytest.approx(0.4)
    assert split_judge_list("keywords,llm:model=m,base_url=http://h:1/v1") == ["keywords", "llm:model=m,base_url=http://h:1/v1"]
    assert split_judge_list("keywords:preset=broad,llamaguard:model=x") == ["keywords:preset=broad", "llamaguard:model=x"]


def test_cli_judge_and_agree(run_dir: Path, capsys: pytest.CaptureFixture[str]):
    # The run holds one failed generation: judging finishes, but with an error per judge (exit 1).
    assert main(["judge", str(run_dir), "--judge", "keywords", "keywords:preset=broad", "--quiet"]) == 1
    out = capsys.readouterr()
    assert "keywords:preset=broad" in out.out
    assert "1 generation error(s), 1 judge error(s) of 24" in out.err
    assert main(["agree", str(run_dir), "--judges", "keywords,keywords:preset=broad"]) == 0
    assert "Cohen's kappa" in capsys.readouterr().out
    assert main(["agree", str(run_dir), "--judges", "keywords,keywords:preset=broad", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["compared"] == 23
    assert main(["agree", str(run_dir), "--judges", "keywords"]) == 2
    assert main(["judge", str(run_dir / "nope"), "--judge", "keywords"]) == 2


CHILD = """
import sys
from harness.rejudge import rejudge
rejudge(sys.argv[1], [sys.argv[2]], progress=False)
"""


def test_killed_rejudge_resumes_without_losing_or_repaying(run_dir: Path, cache_dir: Path):
    answered_first = 8
    stalled = {"on": True}

    def faults(index: int, body: dict[str, Any]) -> str | None:
        return "timeout" if stalled["on"] and index >= answered_first else None

    with fake_openai(reply=judge_reply, faults=faults, stall_seconds=25) as srv:
        spec = llm_spec(srv, concurrency=4, timeout=60)
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), spec], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 60
        db = cache_dir / CACHE_FILE
        while time.monotonic() < deadline:  # 8 verdicts cached, 4 requests hanging: kill it there
            if srv.request_count >= answered_first + 4 and db.exists():
                with sqlite3.connect(db) as conn:
                    if conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] >= answered_first:
                        break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        first = srv.chat_requests
        answered = {json.dumps(r.body, sort_keys=True) for r in first if r.fault is None}
        assert len(answered) == answered_first and not list(run_dir.rglob("verdicts/llm*.jsonl"))

        stalled["on"] = False
        srv.reset()
        rec = rejudge(run_dir, [spec], progress=False)[0]
        second = {json.dumps(r.body, sort_keys=True) for r in srv.chat_requests}
    assert not answered & second  # no verdict paid for twice
    assert srv.request_count == 23 - answered_first
    verdicts = next(run_dir.rglob("verdicts/llm*.jsonl")).read_text().splitlines()
    assert len(verdicts) == 24 and rec["metrics"]["asr"]["value"] == 0.5  # none lost
    assert sum(json.loads(v)["detail"].get("cached", False) for v in verdicts) == answered_first
