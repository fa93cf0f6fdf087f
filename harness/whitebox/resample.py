"""A processor's 8-bit image resize as a torch function: exact on 8-bit images, linear in between.

Why: Idefics3 (and SmolVLM) send every split image together with a downscaled copy of the whole
image (the "global" tile), and without splitting squash the image to the encoder's square. Such a
resize cannot be made an identity by choosing the optimisation size, so the attack must reproduce
it. Pillow resizes 8-bit images in fixed point, rounding and clipping after each of its two passes,
so the output is a step function of the input and has no useful gradient. `LatticeResize` therefore
returns

    y(u) = L(u) + [R(round(u)) - L(round(u))]

where R is the processor's own resize method applied to the rounded 8-bit image (so at every 8-bit
image y is exactly what the processor sends, with no reimplementation of its arithmetic to drift)
and L is the same filter in floating point: Pillow's own weights, read off by resizing an identity
matrix in its 32-bit float mode, applied horizontally then vertically with its clipping. The
bracket is constant between lattice points (detached), so the gradient is L's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


def _is_pil(ip: Any) -> bool:
    """Whether the image processor resizes numpy arrays through Pillow (transformers' PilBackend)."""
    return any(cls.__name__ == "PilBackend" for cls in type(ip).__mro__)


class LatticeResize:
    """[N, C, H, W] in [0, 1] -> [N, C, h, w] in [0, 1], the processor's resize (see module docstring)."""

    def __init__(self, ip: Any) -> None:
        self.ip = ip
        self.resample = ip.resample
        self._weights: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x  # Pillow returns a copy for an unchanged size
        kv = self.weights(int(x.shape[-2]), int(size[0])).to(x.device, x.dtype)
        kh = self.weights(int(x.shape[-1]), int(size[1])).to(x.device, x.dtype)
        u = x * 255
        lattice = u.detach().round().clamp(0, 255)
        correction = self.exact(lattice, size).to(x.device, x.dtype) - _linear(lattice, kv, kh)
        return (_linear(u, kv, kh) + correction.detach()) / 255

    def exact(self, u: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The processor's own resize of 8-bit images [N, C, H, W] (integers as floats) -> [N, C, h, w]."""
        from transformers.image_utils import SizeDict

        target = SizeDict(height=int(size[0]), width=int(size[1]))
        u8 = u.detach().cpu().round().clamp(0, 255).to(torch.uint8)
        if _is_pil(self.ip):
            out = [np.asarray(self.ip.resize(np.ascontiguousarray(img.numpy()), target, resample=self.resample))
                   for img in u8]
            return torch.from_numpy(np.stack(out).astype(np.float64))
        return self.ip.resize(u8, target, resample=self.resample).to(torch.float64)

    def weights(self, n_in: int, n_out: int) -> torch.Tensor:
        """[n_out, n_in] float64: Pillow's weights of this filter along one axis (row i: output i)."""
        key = (n_in, n_out)
        if key not in self._weights:
            eye = Image.fromarray(np.eye(n_in, dtype=np.float32))  # 32-bit float mode "F"
            stretched = np.asarray(eye.resize((n_out, n_in), resample=int(self.resample)))  # [n_in, n_out]
            self._weights[key] = torch.from_numpy(stretched.T.astype(np.float64).copy())
        return self._weights[key]


def _linear(u: torch.Tensor, kv: torch.Tensor, kh: torch.Tensor) -> torch.Tensor:
    """Pillow's two passes in floating point: horizontal, clip, vertical, clip (8-bit units)."""
    wide = (u @ kh.transpose(0, 1)).clamp(0, 255)
    return (kv @ wide).clamp(0, 255)
