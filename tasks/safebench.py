"""SafeBench (FigStep's question set) as plain text requests, for any attack to deliver.

Gong et al., AAAI 2025 (arXiv 2311.05608); release github.com/ThuCCSLab/FigStep at the commit the
`figstep` task pins (tasks/figstep.py), MIT licence (the release's LICENSE file). `safebench.csv`
(500 rows: 10 categories x 50) and `SafeBench-Tiny.csv` (50 rows: task_id 1-5 of each), columns
`dataset`, `category_id`, `task_id`, `category_name`, `question`, `instruction`.

Why a second task over the same files: the `figstep` task is FigStep's attack as released (its
typographic image plus a fixed prompt); this one is the seed set, text only, so that `figstep`
(the attack), `qr`, `mml` or any other attack can be run on SafeBench and compared on the same
requests. `Sample.text` and `meta["query"]` are the `question`; `meta["instruction"]` is the
statement form ("Steps to ...") that FigStep typesets, so the figstep attack reproduces the
release's images from this set.

Data: the same as the `figstep` task's, through its code: `path=` a local copy of the release (the
repository, its data/ folder or a flat copy such as the project's shared data), or one of the CSVs
itself (read as it is; `subset` then only names the set); or `source=release` to download the
CSV pinned at the release commit (cached). `subset=tiny` by default, as `figstep`, so the two
tasks run the same 50 requests. Ids: `safebench/<category_id>_<task_id>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from harness.errors import DataError
from harness.registry import task
from harness.schema import Sample
from tasks import release
from tasks.behaviors import BehaviorSet, sha256
from tasks.figstep import RELEASE_SHA256, RELEASE_URL, FigStep, read_rows, select_categories


@task("safebench")
class SafeBench(BehaviorSet):
    """FigStep's SafeBench questions as plain text requests (tiny 50 / full 500): ASR by category."""

    homepage = "https://github.com/ThuCCSLab/FigStep"
    licence = "MIT"
    licence_verified = True

    @dataclass
    class Params:
        path: str | None = None
        subset: Literal["tiny", "full"] = "tiny"
        categories: list[str] = field(default_factory=list)
        source: Literal["dir", "release"] = "dir"
        release_url: str = RELEASE_URL
        cache_dir: str | None = None

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if params.source == "dir" and not params.path:
            raise DataError(
                "safebench reads the FigStep release's SafeBench questions: pass path=<local copy of the FigStep "
                "release, or one of its CSVs> or source=release to download it (cached after the first run)"
            )
        if params.source == "release" and params.path:
            raise DataError("safebench: path= is for source=dir; with source=release use cache_dir")

    def _local_csv(self) -> Path | None:
        path = Path(self.params.path).expanduser() if self.params.path else None
        return path if path is not None and path.is_file() else None

    def csv_path(self) -> Path:
        """The question CSV: a file given as path=, else where the figstep task finds (or downloads) it."""
        local = self._local_csv()
        if local is not None:
            return local
        p = self.params
        return FigStep(FigStep.Params(data_dir=p.path, subset=p.subset, source=p.source, release_url=p.release_url,
                                      cache_dir=p.cache_dir, images="render")).csv_path()

    def samples(self) -> Iterator[Sample]:
        path = self.csv_path()
        for row in select_categories(read_rows(path), list(self.params.categories)):
            if not row.question:
                raise DataError(f"{path}:{row.line}: empty question")
            yield self.request(
                f"safebench/{row.category_id}_{row.task_id}", row.question, row.category_name,
                instruction=row.instruction, category_id=row.category_id, task_id=row.task_id,
                dataset=row.dataset, subset=self.params.subset,
            )

    def identity(self) -> dict[str, Any]:
        path = self.csv_path()
        digest = sha256(path) if path.is_file() else None
        where: dict[str, Any] = {
            "source": self.params.source, "subset": self.params.subset, "categories": list(self.params.categories),
            "file": str(path.resolve()), "sha256": digest, "csv_matches_release": digest == RELEASE_SHA256.get(path.name),
        }
        if self.params.source == "release":
            where["release"] = {"url": self.params.release_url, "commit": release.commit_in_url(self.params.release_url)}
        else:
            where["path"] = str(Path(self.params.path or "").expanduser().resolve())
        return self.described(**where)
