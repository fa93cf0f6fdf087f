"""JailGuard's image mutations in torch, so an adaptive attack can average its loss over them
(expectation over transformations, Athalye et al. 2018).

JailGuard flags an input whose answers to randomly mutated copies disagree, so the attacker wants
every mutated copy to give the target answer: the loss is averaged over fresh draws of the same
mutations each step. The draws are harness.defenses.mutations' own (`draw_image_mutation`: the
same operators, probabilities and parameter ranges), seeded by the attacked item's seed, the step
and the copy, so a resumed optimisation draws what an uninterrupted one drew and nothing needs
checkpointing. They are the attacker's draws, not the defense's: JailGuard's variants are seeded
too (its `seed` and the sample id), and an attacker who knew that seed could optimise against
exactly its N variants; EOT assumes it does not.

Each operator is applied to the image as JailGuard sees it (the attacked PNG at the model's input
size; the processor's resize is then a no-op), in 8-bit units, and gives exactly mutations.py's
output on an 8-bit image (tested on fixed draws). The gradient, operator by operator:
  rotate     exact. Nearest-neighbour rotation reads each output pixel from one source pixel (or
             leaves it black), so it is a gather whose gradient goes to the pixel Pillow reads. The
             source pixel is Pillow's: its affine map in 16.16 fixed point (`affine_fixed` in
             libImaging/Geometry.c), and its exact 90/180/270 degree fast paths.
  blur       exact convolution (same kernel, reflect padding, summation order, in float64); the final
             rounding to 8-bit levels has zero gradient almost everywhere, so it is passed straight
             through (forward rounded, backward identity: BPDA).
  posterize  a step function of the pixel value (keep the top `bits` bits), zero gradient almost
             everywhere: its closest differentiable form here is straight-through (forward exact,
             backward identity). Not applied (probability 0.5) is the identity.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.defenses.mutations import draw_image_mutation, gaussian_kernel

EOT_STREAM = 2  # keeps the attacker's draws apart from JailGuard's (its streams are 0 and 1)


def draws(item_seed: int, step: int, k: int) -> list[dict[str, Any]]:
    """The `k` mutations of one item at one step (JailGuard's policy, the attacker's seed)."""
    return [draw_image_mutation(np.random.default_rng([EOT_STREAM, item_seed % 2**64, step, i])) for i in range(k)]


def straight_through(v: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """`forward`'s values exactly, with `v`'s gradient (identity backward)."""
    return forward.detach() + (v - v.detach())


def _fix(v: float) -> int:
    """Pillow's 16.16 fixed point: FLOOR(v * 65536.0 + 0.5)."""
    return math.floor(v * 65536.0 + 0.5)


def rotation_source(angle: float, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat source index [H*W], inside mask [H*W]) of Pillow's `rotate(angle, NEAREST, expand=False)`
    for an image of that size (its affine path; the exact multiples of 90 degrees are `rotate`'s)."""
    rad = -math.radians(angle % 360.0)
    a, b, d, e = (round(math.cos(rad), 15), round(math.sin(rad), 15), round(-math.sin(rad), 15),
                  round(math.cos(rad), 15))
    cx, cy = width / 2, height / 2
    c = a * -cx + b * -cy + 0.0 + cx  # Image.rotate's matrix, in its order of operations
    f = d * -cx + e * -cy + 0.0 + cy
    a0, a1, a3, a4 = _fix(a), _fix(b), _fix(d), _fix(e)
    a2, a5 = _fix(c + a * 0.5 + b * 0.5), _fix(f + d * 0.5 + e * 0.5)
    y = torch.arange(height, dtype=torch.int64)[:, None]
    x = torch.arange(width, dtype=torch.int64)[None, :]
    xin = torch.div(a2 + y * a1 + x * a0, 65536, rounding_mode="floor")  # C's >> 16 on ints
    yin = torch.div(a5 + y * a4 + x * a3, 65536, rounding_mode="floor")
    inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
    index = (yin.clamp(0, height - 1) * width + xin.clamp(0, width - 1)).reshape(-1)
    return index, inside.reshape(-1)


def rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    """[..., H, W] -> rotated `angle` degrees counter-clockwise about the centre, same canvas,
    nearest neighbour, black outside (mutations.apply_image_mutation's rotation)."""
    h, w = x.shape[-2:]
    turn = angle % 360.0
    if turn == 0:
        return x
    if turn == 180:
        return x.flip(-2, -1)
    if turn in (90, 270) and h == w:
        return torch.rot90(x, 1 if turn == 90 else -1, dims=(-2, -1))
    index, inside = rotation_source(angle, h, w)
    flat = x.reshape(*x.shape[:-2], h * w)
    out = flat[..., index.to(x.device)] * inside.to(x.device, x.dtype)
    return out.reshape(x.shape)


def blur(x: torch.Tensor, kernel: tuple[int, int] | list[int], sigma: float) -> torch.Tensor:
    """[..., H, W] in [0, 1] -> mutations.gaussian_blur of its 8-bit image (width kx, height ky)."""
    kx, ky = int(kernel[0]), int(kernel[1])
    v = x.to(torch.float64) * 255
    shape = v.shape
    flat = v.reshape(-1, 1, *shape[-2:])
    padded = F.pad(flat, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect") if kx > 1 or ky > 1 else flat
    h, w = shape[-2:]
    wx, wy = gaussian_kernel(kx, sigma).tolist(), gaussian_kernel(ky, sigma).tolist()
    rows: Any = 0  # summed in mutations.gaussian_blur's order, so the rounding ties fall alike
    for i in range(kx):
        rows = rows + wx[i] * padded[..., :, i : i + w]
    out: Any = 0
    for i in range(ky):
        out = out + wy[i] * rows[..., i : i + h, :]
    out = straight_through(out, out.round().clamp(0, 255))
    return (out.reshape(shape) / 255).to(x.dtype)


def posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., H, W] in [0, 1] -> each 8-bit level with only its top `bits` bits (ImageOps.posterize),
    straight-through."""
    v = x.to(torch.float64) * 255
    step = 2 ** (8 - int(bits))
    kept = torch.floor(v.round() / step) * step
    return (straight_through(v, kept) / 255).to(x.dtype)


def apply(x: torch.Tensor, mutation: dict[str, Any]) -> torch.Tensor:
    """One drawn mutation (mutations.draw_image_mutation's dict) applied to [..., 3, H, W] in [0, 1]."""
    op = mutation["op"]
    if op == "rotate":
        return rotate(x, float(mutation["angle"]))
    if op == "blur":
        return blur(x, mutation["kernel"], float(mutation["sigma"]))
    if op == "posterize":
        return posterize(x, int(mutation["bits"])) if mutation["applied"] else x
    raise ValueError(f"unknown image mutation {op!r}")
