"""The judge cache never stops a run: every way the cache can fail costs one warning, not verdicts.

Each case breaks the cache differently (folder is a file, folder under a file, unwritable folder,
corrupt file, "database or disk is full" on connect, on read and on write) and checks that the LLM
judge, against the local OpenAI-compatible server, returns exactly the verdicts of `cache=false`
and logs exactly one warning naming the cache file and the reason, however often it is asked.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai import FakeOpenAIServer, fake_openai

from harness.registry import judges
from harness.schema import Generation, Sample
from judges.cache import CACHE_FILE, VerdictCache

DISK_FULL = "database or disk is full"


def _reply(body: dict[str, Any]) -> str:
    """Unsafe for even-numbered answers, safe for odd ones: verdicts that depend on the answer."""
    text = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return "unsafe" if any(f"answer {i}\n" in text for i in (0, 2, 4)) else "safe"


def _judge(server: FakeOpenAIServer, **kw: str) -> Any:
    opts = {"model": "m", "base_url": server.base_url, "backoff": "0.01", "timeout": "5", **kw}
    return judges.build("llm:" + ",".join(f"{k}={v}" for k, v in opts.items()))


def _pairs(n: int = 5) -> tuple[list[Sample], list[Generation]]:
    samples = [Sample(f"s{i}", f"request {i}") for i in range(n)]
    return samples, [Generation(s.id, f"answer {i}") for i, s in enumerate(samples)]


def _record(verdicts: list[Any]) -> list[tuple[Any, ...]]:
    return [(v.sample_id, v.label, v.raw, v.detail) for v in verdicts]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "judges.cache" and r.levelno >= logging.WARNING]


def _check_judging_survives(caplog: pytest.LogCaptureFixture, path: Path, reason: str) -> None:
    """Twice through one judge: verdicts as with cache=false, one warning naming `path` and `reason`."""
    with fake_openai(reply=_reply) as srv:
        want = _record(_judge(srv, cache="false").verdicts(*_pairs()))
        assert [w[1] for w in want] == ["unsafe", "safe", "unsafe", "safe", "unsafe"]
        caplog.clear()
        judge = _judge(srv)
        with caplog.at_level(logging.WARNING):
            assert _record(judge.verdicts(*_pairs())) == want
            assert _record(judge.verdicts(*_pairs())) == want  # asked again: no hit, no second warning
    (warning,) = _warnings(caplog)
    message = warning.getMessage()
    assert str(path) in message and reason in message, message
    assert judge.usage.cache_hits == 0 and judge.usage.verdicts == 10


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Path]:
    """Point $REALIGN_CACHE at a folder; returns the cache file the judge will try."""
    def point(folder: Path) -> Path:
        monkeypatch.setenv("REALIGN_CACHE", str(folder))
        return folder / CACHE_FILE
    return point


def test_cache_folder_is_a_file(tmp_path: Path, cache_root: Callable[[Path], Path], caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    _check_judging_survives(caplog, cache_root(blocker), "cannot be opened")


def test_cache_folder_under_a_file(tmp_path: Path, cache_root: Callable[[Path], Path], caplog: pytest.LogCaptureFixture) -> None:
    """Fails for root too (permissions do not matter: a file cannot hold a folder)."""
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    _check_judging_survives(caplog, cache_root(blocker / "cache"), "NotADirectoryError")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_cache_folder_not_writable(tmp_path: Path, cache_root: Callable[[Path], Path], caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        _check_judging_survives(caplog, cache_root(folder), "cannot be opened")
    finally:
        folder.chmod(0o700)


def test_corrupt_cache_file(tmp_path: Path, cache_root: Callable[[Path], Path], caplog: pytest.LogCaptureFixture) -> None:
    path = cache_root(tmp_path / "cache")
    path.parent.mkdir()
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    _check_judging_survives(caplog, path, "not a database")


def test_disk_full_on_connect(tmp_path: Path, cache_root: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    calls: list[object] = []

    def full(*args: object, **kwargs: object) -> sqlite3.Connection:
        calls.append(args)
        raise sqlite3.OperationalError(DISK_FULL)

    monkeypatch.setattr(sqlite3, "connect", full)
    _check_judging_survives(caplog, cache_root(tmp_path / "cache"), DISK_FULL)
    assert len(calls) == 1  # a cache that failed is not tried again


def test_disk_full_on_read_makes_every_lookup_a_miss(tmp_path: Path, cache_root: Callable[[Path], Path],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = cache_root(tmp_path / "cache")
    with fake_openai(reply=_reply) as srv:  # fill the cache, so a working read would hit
        _judge(srv).verdicts(*_pairs())
    with VerdictCache(path) as cache:
        assert len(cache) == 5

    def full(self: VerdictCache, keys: object) -> dict[str, object]:
        raise sqlite3.OperationalError(DISK_FULL)

    monkeypatch.setattr(VerdictCache, "get_many", full)
    _check_judging_survives(caplog, path, DISK_FULL)


def test_disk_full_on_write_skips_every_later_write(tmp_path: Path, cache_root: Callable[[Path], Path],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = cache_root(tmp_path / "cache")
    writes: list[str] = []

    def full(self: VerdictCache, key: str, *args: object) -> bool:
        writes.append(key)
        raise sqlite3.OperationalError(DISK_FULL)

    monkeypatch.setattr(VerdictCache, "put", full)
    _check_judging_survives(caplog, path, DISK_FULL)
    assert len(writes) == 1  # the first failure turned the cache off
