"""Persistent verdict cache: a judge never pays twice for the same verdict.

A verdict is keyed by (judge identity, template hash, sample id, response hash), so changing
the judge model, its rubric or the answer makes a new key, while a re-run, a resumed crash or a
second run directory over the same outputs gets the stored verdict for free.

Why SQLite in WAL mode:
- every `put` is its own committed transaction, so a process killed mid-run keeps every verdict
  it finished (WAL recovery on the next open discards only an unfinished write);
- several processes and threads may read and write the same file at once: WAL lets readers run
  beside the single writer, and `busy_timeout` makes a writer wait for its turn instead of
  failing;
- `synchronous=NORMAL` skips the fsync per commit: a killed *process* loses nothing committed,
  only a power cut can drop the last few verdicts (which are then simply asked again).

The cache is an optimisation, never a source of truth that can hurt a run. `VerdictCache` is the
plain SQLite handle (its methods raise); judges use it through `FailSoftCache`, which turns any
failure to open, read or write (full disk, unwritable or misplaced folder, corrupt file) into one
warning naming the file and the reason, after which that judge runs without the cache: reads are
misses, writes are skipped, so verdicts are exactly those of `cache=false`. Judge errors caused by
the transport (timeouts, 5xx after retries) are not cached, so a re-run asks again; verdicts the
judge actually gave (including an unreadable reply) are.

Location: `$REALIGN_CACHE/judge-verdicts.sqlite`, else `~/.cache/realign/judge-verdicts.sqlite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.schema import dumps

log = logging.getLogger(__name__)

CACHE_ENV = "REALIGN_CACHE"
CACHE_FILE = "judge-verdicts.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key        TEXT PRIMARY KEY,
    judge      TEXT NOT NULL,
    sample_id  TEXT NOT NULL,
    label      TEXT NOT NULL,
    raw        TEXT,
    detail     TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


def default_cache_dir() -> Path:
    """`$REALIGN_CACHE` if set, else `~/.cache/realign` (the same root other caches use)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "realign"


def default_cache_path() -> Path:
    return default_cache_dir() / CACHE_FILE


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(judge_key: dict[str, Any] | str, template_hash: str, sample_id: str, response: str) -> str:
    """The cache key: judge identity (the parts that change verdicts) + template + sample + response."""
    judge_part = judge_key if isinstance(judge_key, str) else dumps(judge_key)
    material = dumps({"judge": judge_part, "template": template_hash, "sample": sample_id,
                      "response": text_hash(response)})
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


@dataclass
class CachedVerdict:
    label: str
    raw: str | None
    detail: dict[str, Any] = field(default_factory=dict)


class VerdictCache:
    """A thread-safe handle on the cache file; one per judge instance is enough. Its methods raise
    on failure (sqlite3.Error, OSError); judges reach it through `FailSoftCache`."""

    def __init__(self, path: str | Path | None = None, busy_timeout: float = 60.0) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, each statement is its own transaction.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            self._init(busy_timeout)
        except sqlite3.Error:
            self._conn.close()  # e.g. "file is not a database", "database or disk is full"
            raise

    def _init(self, busy_timeout: float) -> None:
        deadline = time.monotonic() + busy_timeout
        while True:  # two processes creating the file at the same moment may briefly collide
            try:
                self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute(SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get(self, key: str) -> CachedVerdict | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedVerdict]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, CachedVerdict] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT key, label, raw, detail FROM verdicts WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, label, raw, detail in rows:
                    out[key] = CachedVerdict(label, raw, json.loads(detail))
        return out

    def put(self, key: str, judge: str, sample_id: str, label: str, raw: str | None, detail: dict[str, Any]) -> bool:
        """Store one verdict (the first writer of a key wins); a failed write raises sqlite3.Error."""
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO verdicts (key, judge, sample_id, label, raw, detail, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, judge, sample_id, label, raw, dumps(detail), time.time()),
            )
        return True

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def integrity_ok(self) -> bool:
        with self._lock:
            return self._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> VerdictCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: What a broken cache raises: SQLite errors (full disk, locked past the timeout, not a database),
#: OS errors (the folder cannot be made or written), ValueError (a stored detail that is not JSON).
CACHE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, ValueError)


class FailSoftCache:
    """The judge's view of the cache: opened on first use, and turned off for good by the first
    failure, with one warning (file and reason). Why: a judge must never stop for its cache, and
    a cache that failed once (a full disk) would only fail again or flood the log."""

    def __init__(self, path: str | Path | None = None, opener: Callable[[Path], VerdictCache] = VerdictCache) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self._opener = opener
        self._cache: VerdictCache | None = None
        self._lock = threading.Lock()
        self.failure: str | None = None  # why the cache is off, once it is

    def _open(self) -> VerdictCache | None:
        with self._lock:
            if self._cache is None and self.failure is None:
                try:
                    self._cache = self._opener(self.path)
                except CACHE_ERRORS as exc:
                    self._fail_locked("cannot be opened", exc)
            return self._cache

    def _fail(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._fail_locked(what, exc)

    def _fail_locked(self, what: str, exc: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = f"{what}: {type(exc).__name__}: {exc}"
        log.warning("verdict cache %s %s; judging continues without the cache (nothing read from it or "
                    "written to it; verdicts are unchanged)", self.path, self.failure)
        cache, self._cache = self._cache, None
        if cache is not None:
            try:
                cache.close()
            except CACHE_ERRORS:
                pass

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedVerdict]:
        """Stored verdicts by key; {} (all misses) when the cache is off or the read fails."""
        cache = self._open()
        if cache is None:
            return {}
        try:
            return cache.get_many(keys)
        except CACHE_ERRORS as exc:
            self._fail("read failed", exc)
            return {}

    def put(self, key: str, judge: str, sample_id: str, label: str, raw: str | None, detail: dict[str, Any]) -> bool:
        """Store one verdict; False (skipped) when the cache is off or the write fails."""
        cache = self._open()
        if cache is None:
            return False
        try:
            return cache.put(key, judge, sample_id, label, raw, detail)
        except CACHE_ERRORS as exc:
            self._fail("write failed", exc)
            return False

    def close(self) -> None:
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()
