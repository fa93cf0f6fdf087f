"""JailbreakBench's JBB-Behaviors: 100 harmful behaviours and their 100 benign twins, as plain requests.

Chao et al., NeurIPS 2024 Datasets and Benchmarks (arXiv 2404.01318); Hugging Face dataset
`JailbreakBench/JBB-Behaviors`, MIT licence (the dataset card's `license: mit` and its LICENSE file).
Config `behaviors`, files `data/harmful-behaviors.csv` and `data/benign-behaviors.csv`, columns
`Index` (from 0), `Goal` (the request), `Target` (the affirmative opening an attacker aims for),
`Behavior` (a short unique name), `Category` (10 categories from OpenAI's usage policies, 10
behaviours each) and `Source` (Original, AdvBench, or TDC/HarmBench: a contamination flag).

Why the benign twin: each harmful behaviour has a benign request on the same topic with the same
`Index`, so a defense's over-refusal is measured on matched topics (`split=benign`: metric
`refusal_rate`, lower is better); `meta["pair"]` names the twin's sample id.

Data: the hub at HF_REVISION (a commit; `revision=` moves the pin), read through the hub cache,
or `path=` (one of the CSV files, or a folder holding `data/<split>-behaviors.csv` as the hub
repository does, or `<split>-behaviors.csv`). Sample ids: `jbb/<split>/<Index>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from harness.errors import DataError
from harness.registry import task
from harness.schema import Sample
from tasks.behaviors import BehaviorSet, hub_file, is_commit, local_file, read_csv, select_categories, sha256

HF_REPO = "JailbreakBench/JBB-Behaviors"
#: The newest commit of the dataset repository seen when this was written (26 Sep 2024, "Created
#: license file based on Tag"); the two CSVs last changed at d72ab3e ("Add Index column name").
HF_REVISION = "c19227d7c9c40307a0999365779c13cd1a5116d0"
FILES = {"harmful": "data/harmful-behaviors.csv", "benign": "data/benign-behaviors.csv"}
COLUMNS = ("Index", "Goal", "Target", "Behavior", "Category", "Source")


@task("jbb")
class JBB(BehaviorSet):
    """JailbreakBench JBB-Behaviors: 100 harmful requests (ASR by category) or their benign twins (over-refusal)."""

    homepage = f"https://huggingface.co/datasets/{HF_REPO}"
    licence = "MIT"
    licence_verified = True

    @dataclass
    class Params:
        split: Literal["harmful", "benign"] = "harmful"
        path: str | None = None
        revision: str | None = None
        categories: list[str] = field(default_factory=list)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if params.path and params.revision:
            raise DataError("jbb: revision= pins the hub download; a path= copy is read as it is")
        self._commit: str | None = None

    @property
    def harmful(self) -> bool:
        return self.params.split == "harmful"

    @property
    def revision(self) -> str:
        return self.params.revision or HF_REVISION

    def csv_path(self) -> Path:
        """The split's CSV: from `path=`, else fetched from the hub at the pinned revision."""
        name = FILES[self.params.split]
        if self.params.path:
            return local_file("jbb", self.params.path, [name, Path(name).name])
        path, self._commit = hub_file("jbb", HF_REPO, self.revision, name)
        return path

    def samples(self) -> Iterator[Sample]:
        split = self.params.split
        twin = "benign" if split == "harmful" else "harmful"
        out: list[Sample] = []
        seen: dict[int, int] = {}
        for row in read_csv(self.csv_path(), COLUMNS, f"JBB-Behaviors {split}"):
            text = row.get("Index")
            if not text.isdigit():
                raise DataError(f"{row.where}: Index {text!r} is not a whole number")
            index = int(text)
            if index in seen:
                raise DataError(f"{row.where}: Index {index} repeats row {seen[index]}")
            seen[index] = row.number
            out.append(self.request(
                f"jbb/{split}/{index}", row.need("Goal"), row.need("Category"),
                target=row.get("Target") or None, behavior=row.need("Behavior"), source=row.get("Source") or None,
                index=index, split=split, pair=f"jbb/{twin}/{index}",
            ))
        yield from select_categories("jbb", out, list(self.params.categories))

    def identity(self) -> dict[str, Any]:
        path = self.csv_path()
        where: dict[str, Any] = {"split": self.params.split, "categories": list(self.params.categories),
                                 "file": str(path.resolve()), "sha256": sha256(path)}
        if self.params.path:
            where["path"] = str(Path(self.params.path).expanduser().resolve())
        else:
            where["hub"] = {"repo_id": HF_REPO, "revision": self.revision, "commit": self._commit,
                            "pinned": is_commit(self.revision)}
        return self.described(**where)
