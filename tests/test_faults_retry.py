"""Failures are not permanent, and exit codes say what happened.

A model behind the local OpenAI-compatible test server fails some requests (HTTP 500, 429, timeouts,
garbage bodies); so does an LLM judge on the same server. The first run finishes with errors and
exit status 1, naming the counts per cell; once the fault is gone, the same command retries every
failed generation and verdict, supersedes the failed records without duplicating an id, and exits
0 with outputs equal to a run that never failed. `--no-retry-errors` keeps the failures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from tests.fake_openai import fake_openai, last_user_text

TASK = "demo"
N = 12


def reply(body: dict[str, Any]) -> str:
    text = last_user_text(body)
    if "<<<ANSWER" in text:  # the LLM judge's prompt: a verdict word
        return "unsafe" if "Sure" in text.split("<<<ANSWER", 1)[1] else "safe"
    return "I cannot help with that." if "bomb" in text else f"Sure: {text[:12]}"


def faulty(kinds: tuple[str, ...]):
    """A fault for every third request whose text mentions the letter 'e' (deterministic by content)."""
    def pick(index: int, body: dict[str, Any]) -> str | None:
        text = last_user_text(body)
        return kinds[index % len(kinds)] if "e" in text and sum(map(ord, text)) % 3 == 0 else None
    return pick


def args(server: Any, out: Path, *extra: str) -> list[str]:
    model = f"openai:model=vlm,base_url={server.base_url},max_retries=0,timeout=2,backoff=0"
    judge = f"llm:model=judge,base_url={server.base_url},max_retries=0,timeout=2,backoff=0,cache=false"
    return ["run", "--model", model, "--task", TASK, "--judge", "keywords", judge, "--limit", str(N),
            "--batch-size", "4", "--max-new-tokens", "16", "--out", str(out), "--quiet", *extra]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outputs(out: Path) -> dict[str, str]:
    (gen,) = out.rglob("generations.jsonl")
    return {r["sample_id"]: r["output"] for r in records(gen)}


@pytest.mark.parametrize("kinds", [("500",), ("429", "garbage"), ("timeout",)])
def test_failed_generations_and_verdicts_are_retried_on_rerun(tmp_path: Path, capsys, kinds) -> None:
    with fake_openai(reply=reply, faults=faulty(kinds), stall_seconds=4) as server:
        assert main(args(server, tmp_path / "run")) == 1
        err = capsys.readouterr().err
        assert "finished with errors" in err and "generation error(s)" in err
        (gen,) = (tmp_path / "run").rglob("generations.jsonl")
        failed = {r["sample_id"] for r in records(gen) if r["error"]}
        assert failed, "the fault schedule must hit some generations"
        verdicts = list((tmp_path / "run").rglob("verdicts/*.jsonl"))
        assert any(r["label"] == "error" for v in verdicts for r in records(v))

        with pytest.MonkeyPatch.context() as mp:  # --no-retry-errors keeps them, asks nothing
            before = server.request_count
            mp.setattr(server, "faults", None)
            assert main(args(server, tmp_path / "run", "--no-retry-errors")) == 1
            assert server.request_count == before
            capsys.readouterr()
            assert main(args(server, tmp_path / "run")) == 0  # the fault is gone: everything retried

        lines = records(gen)
        assert len(lines) == N and len({r["sample_id"] for r in lines}) == N and not any(r["error"] for r in lines)
        for v in verdicts:
            got = records(v)
            assert len(got) == N and len({r["sample_id"] for r in got}) == N
            assert not any(r["label"] == "error" for r in got)
        results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
        assert all(r["generation_errors"] == 0 and r["judge_errors"] == 0 for r in results)

        server.faults = None
        assert main(args(server, tmp_path / "clean")) == 0
    assert outputs(tmp_path / "run") == outputs(tmp_path / "clean")
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())["results"]
    assert [r["metrics"] for r in results] == [r["metrics"] for r in clean]


def test_a_run_where_everything_failed_exits_1(tmp_path: Path, capsys) -> None:
    with fake_openai(reply=reply, faults=lambda i, body: "500") as server:
        assert main(args(server, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert f"{N} generation error(s), {N} judge error(s) of {N}" in err


def test_errors_are_never_counted_as_safe(tmp_path: Path) -> None:
    with fake_openai(reply=reply, faults=faulty(("500",))) as server:
        main(args(server, tmp_path / "run"))
    for rec in json.loads((tmp_path / "run" / "results.json").read_text())["results"]:
        scored = rec["metrics"]["asr"]["n"] if "asr" in rec["metrics"] else None
        assert scored is not None and scored + rec["judge_errors"] == rec["n"]
