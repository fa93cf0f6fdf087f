"""The processor's image preprocessing, reimplemented in torch so the loss reaches the pixels.

Why not call the processor: it works on PIL images and numpy arrays, so the gradient stops there.
The attack therefore optimises an image already at the model's input resolution, in [0, 1], and
applies only what the processor would still do to such an image: a centre crop (a no-op when the
resize target equals the crop) and the normalisation (x - mean) / std. That claim is checked, not
assumed: `Pipeline.for_backend` runs the real processor on a random image at that resolution and
refuses (with the processor's name) when the two disagree, so an unsupported processor (Qwen2-VL's
patch flattening, Idefics3's splitting and padding) fails with a clear error instead of attacking
the wrong input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from harness.contracts.backend import user_request
from harness.errors import CapabilityError

#: Largest |difference| allowed between the processor's pixel values and ours (8-bit input, float32).
TOLERANCE = 1e-4
SUPPORTED = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "LlavaImageProcessor",
             "LlavaImageProcessorFast", "SiglipImageProcessor", "SiglipImageProcessorFast")


def _pair(value: Any) -> tuple[int, int] | None:
    """(height, width) from a processor size entry (dict, SizeDict or int)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    get = value.get if isinstance(value, dict) else (lambda k: getattr(value, k, None))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    if get("shortest_edge"):
        return int(get("shortest_edge")), int(get("shortest_edge"))
    return None


@dataclass(frozen=True)
class Pipeline:
    """Image at `size` (the resize target) -> centre crop to `crop` -> (x - mean) / std."""

    size: tuple[int, int]
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    processor: str

    @classmethod
    def for_backend(cls, backend: Any) -> Pipeline:
        """The pipeline of this backend's image processor, verified against the processor itself."""
        ip = getattr(getattr(backend, "processor", None), "image_processor", None)
        name = type(ip).__name__ if ip is not None else "none"
        if ip is None or name not in SUPPORTED:
            raise CapabilityError(
                f"white-box attacks reimplement the image preprocessing in torch, and {name} (model "
                f"{getattr(backend, 'spec', '?')}) is not supported: CLIP/LLaVA/SigLIP-style processors "
                "(resize, centre crop, normalise) are; Qwen2-VL and Idefics3 processors are not")
        size = _pair(getattr(ip, "size", None))
        crop = _pair(getattr(ip, "crop_size", None)) if getattr(ip, "do_center_crop", False) else None
        if size is None:
            raise CapabilityError(f"{name} names no input size the attack can optimise at")
        mean = tuple(float(v) for v in (ip.image_mean if getattr(ip, "do_normalize", True) else (0.0,) * 3))
        std = tuple(float(v) for v in (ip.image_std if getattr(ip, "do_normalize", True) else (1.0,) * 3))
        pipe = cls(size, crop or size, mean, std, name)  # type: ignore[arg-type]
        pipe.verify(backend)
        return pipe

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels in [0, 1] at `size` -> the model's pixel values [N, 3, crop]."""
        h, w = self.size
        ch, cw = self.crop
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def verify(self, backend: Any) -> None:
        """Refuse when the processor does not send a `size` image as this pipeline computes it."""
        rng = np.random.default_rng(0)
        u = rng.integers(0, 256, size=(3, *self.size), dtype=np.uint8)
        batch = backend.encode([user_request("x", to_image(torch.from_numpy(u)))])
        got = batch.get("pixel_values")
        want = self(torch.from_numpy(u).double().unsqueeze(0) / 255)
        if got is None or tuple(got.shape) != tuple(want.shape):
            raise CapabilityError(f"{self.processor}: pixel values of shape {None if got is None else tuple(got.shape)}, "
                                  f"expected {tuple(want.shape)}; white-box attacks need one [3, H, W] tensor per image")
        err = float((got.double().cpu() - want).abs().max())
        if err > max(TOLERANCE, _dtype_tolerance(got.dtype)):
            raise CapabilityError(f"{self.processor}: our torch preprocessing differs from the processor's by {err:.2e} "
                                  "on an image at its input size; the attack would optimise the wrong input")

    def initial(self, backend: Any, image: Image.Image) -> torch.Tensor:
        """The clean image as the model sees it, in 8-bit units [3, H, W] at `size`: the processor's own
        resize and crop of `image`, read back from its pixel values (so the start is exactly what the
        model saw), rounded to 8 bits."""
        batch = backend.encode([user_request("x", image.convert("RGB"))])
        pv = batch["pixel_values"][0].detach().double().cpu()
        mean = torch.tensor(self.mean, dtype=torch.float64)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float64)[:, None, None]
        crop = (pv * std + mean).mul(255).round().clamp(0, 255).to(torch.int16)
        if self.crop == self.size:
            return crop
        out = torch.full((3, *self.size), 128, dtype=torch.int16)  # resize target larger than the crop
        top, left = (self.size[0] - self.crop[0]) // 2, (self.size[1] - self.crop[1]) // 2
        out[:, top : top + self.crop[0], left : left + self.crop[1]] = crop
        return out


def _dtype_tolerance(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 0.0)


def to_image(u: torch.Tensor) -> Image.Image:
    """8-bit units [3, H, W] (any integer or float dtype holding integers) -> an RGB PIL image."""
    arr = u.detach().cpu().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def from_image(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> 8-bit units [3, H, W] int16."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.int16)
