"""AdvBench's harmful behaviours as plain requests: 520 goals, each with its affirmative target.

Zou et al., "Universal and Transferable Adversarial Attacks on Aligned Language Models" (arXiv
2307.15043); release github.com/llm-attacks/llm-attacks, file `data/advbench/harmful_behaviors.csv`,
columns `goal` (the request) and `target` (the affirmative opening, "Sure, here is ...", that GCG
and the white-box image attacks optimise towards). Licence MIT (**unverified**: stated by secondary
sources; the release's LICENSE file was not read when this was written).

AdvBench has no categories, so samples have none (`Sample.category` is None) and the metrics are
overall only (`asr`, `refused`). Its rows have no id either: a sample's id is its row number,
`advbench/<row>` from 0, which is stable for the pinned file (a goal written twice would stay two
samples, as the file has it).

Data: `path=` (the CSV, or a copy of the repository or of its data/advbench folder), else the raw
file from GitHub at RELEASE_COMMIT (`revision=` moves the pin, `base_url=` a mirror), cached once.
GitHub is not the hub: without a network, pass `path=`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness.errors import DataError
from harness.registry import task
from harness.schema import Sample
from tasks.behaviors import BehaviorSet, is_commit, local_file, read_csv, release_file, sha256

BASE_URL = "https://raw.githubusercontent.com/llm-attacks/llm-attacks"
#: A commit of the release cited by third-party code that links the file at it; **unverified** here
#: (no network when this was written): move it with `revision=`.
RELEASE_COMMIT = "0f505d82e25c15a83b6954db28191b69927a255d"
FILE = "data/advbench/harmful_behaviors.csv"
COLUMNS = ("goal", "target")
#: Rows in the release's file (the paper's 520 harmful behaviours); identity() says whether the file read has as many.
RELEASE_ROWS = 520


@task("advbench")
class AdvBench(BehaviorSet):
    """AdvBench harmful behaviours: 520 requests with affirmative targets (ASR, no categories)."""

    homepage = "https://github.com/llm-attacks/llm-attacks"
    licence = "MIT"
    licence_verified = False

    @dataclass
    class Params:
        path: str | None = None
        revision: str | None = None
        base_url: str = BASE_URL
        cache_dir: str | None = None

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if params.path and params.revision:
            raise DataError("advbench: revision= pins the download; a path= copy is read as it is")
        self._url: str | None = None
        self._rows: int | None = None

    @property
    def revision(self) -> str:
        return self.params.revision or RELEASE_COMMIT

    def csv_path(self) -> Path:
        if self.params.path:
            return local_file("advbench", self.params.path, [FILE, "harmful_behaviors.csv"])
        path, self._url = release_file("advbench", self.params.base_url, self.revision, FILE, self.params.cache_dir)
        return path

    def samples(self) -> Iterator[Sample]:
        rows = read_csv(self.csv_path(), COLUMNS, "AdvBench harmful behaviours")
        self._rows = len(rows)
        for row in rows:
            yield self.request(f"advbench/{row.number}", row.need("goal"), None,
                               target=row.need("target"), row=row.number)

    def identity(self) -> dict[str, Any]:
        path = self.csv_path()
        rows = self._rows if self._rows is not None else len(read_csv(path, COLUMNS, "AdvBench harmful behaviours"))
        where: dict[str, Any] = {"file": str(path.resolve()), "sha256": sha256(path), "rows": rows,
                                 "rows_match_release": rows == RELEASE_ROWS}
        if self.params.path:
            where["path"] = str(Path(self.params.path).expanduser().resolve())
        else:
            where["release"] = {"url": self._url, "revision": self.revision, "pinned": is_commit(self.revision)}
        return self.described(**where)
