"""JOOD (CVPR 2025): make a harmful input out-of-distribution by mixing it with a benign picture.

Recipe (shared/specs/attacks.md, JOOD; NAVER's code as ported by OmniSafeBench-MM a4875c6): resize
the harmful and the benign picture so that the longest side is 320 (bicubic; the other side is
truncated to an integer), centre both on white canvases of the larger width and the larger height,
and combine them:

- `mixup`: `Image.blend(harm, benign, alpha)` (alpha 0 is the harmful picture alone; OSB uses 0.5);
- `cutmix`: the benign canvas's own region of alpha x the size (per side) is pasted over the
  harmful canvas at a random position;
- `resizemix`: the whole benign canvas, shrunk to that size, is pasted there instead;
- `imgocr` (`imgocr-cutmix`, `imgocr-resizemix`): the harmful picture is a typographic rendering
  of the harmful words (the sample's key phrase, else the request; MM-SafetyBench's TYPO renderer,
  tasks.render), then mixed as above.

The text sent is the recipe's prefix (attacks/data/jood.json: the mixup prefix, or the OCR prefix
when the harmful picture is typography), a newline, and the request. A sample without an image
under `mixup`/`cutmix`/`resizemix` gets the typographic picture (recorded as `harmful:
typography`, with the OCR prefix). The padding is done in RGB with white; the original pads in RGBA
with transparent white and converts to RGB at the end, which gives the same RGB pixels.

Benign pictures come from `benign_folder=`, or from the harness's generated stand-in set
(attacks/_pictures.py; not the paper's photos). The choice of picture and the patch position are
drawn from the per-sample seed and recorded. Not implemented: `textmix` (the coined-word
construction is not in any code we could read) and the paper's alpha grid and protocol
(**unverified** in the spec).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from PIL import Image

from attacks._pictures import Picture, pictures
from harness.contracts.attack import Attack, attack_seed
from harness.images import load_image
from harness.registry import attack
from harness.schema import Sample
from tasks.render import render_mmsb_typo

LONGEST_SIDE = 320
MIXES = ("mixup", "cutmix", "resizemix", "imgocr", "imgocr-cutmix", "imgocr-resizemix")
#: Sample meta keys that may carry the harmful key words (MM-SafetyBench's key phrase, HADES' keyword).
KEY_WORD_FIELDS = ("key_phrase", "keyword", "keywords")


def _data() -> tuple[dict[str, Any], str]:
    raw = resources.files("attacks").joinpath("data", "jood.json").read_bytes()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()


def resize_longest(image: Image.Image, side: int = LONGEST_SIDE) -> Image.Image:
    """Longest side to `side` (bicubic); the other side scaled and truncated, as the release does."""
    w, h = image.size
    size = (side, int(side / w * h)) if w > h else (int(side / h * w), side)
    return image.resize(size, Image.BICUBIC)


def pad_centre(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    return canvas


def prepare(harm: Image.Image, benign: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Both pictures resized to a longest side of 320 and centred on a common white canvas."""
    a, b = resize_longest(harm.convert("RGB")), resize_longest(benign.convert("RGB"))
    size = (max(a.width, b.width), max(a.height, b.height))
    return pad_centre(a, size), pad_centre(b, size)


def combine(harm: Image.Image, benign: Image.Image, how: str, alpha: float,
            at: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Mix two prepared pictures. `at` places a cut/resize patch: x = floor(at[0] * (W - w))."""
    if how == "mixup":
        return Image.blend(harm, benign, alpha)
    if alpha == 0:
        return harm.copy()
    if alpha == 1:
        return benign.copy()
    w, h = int(harm.width * alpha), int(harm.height * alpha)
    x, y = int(at[0] * (harm.width - w)), int(at[1] * (harm.height - h))
    patch = benign.crop((x, y, x + w, y + h)) if how == "cutmix" else benign.resize((w, h))
    out = harm.copy()
    out.paste(patch, (x, y))
    return out


def key_words(sample: Sample) -> str:
    """The harmful words drawn in the typographic picture: a key phrase from meta, else the request."""
    for name in KEY_WORD_FIELDS:
        value = sample.meta.get(name)
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return sample.query


@attack("jood")
class JOOD(Attack):
    """JOOD: the harmful picture (or its typography) mixed with a benign picture (mixup/cutmix/resizemix)."""

    @dataclass(frozen=True)
    class Params:
        mix: Literal["mixup", "cutmix", "resizemix", "imgocr", "imgocr-cutmix", "imgocr-resizemix"] = "mixup"
        alpha: float = 0.5  # weight of the benign picture (mixup) or patch side fraction (cutmix/resizemix)
        benign_folder: str | None = None  # None: the generated stand-in pictures (attacks/_pictures.py)

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.data, self.data_sha256 = _data()
        self.benign: list[Picture] = pictures(params.benign_folder, "jood benign_folder")

    def identity(self) -> dict[str, Any]:
        names = "\n".join(p.name for p in self.benign)
        return {"spec": self.spec, "prompts_sha256": self.data_sha256,
                "benign": self.params.benign_folder or "stand-in", "benign_count": len(self.benign),
                "benign_names_sha256": hashlib.sha256(names.encode()).hexdigest()}

    def apply(self, sample: Sample, seed: int) -> Sample:
        p = self.params
        rng = random.Random(attack_seed(seed, self.spec, sample.id))
        index = rng.randrange(len(self.benign))
        benign = self.benign[index]
        how = p.mix.removeprefix("imgocr").lstrip("-") or "mixup"
        typography = p.mix.startswith("imgocr") or not sample.has_image()
        at = (rng.random(), rng.random())
        record: dict[str, Any] = {"mix": p.mix, "combine": how, "alpha": p.alpha,
                                  "harmful": "typography" if typography else "image",
                                  "benign": benign.name, "benign_index": index}
        if how != "mixup":
            record["patch_at"] = list(at)
        words = key_words(sample) if typography else None
        if words is not None:
            record["typography_text"] = words
        prefix = self.data["prefixes"]["imgocr" if typography else "image"]["text"]
        text = prefix + self.data["separator"] + sample.query
        harmful_source = sample.image

        def render() -> Image.Image:
            harm = render_mmsb_typo(words) if words is not None else load_image(harmful_source)
            a, b = prepare(harm, benign.load())
            return combine(a, b, how, p.alpha, at)

        return self.attacked(sample, text, render, record)
