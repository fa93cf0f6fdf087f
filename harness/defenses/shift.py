"""Shared pieces of the representation defenses: reference images, batched state differences,
text-only states, and how per-layer shifts turn into edit vectors.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from harness.contracts.backend import Backend, Request, user_request

BlankKind = Literal["blank", "noise", "mean"]
# CLIP's per-channel pixel mean, used only when the backend does not know its processor's own.
DEFAULT_MEAN_RGB = (0.48145466, 0.4578275, 0.40821073)


def reference_image(kind: str, size: tuple[int, int], seed: int = 0, mean_rgb: tuple[float, ...] | None = None) -> Image.Image:
    """The meaningless image `img'` of CMRM: white, seeded uniform noise, or the processor's mean colour."""
    w, h = size
    if kind == "blank":
        return Image.new("RGB", (w, h), (255, 255, 255))
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
    if kind == "mean":
        rgb = tuple(int(round(255 * c)) for c in (mean_rgb or DEFAULT_MEAN_RGB))
        return Image.new("RGB", (w, h), rgb)  # type: ignore[arg-type]
    raise ValueError(f"unknown reference image kind {kind!r}")


def state_difference(
    backend: Backend, first: list[Request], second: list[Request], layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first - second, first, second) last-prompt-token states, both sides in one batched forward."""
    states = backend.last_token_states(first + second, layers).float()  # type: ignore[attr-defined]
    a, b = states[: len(first)], states[len(first) :]
    return a - b, a, b


def text_only(text: str) -> Request:
    return user_request(text)


def text_states(backend: Backend, texts: list[str], layers: list[int], batch_size: int, desc: str,
                progress: bool) -> torch.Tensor:
    """[n, len(layers), hidden] last-prompt-token states of text-only requests, in batches."""
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = texts[start : start + batch_size]
        chunks.append(backend.last_token_states([text_only(t) for t in batch], layers).float())  # type: ignore[attr-defined]
    return torch.cat(chunks)


def layer_vectors(shift: torch.Tensor, layers: list[int], accumulate: str) -> torch.Tensor:
    """Turn measured shifts into the vectors to subtract at `layers`.

    `shift` is [..., len(layers), hidden], measured without intervention. `independent`: each
    layer subtracts its full shift. `incremental`: each subtracts only what the edited layers
    below have not removed already (Δ^l_k - Δ^l_{k-1}), so the edits do not compound down the
    residual stream.
    """
    if accumulate == "independent":
        return shift
    if accumulate == "incremental":
        out = shift.clone()
        out[..., 1:, :] = shift[..., 1:, :] - shift[..., :-1, :]
        return out
    raise ValueError(f"unknown accumulation {accumulate!r}")
