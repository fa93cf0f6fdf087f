"""JailGuard's input mutations, seeded: image operators on PIL images, text operators on strings.

JailGuard (shiningrain/JailGuard, `utils/augmentations.py`) queries the target on variants of an
input and reads disagreement between the answers as a sign of attack. Its default "policy" picks
exactly one operator per variant by probability. The facts kept from the public code:

  image policy   rotation .34: max angle a ~ U(0.1, 180), angle ~ U(0, a), nearest-neighbour,
                                same canvas, black corners (torchvision RandomRotation defaults)
                 blur .45:      kernel width and height each odd from {1, 3, 5, 7},
                                sigma ~ U(0.1, 2) shared by both axes (torchvision GaussianBlur)
                 posterize .21: bits from {1, 2}, applied with probability 0.5 (RandomPosterize)
  text policy    punctuation insertion .24 (AEDA): 1 to words//3 marks from . ; ? : ! , each put
                                before a random word; fewer than 3 words: unchanged
                 targeted insertion .52: "[Mask]" inserted at character positions with
                                probability 0.005, five times that inside the three highest-scoring
                                sentences (and question sentences) when there are more than three
                                sentences; five characters skipped after each insertion
                 translation .24: needs an online translator, so it is left out here and the
                                other two keep their ratio (.24/.76 and .52/.76): a harness choice

Harness choices, and why:
  * Every draw comes from a numpy Generator seeded by (seed, sample id, variant index, stream),
    so a run is reproducible and a sample gets the same variants whatever batch it is in. The
    public code leaves seeds unset (and its punctuation operator reseeds Python's `random` with 1
    on every call, so all its punctuation variants of one text are identical); `stream` keeps the
    image and text draws apart, so `mode=both` mutates the image exactly as `mode=image` does.
  * Operators are written with Pillow and numpy, not torchvision (not a dependency). Rotation and
    posterize are the same Pillow calls torchvision makes on PIL images. Blur is torchvision's
    separable Gaussian (same kernel formula, reflect padding, rounding to the nearest level)
    computed in float64; torchvision computes in float32, so a rare pixel may differ by one level.
  * Images are mutated as RGB (what the backends send); a drawn mutation is a plain dict (logged in
    the trace) and applying it is a pure function, so anyone can re-apply a logged variant.
  * Sentence splitting and the stop-word list of targeted insertion are our own small versions of
    what the public code takes from nltk.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_POLICY: tuple[tuple[str, float], ...] = (("rotate", 0.34), ("blur", 0.45), ("posterize", 0.21))
TEXT_POLICY: tuple[tuple[str, float], ...] = (("punctuation", 0.24 / 0.76), ("targeted_insertion", 0.52 / 0.76))
MAX_ANGLE_RANGE = (0.1, 180.0)
BLUR_KERNELS = (1, 3, 5, 7)
SIGMA_RANGE = (0.1, 2.0)
POSTERIZE_BITS = (1, 2)
POSTERIZE_P = 0.5
PUNCTUATION_MARKS = (".", ";", "?", ":", "!", ",")
MASK_TOKEN = "[Mask]"
INSERT_RATE = 0.005  # the public code's level 0.01 halved
INSERT_BOOST = 5  # rate multiplier inside important sentences
INSERT_SKIP = 5  # characters skipped after an insertion
IMPORTANT_SENTENCES = 3
IMAGE_STREAM, TEXT_STREAM = 0, 1

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your yours yourself yourselves
""".split())


def variant_rng(seed: int, sample_id: str, index: int, stream: int) -> np.random.Generator:
    """The generator of one variant's draws. The sample id enters through a stable hash (not
    Python's `hash`, which changes between processes); negative seeds are taken modulo 2**64."""
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8)]
    return np.random.default_rng([seed % 2**64, *words, index, stream])


def _pick(policy: tuple[tuple[str, float], ...], u: float) -> str:
    """The operator whose cumulative-probability interval holds u (one operator per variant)."""
    edge = 0.0
    for name, p in policy:
        edge += p
        if u < edge:
            return name
    return policy[-1][0]


# ---- images --------------------------------------------------------------------------------------
def draw_image_mutation(rng: np.random.Generator) -> dict[str, Any]:
    """One operator of the image policy and its parameters (a JSON-ready dict)."""
    op = _pick(IMAGE_POLICY, float(rng.random()))
    if op == "rotate":
        max_angle = float(rng.uniform(*MAX_ANGLE_RANGE))
        return {"op": op, "max_angle": max_angle, "angle": float(rng.uniform(0.0, max_angle))}
    if op == "blur":
        kx, ky = (int(rng.choice(BLUR_KERNELS)) for _ in range(2))
        return {"op": op, "kernel": [kx, ky], "sigma": float(rng.uniform(*SIGMA_RANGE))}
    bits = int(rng.choice(POSTERIZE_BITS))
    return {"op": op, "bits": bits, "applied": bool(rng.random() < POSTERIZE_P)}


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """torchvision's 1-D Gaussian: exp(-x²/2σ²) at evenly spaced points across the kernel, summing to 1."""
    half = (size - 1) * 0.5
    pdf = np.exp(-0.5 * (np.linspace(-half, half, size) / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(image: Image.Image, kernel: tuple[int, int] | list[int], sigma: float) -> Image.Image:
    """Separable Gaussian blur, `kernel` = (width, height) of the kernel, mirror padding at the edges."""
    kx, ky = int(kernel[0]), int(kernel[1])
    arr = np.asarray(image, dtype=np.float64)
    h, w = arr.shape[:2]
    pad = [(ky // 2, ky // 2), (kx // 2, kx // 2)] + [(0, 0)] * (arr.ndim - 2)
    padded = np.pad(arr, pad, mode="reflect")
    wx, wy = gaussian_kernel(kx, sigma), gaussian_kernel(ky, sigma)
    rows = sum(wx[k] * padded[:, k : k + w] for k in range(kx))
    out = sum(wy[k] * rows[k : k + h] for k in range(ky))
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), image.mode)


def apply_image_mutation(image: Image.Image, mutation: dict[str, Any]) -> Image.Image:
    """The mutated copy of `image` (RGB) under a drawn mutation."""
    rgb = image.convert("RGB")
    op = mutation["op"]
    if op == "rotate":
        return rgb.rotate(mutation["angle"], resample=Image.Resampling.NEAREST, expand=False, fillcolor=(0, 0, 0))
    if op == "blur":
        return gaussian_blur(rgb, mutation["kernel"], mutation["sigma"])
    if op == "posterize":
        return ImageOps.posterize(rgb, mutation["bits"]) if mutation["applied"] else rgb.copy()
    raise ValueError(f"unknown image mutation {op!r}")


# ---- text ----------------------------------------------------------------------------------------
def draw_text_mutation(text: str, rng: np.random.Generator) -> dict[str, Any]:
    """One operator of the text policy and its edits (positions refer to `text` as given)."""
    op = _pick(TEXT_POLICY, float(rng.random()))
    if op == "punctuation":
        return {"op": op, "insertions": _draw_punctuation(text, rng)}
    boosted = important_spans(text)
    return {"op": op, "token": MASK_TOKEN, "positions": _draw_insertions(text, boosted, rng),
            "boosted_spans": [list(s) for s in boosted]}


def _draw_punctuation(text: str, rng: np.random.Generator) -> list[list[Any]]:
    """(word position, mark) pairs, each position in the word list as it stands when inserted."""
    words = text.strip().split(" ")
    if len(words) // 3 < 1:
        return []
    count = int(rng.integers(1, len(words) // 3 + 1))
    out: list[list[Any]] = []
    length = len(words)
    for _ in range(count):
        mark = PUNCTUATION_MARKS[int(rng.integers(len(PUNCTUATION_MARKS)))]
        out.append([int(rng.integers(0, length)), mark])
        length += 1
    return out


def _draw_insertions(text: str, boosted: list[tuple[int, int]], rng: np.random.Generator) -> list[int]:
    """Character positions to insert the token at: one draw per position not skipped. With boosted
    sentences the token goes after the drawn character, else before it (as in the public code)."""
    positions: list[int] = []
    j = 0
    while j < len(text):
        rate = INSERT_RATE * INSERT_BOOST if any(lo <= j < hi for lo, hi in boosted) else INSERT_RATE
        if rng.random() < rate:
            positions.append(j + 1 if boosted else j)
            j += INSERT_SKIP + 1
        else:
            j += 1
    return positions


def split_sentences(text: str) -> list[str]:
    """Sentences ending in . ! or ? (a simple stand-in for nltk's sentence tokenizer)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def important_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences targeted insertion favours: the three whose content words
    are most frequent in the text, plus up to three question sentences; none for three or fewer."""
    sentences = split_sentences(text)
    if len(sentences) <= IMPORTANT_SENTENCES:
        return []
    words = [[w for w in re.findall(r"[a-z0-9]+", s.lower()) if w not in STOP_WORDS] for s in sentences]
    freq: dict[str, int] = defaultdict(int)
    for sentence in words:
        for w in sentence:
            freq[w] += 1
    scores = [sum(freq[w] for w in sentence) for sentence in words]
    chosen = [i for _, i in sorted(((sc, i) for i, sc in enumerate(scores)), reverse=True)[:IMPORTANT_SENTENCES]]
    questions = sorted((i for i, s in enumerate(sentences) if "?" in s or {"prompt", "question"} & set(words[i])),
                       key=lambda i: scores[i])[:IMPORTANT_SENTENCES]
    chosen += [i for i in questions if i not in chosen]
    spans = []
    for i in chosen:
        start = text.find(sentences[i])
        spans.append((start, start + len(sentences[i])))
    return spans


def apply_text_mutation(text: str, mutation: dict[str, Any]) -> str:
    """The mutated text under a drawn mutation."""
    op = mutation["op"]
    if op == "punctuation":
        if not mutation["insertions"]:
            return text
        words = text.strip().split(" ")
        for pos, mark in mutation["insertions"]:
            words.insert(pos, mark)
        return " ".join(words)
    if op == "targeted_insertion":
        out = text
        for pos in sorted(mutation["positions"], reverse=True):
            out = out[:pos] + mutation["token"] + out[pos:]
        return out
    raise ValueError(f"unknown text mutation {op!r}")


# ---- one variant ---------------------------------------------------------------------------------
def mutate(image: Image.Image | None, text: str, *, seed: int, sample_id: str, index: int,
           image_op: bool, text_op: bool) -> tuple[Image.Image | None, str, dict[str, Any]]:
    """Variant `index` of a sample: (image, text, the logged mutation). Only the parts asked for
    are mutated; an image-less sample has no image to mutate."""
    log: dict[str, Any] = {"index": index, "image": None, "text": None}
    if image_op and image is not None:
        log["image"] = draw_image_mutation(variant_rng(seed, sample_id, index, IMAGE_STREAM))
        image = apply_image_mutation(image, log["image"])
    if text_op:
        log["text"] = draw_text_mutation(text, variant_rng(seed, sample_id, index, TEXT_STREAM))
        text = apply_text_mutation(text, log["text"])
    return image, text, log
