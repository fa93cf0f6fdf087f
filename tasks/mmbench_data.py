"""Reading MMBench rows (hub parquet or the release TSV) and laying out CircularEval's passes.

Why a module of its own: the two sources differ in column names ("L2-category" on the hub,
"l2-category" in the TSVs), index types (strings in the hub's `en` config) and image storage
(embedded bytes vs base64 text), and CircularEval needs the same passes from both.

CircularEval (Liu et al., "MMBench", ECCV 2024): a question with N options is asked N times, the
options rotated each time, and counts as right only when every pass is right. The official files
already hold the rotated copies: a copy of question `i` has index `i + k * 1_000_000` (k = 1 .. N-1),
with its options and answer rotated. When a file has such copies they are used as released (their
indices are what the MMBench server expects); a file without them (base questions only) gets the
passes generated here as LLaVA's `model_vqa_mmbench.py --all-rounds` makes them: each pass moves
the first option to the end, so pass k shows option (j + k) mod N under letter j. Either way the
set of passes is the N cyclic shifts of the options.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from PIL import Image, UnidentifiedImageError

from harness.errors import DataError, ImageLoadError

LETTERS = ("A", "B", "C", "D")
#: Index offset of a rotated copy in the official files.
ROTATION = 1_000_000
TSV_COLUMNS = ("index", "question", "A", "B", "image")


def is_none(value: Any) -> bool:
    """LLaVA's `is_none`: missing, NaN, or the strings "nan" / "none" (any case), plus empty text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


@dataclass(frozen=True)
class Row:
    """One row of an MMBench file: a base question or one released rotation of it."""

    index: int
    question: str
    hint: str | None
    options: tuple[str, ...]
    answer: str | None  # letter; None on the test split (answers withheld)
    category: str
    l2: str
    image: Any  # lazy callable
    image_ref: str
    where: str

    @property
    def g_index(self) -> int:
        return self.index % ROTATION

    @property
    def rotation(self) -> int:
        return self.index // ROTATION


@dataclass(frozen=True)
class Pass:
    """One prompt of CircularEval: the question with its options in one rotation."""

    g_index: int
    k: int
    row: Row
    options: tuple[str, ...]
    answer: str | None

    def option_map(self) -> dict[str, str]:
        return dict(zip(LETTERS, self.options))


def row_from(values: Mapping[str, Any], image: Any, image_ref: str, where: str) -> Row:
    lower = {str(k).lower(): v for k, v in values.items() if str(k) not in LETTERS}
    try:
        index = int(str(values.get("index")).strip())
    except ValueError:
        raise DataError(f"{where}: index {values.get('index')!r} is not a whole number") from None
    if is_none(values.get("question")):
        raise DataError(f"{where}: empty question")
    options: list[str] = []
    for letter in LETTERS:  # as LLaVA's get_options: stop at the first missing option
        if is_none(values.get(letter)):
            break
        options.append(str(values[letter]))
    if len(options) < 2:
        raise DataError(f"{where}: {len(options)} option(s); a multiple-choice question needs at least A and B")
    answer = None if is_none(lower.get("answer")) else str(lower["answer"]).strip()
    if answer is not None and answer not in LETTERS[: len(options)]:
        raise DataError(f"{where}: answer {answer!r} names none of the options {', '.join(LETTERS[:len(options)])}")
    hint = None if is_none(lower.get("hint")) else str(lower["hint"])
    return Row(index, str(values["question"]), hint, tuple(options), answer, str(lower.get("category") or ""),
               str(lower.get("l2-category") or ""), image, image_ref, where)


def passes(rows: Iterable[Row], circular: bool = True) -> list[Pass]:
    """CircularEval's passes, grouped by question in file order (pass 0 first in each group)."""
    rows = list(rows)
    base = {r.index: r for r in rows if r.index < ROTATION}
    copies = [r for r in rows if r.index >= ROTATION]
    out: list[Pass] = []
    if not circular:
        return [Pass(r.index, 0, r, r.options, r.answer) for r in base.values()]
    if copies:  # the released rotations
        by_group: dict[int, list[Row]] = {}
        for r in copies:
            if r.g_index not in base:
                raise DataError(f"{r.where}: rotated copy {r.index} of question {r.g_index}, which the file lacks")
            by_group.setdefault(r.g_index, []).append(r)
        for g, r in base.items():
            group = [r, *sorted(by_group.get(g, []), key=lambda c: c.rotation)]
            out += [Pass(g, c.rotation, c, c.options, c.answer) for c in group]
        return out
    for g, r in base.items():
        n = len(r.options)
        for k in range(n):
            rotated = tuple(r.options[(j + k) % n] for j in range(n))
            answer = None if r.answer is None else LETTERS[(LETTERS.index(r.answer) - k) % n]
            out.append(Pass(g, k, r, rotated, answer))
    return out


# -- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base64Image:
    """A TSV cell's base64 picture, decoded when its batch runs; errors name file and row."""

    data: str
    ref: str

    def __call__(self) -> Image.Image:
        try:
            raw = base64.b64decode(self.data, validate=False)
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                return img.convert("RGB")
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(f"{self.ref}: image cannot be decoded: {exc}") from None


# -- the release TSV ------------------------------------------------------------------------------


def read_tsv(path: Path) -> list[Row]:
    """An MMBench release TSV (MMBench_DEV_EN.tsv ...): one row per line, pictures in base64."""
    if not path.is_file():
        raise DataError(f"MMBench file not found: {path}")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = [c for c in TSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(reader.fieldnames or [])}")
        rows = []
        for number, values in enumerate(reader, start=2):
            where = f"{path}:{number}"
            ref = f"{path}#index={values.get('index')}"
            rows.append(row_from(values, Base64Image(values.get("image") or "", ref), ref, where))
    if not rows:
        raise DataError(f"{path}: no questions")
    return rows
