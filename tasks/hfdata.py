"""Benchmark data from the Hugging Face hub, read through `datasets`, pinned to one revision.

Mirrors move and get re-uploaded (lmms-lab/MME's parquet files were replaced several times), so a
task names the dataset repository *and* the commit it was validated against; the commit that was
actually read is recorded in the task's identity. Files are fetched with `huggingface_hub.snapshot_download` (only the
parquet files the task needs) and read with `datasets.Dataset.from_parquet`, whose Arrow cache is
memory-mapped: a 700 MB split costs no RAM until a row is touched.

The same code reads a local copy of the hub repository (`hf download --repo-type dataset ID
--revision REV --local-dir DIR`, then `source=hf,data_dir=DIR`): the only difference between the two
is where the folder came from. Tests use that path with parquet files they write themselves.

`datasets` is imported lazily so that importing a task module (which `realign list` does for every
task) stays cheap and works without it installed.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from harness.errors import DataError, ImageLoadError

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSnapshot:
    """A folder laid out like the hub repository, and where it came from."""

    root: Path
    repo_id: str
    revision: str
    #: The commit the files were read at: the snapshot folder's name when downloaded, None for a
    #: user's local copy (its commit is whatever the user downloaded; `revision` is then a claim).
    commit: str | None

    def identity(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "root": str(self.root)}


def check_source(task: str, source: str, data_dir: str | None, revision: str | None, dir_holds: str) -> None:
    """The source keys every hub-or-release task shares: `source=dir` needs `data_dir` (described
    by `dir_holds`), and `revision` pins hub data only."""
    if source == "dir" and not data_dir:
        raise DataError(f"{task}: source=dir needs data_dir=<{dir_holds}> (or use source=hf)")
    if source == "dir" and revision:
        raise DataError(f"{task}: revision= applies to source=hf only")


def snapshot(repo_id: str, revision: str, patterns: list[str], data_dir: str | None) -> HubSnapshot:
    """The hub repository at `revision` (only files matching `patterns`), or a local copy of it."""
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data_dir {root} is not a folder (source=hf expects a local copy of {repo_id})")
        return HubSnapshot(root, repo_id, revision, None)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - installed with transformers
        raise DataError("source=hf needs huggingface_hub: pip install huggingface_hub datasets") from None
    try:
        path = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth, offline mode, unknown revision: all need the same advice
        raise DataError(
            f"cannot fetch dataset {repo_id} at revision {revision} from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}. Download it elsewhere (hf download --repo-type dataset {repo_id} "
            f"--revision {revision} --local-dir DIR) and pass source=hf,data_dir=DIR, "
            f"or use the original release with source=dir,data_dir=..."
        ) from None
    commit = path.name if _COMMIT.fullmatch(path.name) else None
    return HubSnapshot(path, repo_id, revision, commit)


def parquet_files(snap: HubSnapshot, pattern: str, hint: str = "") -> list[Path]:
    """Files under the snapshot matching a glob, in name order; an error names what was expected."""
    files = sorted(p for p in snap.root.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"no files matching {pattern} under {snap.root} (expected the layout of {snap.repo_id}){hint}")
    return files


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("source=hf needs the `datasets` package: pip install datasets") from None
    return datasets


@dataclass
class Table:
    """One parquet file as a memory-mapped `datasets.Dataset`, with images left undecoded."""

    path: Path
    data: Any  # datasets.Dataset

    def __len__(self) -> int:
        return len(self.data)

    @property
    def columns(self) -> list[str]:
        return list(self.data.column_names)

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.data.column_names]
        if missing:
            raise DataError(f"{self.path}: missing column(s) {', '.join(missing)}; has {', '.join(self.columns)}")

    def rows(self, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row number, values) for the named columns only: image bytes are not read here."""
        part = self.data.select_columns(columns)
        for i, row in enumerate(part):
            yield i, row

    def image(self, row: int, column: str = "image") -> "HubImage":
        return HubImage(self, row, column)

    def image_present(self, column: str = "image") -> list[bool]:
        """Per row, whether the image column holds an image (read from Arrow, without the bytes)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if column not in self.data.column_names:
            return [False] * len(self)
        out: list[bool] = []
        for chunk in self.data.data.column(column).chunks:  # per chunk: no copy of the image bytes
            present = chunk.is_valid()
            if pa.types.is_struct(chunk.type):
                present = pc.and_(present, chunk.field("bytes").is_valid())
            out.extend(bool(v) for v in pc.fill_null(present, False).to_pylist())
        return out

    def where(self, row: int) -> str:
        return f"{self.path}: row {row}"


def read_parquet(path: Path) -> Table:
    """Open one parquet file; image columns stay as bytes until a sample's image is drawn."""
    datasets = _datasets()
    try:
        data = datasets.Dataset.from_parquet(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    for name, feature in data.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            data = data.cast_column(name, datasets.Image(decode=False))
    return Table(path, data)


@dataclass(frozen=True)
class HubImage:
    """A zero-argument callable that decodes one row's image when its batch runs.

    Decoding failures raise ImageLoadError naming file and row, so the runner records that one
    sample as an error instead of stopping the run.
    """

    table: Table
    row: int
    column: str

    @property
    def ref(self) -> str:
        return f"{self.table.path}#row={self.row}"

    def __call__(self) -> Image.Image:
        value = self.table.data.select_columns([self.column])[self.row][self.column]
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        data = value.get("bytes") if isinstance(value, dict) else None
        if not data:
            raise ImageLoadError(f"{self.table.where(self.row)}: no image bytes in column {self.column!r}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(f"{self.table.where(self.row)}: image cannot be decoded: {exc}") from None
