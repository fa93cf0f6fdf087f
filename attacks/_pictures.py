"""Pictures for attacks that mix the request with other images (JOOD's benign photos, CS-DJ's
distractors): a user's image folder, or a small stand-in set drawn in code.

The stand-in set is a harness choice, not part of any paper: JOOD mixes in real photos and CS-DJ
draws distractors from LLaVA-CC3M-Pretrain-595K, neither of which ships with the harness. Twelve
simple, benign scenes (an apple, a house, a sailboat...) are drawn here with Pillow primitives
only, from fixed coordinates, so they are identical on every machine and need no download. They
let the attacks run offline and in tests; give `benign_folder=` / `distractor_folder=` to follow
the papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from harness.errors import DataError
from harness.images import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
STAND_IN_SIZE = (400, 300)


@dataclass(frozen=True)
class Picture:
    """A named picture drawn on demand: `name` is what records show (a file name or "stand-in:apple")."""

    name: str
    load: Callable[[], Image.Image]


def folder_pictures(folder: str, what: str) -> list[Picture]:
    """Every image file directly in `folder`, sorted by name (so a seeded choice is reproducible)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} {folder!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{what} {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Picture(p.name, (lambda p=p: load_image(p))) for p in files]


def _canvas(sky: str = "#bfe3ff") -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", STAND_IN_SIZE, sky)
    return image, ImageDraw.Draw(image)


def _apple() -> Image.Image:
    im, d = _canvas("#f4efe6")
    d.ellipse((130, 70, 270, 220), fill="#c8102e")
    d.rectangle((196, 40, 204, 80), fill="#5b3a1a")
    d.ellipse((205, 45, 250, 70), fill="#3a9a3a")
    return im


def _house() -> Image.Image:
    im, d = _canvas()
    d.rectangle((0, 230, 400, 300), fill="#6cbf5a")
    d.rectangle((120, 140, 280, 250), fill="#e8c07a")
    d.polygon([(100, 145), (200, 70), (300, 145)], fill="#a33b2b")
    d.rectangle((185, 195, 215, 250), fill="#6b4226")
    d.rectangle((135, 165, 170, 195), fill="#ffffff")
    return im


def _sailboat() -> Image.Image:
    im, d = _canvas()
    d.rectangle((0, 200, 400, 300), fill="#2a6fb0")
    d.polygon([(130, 200), (270, 200), (245, 230), (155, 230)], fill="#7a4a25")
    d.rectangle((197, 70, 203, 200), fill="#4a3520")
    d.polygon([(205, 75), (205, 190), (285, 190)], fill="#ffffff")
    return im


def _sun_hills() -> Image.Image:
    im, d = _canvas()
    d.ellipse((280, 30, 350, 100), fill="#ffd23f")
    d.ellipse((-100, 180, 220, 420), fill="#4f9d3a")
    d.ellipse((150, 200, 500, 450), fill="#3f8a2f")
    return im


def _tree() -> Image.Image:
    im, d = _canvas()
    d.rectangle((0, 240, 400, 300), fill="#7cc45c")
    d.rectangle((188, 150, 212, 250), fill="#6b4226")
    d.ellipse((130, 50, 270, 180), fill="#2f7d32")
    return im


def _cup() -> Image.Image:
    im, d = _canvas("#e9e4dc")
    d.rectangle((150, 110, 250, 230), fill="#ffffff", outline="#555555", width=3)
    d.arc((230, 135, 290, 195), start=270, end=90, fill="#555555", width=8)
    d.ellipse((120, 225, 280, 250), fill="#d0d0d0")
    return im


def _flower() -> Image.Image:
    im, d = _canvas("#dff5d8")
    d.rectangle((197, 150, 203, 280), fill="#3a8a3a")
    for dx, dy in ((0, -40), (40, 0), (0, 40), (-40, 0)):
        d.ellipse((170 + dx, 100 + dy, 230 + dx, 160 + dy), fill="#f28cb1")
    d.ellipse((180, 110, 220, 150), fill="#ffd23f")
    return im


def _bicycle() -> Image.Image:
    im, d = _canvas("#f0f0f0")
    d.ellipse((70, 150, 170, 250), outline="#222222", width=6)
    d.ellipse((230, 150, 330, 250), outline="#222222", width=6)
    d.line((120, 200, 190, 130, 280, 200, 120, 200), fill="#1f5fbf", width=6)
    d.line((190, 130, 180, 110), fill="#1f5fbf", width=6)
    d.line((270, 120, 280, 200), fill="#1f5fbf", width=6)
    return im


def _book() -> Image.Image:
    im, d = _canvas("#f6f1e7")
    d.rectangle((110, 80, 290, 230), fill="#2b5c8a")
    d.rectangle((120, 90, 280, 220), outline="#f0d080", width=3)
    d.rectangle((150, 130, 250, 145), fill="#f0d080")
    return im


def _clock() -> Image.Image:
    im, d = _canvas("#efe9f5")
    d.ellipse((110, 60, 290, 240), fill="#ffffff", outline="#333333", width=8)
    d.line((200, 150, 200, 90), fill="#333333", width=6)
    d.line((200, 150, 250, 170), fill="#333333", width=6)
    return im


def _fish() -> Image.Image:
    im, d = _canvas("#7fc8e8")
    d.ellipse((110, 110, 260, 190), fill="#ff8c1a")
    d.polygon([(255, 150), (320, 105), (320, 195)], fill="#ff8c1a")
    d.ellipse((140, 135, 155, 150), fill="#000000")
    return im


def _kite() -> Image.Image:
    im, d = _canvas()
    d.polygon([(200, 40), (260, 120), (200, 220), (140, 120)], fill="#e63946")
    d.line((200, 220, 230, 260, 190, 290), fill="#333333", width=3)
    return im


#: name -> drawing; the order is the stand-in set's order (seeded choices index into it).
_STAND_INS: tuple[tuple[str, Callable[[], Image.Image]], ...] = (
    ("apple", _apple), ("house", _house), ("sailboat", _sailboat), ("sun_hills", _sun_hills),
    ("tree", _tree), ("cup", _cup), ("flower", _flower), ("bicycle", _bicycle), ("book", _book),
    ("clock", _clock), ("fish", _fish), ("kite", _kite),
)


def stand_in_pictures() -> list[Picture]:
    """The twelve generated benign pictures (400x300 RGB), named "stand-in:<scene>"."""
    return [Picture(f"stand-in:{name}", draw) for name, draw in _STAND_INS]


def pictures(folder: str | None, what: str) -> list[Picture]:
    """The user's folder when given, else the stand-in set."""
    return folder_pictures(folder, what) if folder else stand_in_pictures()
