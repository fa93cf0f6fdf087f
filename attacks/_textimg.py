"""Helpers shared by the qr, mml and si attacks: fonts by name or path (with their sha256), the
attacks' data files, typographic drawing, and lazy images.

Fonts: a bare name is looked up in the bundled tasks/fonts/ (LiberationSans-Regular.ttf stands in
for Arial: identical advance widths, so word wraps and canvas sizes match the originals; glyphs
differ); any other value is a path to a TrueType file (e.g. a licensed arial.ttf, to draw the
originals' glyphs). Either way the bytes are hashed into the attack's identity.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from harness.errors import DataError
from harness.spec import SpecError

#: The bundled stand-in for Arial (tasks/fonts/README.md).
ARIAL_STANDIN = "LiberationSans-Regular.ttf"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FontRef:
    """A TrueType font read once: where it came from, its bytes and their sha256."""

    source: str  # "bundled:<name>" or the path given
    data: bytes

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.data)

    def at(self, size: int) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(io.BytesIO(self.data), size)

    def record(self) -> dict[str, str]:
        return {"font": self.source, "font_sha256": self.sha256}


@functools.lru_cache(maxsize=16)
def font_ref(font: str) -> FontRef:
    """A bundled font by file name, else a font file by path; SpecError when neither exists."""
    bundled = resources.files("tasks").joinpath("fonts")
    if "/" not in font and bundled.joinpath(font).is_file():
        return FontRef(f"bundled:{font}", bundled.joinpath(font).read_bytes())
    path = Path(font).expanduser()
    if path.is_file():
        try:
            data = path.read_bytes()
            ImageFont.truetype(io.BytesIO(data), 10)
        except OSError as exc:
            raise SpecError(f"font {font!r} is not a readable TrueType/OpenType file: {exc}") from None
        return FontRef(str(path), data)
    names = sorted(p.name for p in bundled.iterdir() if p.name.endswith((".ttf", ".otf")))
    raise SpecError(f"font {font!r}: not a bundled font ({', '.join(names)}) and no such file")


def data_path(name: str) -> Any:
    return resources.files("attacks").joinpath("data").joinpath(name)


def load_json(name: str | None, override: str | None, what: str) -> tuple[dict[str, Any], str, str]:
    """(content, source, sha256) of a JSON data file: `override` (a user path) when given, else the
    shipped attacks/data/`name`. Errors name the file."""
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise DataError(f"{what} file not found: {path}")
        raw, source = path.read_bytes(), str(path)
    else:
        raw, source = data_path(name).read_bytes(), f"attacks/data/{name}"
    try:
        content = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} file {source} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(content, dict):
        raise DataError(f"{what} file {source} must hold a JSON object")
    return content, source, sha256_bytes(raw)


def require_keys(content: dict[str, Any], keys: tuple[str, ...], source: str, what: str) -> None:
    missing = [k for k in keys if not isinstance(content.get(k), (str, list)) or not content.get(k)]
    if missing:
        raise DataError(f"{what} file {source}: missing or empty {', '.join(missing)}")


def fill(template: str, **values: str) -> str:
    """Replace `{name}` placeholders literally (no str.format: prompts may hold other braces)."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


# -- drawing -----------------------------------------------------------------------------------

def greedy_wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> tuple[str, int]:
    """MM-SafetyBench's typography wrap: words split on single spaces; a line grows while its
    measured width stays strictly below `width`; a word that does not fit starts a new line with
    its leading space. Returns (text with line breaks, number of lines)."""
    words = " ".join(text.splitlines()).split(" ")
    wrapped, current, lines = words[0], font.getlength(words[0]), 1
    for word in words[1:]:
        piece = " " + word
        current += font.getlength(piece)
        if current < width:
            wrapped += piece
        else:
            wrapped += "\n" + piece
            current = font.getlength(piece)
            lines += 1
    return wrapped, lines


def draw_text(size: tuple[int, int], text: str, font: ImageFont.FreeTypeFont, origin: tuple[float, float],
              spacing: int = 4) -> Image.Image:
    """Black text on a white RGB canvas (Pillow's multiline drawing, lines split on newlines)."""
    image = Image.new("RGB", size, "#FFFFFF")
    ImageDraw.Draw(image).multiline_text(origin, text, fill="#000000", font=font, spacing=spacing)
    return image


def overflows(size: tuple[int, int], text: str, font: ImageFont.FreeTypeFont, origin: tuple[float, float],
              spacing: int = 4) -> bool:
    """Whether the drawn text would run past the canvas (such text is lost, as in the originals)."""
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = scratch.multiline_textbbox(origin, text, font=font, spacing=spacing)
    return left < 0 or top < 0 or right > size[0] or bottom > size[1]


def lazy(render: Callable[..., Image.Image], *args: Any, **kwargs: Any) -> Callable[[], Image.Image]:
    """A zero-argument renderer: the image is drawn only when its batch runs."""
    return functools.partial(render, *args, **kwargs)
