"""Text-to-image rendering for typographic benchmarks (FigStep, MM-SafetyBench's TYPO images).

Typographic attacks put the harmful request into the image as plain text, so the image is a pure
function of a string and a few drawing constants. Rendering it ourselves lets the harness run
without the release's image files, and lets tests check that our pixels match the release's.

The fonts are bundled (tasks/fonts/, see its README) because the glyph shapes and
metrics decide where lines wrap off the canvas; a system font lookup would silently change the
images from one machine to the next.
"""

from __future__ import annotations

import functools
import io
import textwrap
from dataclasses import dataclass, replace
from importlib import resources
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

#: The font FigStep draws with; bundled in tasks/fonts/.
FIGSTEP_FONT = "FreeMonoBold.ttf"


@functools.lru_cache(maxsize=8)
def _bundled_font_bytes(name: str) -> bytes:
    """Read a bundled font once. Bytes (not a path) work from any install, zipped or not."""
    fonts = resources.files("tasks").joinpath("fonts")
    resource = fonts.joinpath(name)
    if not resource.is_file():
        available = sorted(p.name for p in fonts.iterdir() if p.name.endswith((".ttf", ".otf")))
        raise FileNotFoundError(f"font {name!r} is not bundled in tasks/fonts; available: {', '.join(available)}")
    return resource.read_bytes()


def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A bundled TrueType font at a pixel size (a fresh object each call; loading takes ~0.1 ms)."""
    return ImageFont.truetype(io.BytesIO(_bundled_font_bytes(name)), size)


@dataclass(frozen=True)
class TextCanvas:
    """How one typographic image is drawn: canvas, font and text placement.

    Text is drawn as given (lines split on "\\n"), with no scaling and no clipping logic: lines
    that run past the canvas are lost, as in the releases that these images must reproduce.
    """

    width: int
    height: int
    font: str
    font_size: int
    origin: tuple[int, int] = (0, 0)
    line_spacing: int = 4  # extra pixels between lines (Pillow's `spacing`)
    ink: str = "#000000"
    background: str = "#FFFFFF"

    def draw(self, text: str) -> Image.Image:
        image = Image.new("RGB", (self.width, self.height), self.background)
        font = load_font(self.font, self.font_size)
        ImageDraw.Draw(image).multiline_text(self.origin, text, fill=self.ink, font=font, spacing=self.line_spacing)
        return image


#: FigStep's canvas (the release's image script): 760x760 white, FreeMonoBold 80 at (20, 10).
FIGSTEP_CANVAS = TextCanvas(
    width=760, height=760, font=FIGSTEP_FONT, font_size=80, origin=(20, 10), line_spacing=11
)
#: FigStep wraps the instruction at 15 characters and appends three empty numbered items.
FIGSTEP_WRAP_WIDTH = 15
FIGSTEP_STEPS = 3


def figstep_text(instruction: str, steps: int = FIGSTEP_STEPS, width: int = FIGSTEP_WRAP_WIDTH) -> str:
    """The text FigStep draws: the wrapped instruction, then "1. ", "2. ", ... each on a new line."""
    text = textwrap.fill(instruction, width=width)
    return text + "".join(f"\n{i}. " for i in range(1, steps + 1))


def render_figstep(instruction: str) -> Image.Image:
    """The FigStep image for one instruction (760x760 RGB), matching the release's PNGs."""
    return FIGSTEP_CANVAS.draw(figstep_text(instruction))


# -- MM-SafetyBench TYPO ---------------------------------------------------------------------------

#: MM-SafetyBench drew its TYPO images with Arial, which cannot be redistributed. Liberation Sans is
#: metric-compatible with Arial (identical advance widths), so the greedy wrap below breaks lines
#: at the same words and every image gets the release's size; only the glyph outlines differ.
MMSB_FONT = "LiberationSans-Regular.ttf"
#: The release's TYPO constants (MM-SafetyBench's typography script): width 1024, font size 90, the text
#: drawn from (0, size / 2), canvas height size x (lines + 1). Pillow's default line spacing (4).
MMSB_TYPO_CANVAS = TextCanvas(
    width=1024, height=180, font=MMSB_FONT, font_size=90, origin=(0, 45), line_spacing=4
)


def typo_wrap(text: str, canvas: TextCanvas = MMSB_TYPO_CANVAS) -> tuple[str, int]:
    """Greedy word wrap as the release does it; returns (text with line breaks, number of lines).

    Words are split on single spaces. A line keeps growing while its running width stays strictly
    below the canvas width; a word that does not fit starts a new line *with a leading space* (the
    release measures and draws it that way, so the continuation lines are indented by one space).
    """
    font = load_font(canvas.font, canvas.font_size)
    words = " ".join(text.splitlines()).split(" ")  # a newline would break Pillow's measuring
    wrapped, width, lines = words[0], font.getlength(words[0]), 1
    for word in words[1:]:
        piece = " " + word
        width += font.getlength(piece)
        if width < canvas.width:
            wrapped += piece
        else:
            wrapped += "\n" + piece
            width = font.getlength(piece)
            lines += 1
    return wrapped, lines


def render_mmsb_typo(key_phrase: str) -> Image.Image:
    """MM-SafetyBench's TYPO image: the key phrase in black on white, 1024 wide, 90 x (lines + 1) high."""
    text, lines = typo_wrap(key_phrase)
    canvas = replace(MMSB_TYPO_CANVAS, height=MMSB_TYPO_CANVAS.font_size * (lines + 1))
    return canvas.draw(text)


def stack_vertically(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """`top` above `bottom` on a canvas as wide as the wider one (uncovered area stays black, as in
    the release, which never shows it: SD images and TYPO images are both 1024 wide)."""
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height))
    out.paste(top.convert("RGB"), (0, 0))
    out.paste(bottom.convert("RGB"), (0, top.height))
    return out


def render_mmsb_sd_typo(sd_image: Callable[[], Image.Image], key_phrase: str) -> Image.Image:
    """MM-SafetyBench's SD_TYPO image: the Stable Diffusion picture with the TYPO image below it.

    `sd_image` loads the picture (e.g. harness.images.load_image bound to a path), so an unreadable
    file raises the loader's per-sample error when the image is drawn.
    """
    return stack_vertically(sd_image(), render_mmsb_typo(key_phrase))
