"""CLIP/LLaVA/SigLIP-style preprocessing: resize to one size, centre crop, normalise.

Why one geometry: these processors resize every image to the same target, so the attack optimises
an image already at that target, where the resize is a no-op and only the crop (itself a no-op
when the target equals the crop) and the normalisation remain.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from harness.contracts.backend import user_request
from harness.errors import CapabilityError
from harness.whitebox.pixels import Normalise, Pipeline, Pixels, family


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


@family("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "LlavaImageProcessor",
        "LlavaImageProcessorFast", "SiglipImageProcessor", "SiglipImageProcessorFast")
class CropPipeline(Pipeline):
    """Image at `size` (the resize target) -> centre crop to `crop` -> (x - mean) / std."""

    fixed = True

    def __init__(self, backend: Any, ip: Any) -> None:
        super().__init__(backend, ip)
        size = _pair(getattr(ip, "size", None))
        crop = _pair(getattr(ip, "crop_size", None)) if getattr(ip, "do_center_crop", False) else None
        if size is None:
            raise CapabilityError(f"{self.processor} names no input size the attack can optimise at")
        self.size, self.crop, self.norm = size, crop or size, Normalise.of(ip)

    def forward(self, x: torch.Tensor) -> Pixels:
        """[N, 3, H, W] at `size` -> pixel values [N, 3, crop]."""
        h, w = self.size
        ch, cw = self.crop
        top, left = (h - ch) // 2, (w - cw) // 2
        return Pixels(self.norm(x[..., top : top + ch, left : left + cw]))

    def view(self, backend: Any, image: Image.Image) -> torch.Tensor:
        """The processor's own resize and crop of `image`, read back from its pixel values (so the
        start is exactly what the model saw), rounded to 8 bits; outside the crop, gray."""
        batch = backend.encode([user_request("x", image)])
        crop = self.norm.to_units(batch["pixel_values"][0].detach().cpu())
        if self.crop == self.size:
            return crop
        out = torch.full((3, *self.size), 128, dtype=torch.int16)  # resize target larger than the crop
        top, left = (self.size[0] - self.crop[0]) // 2, (self.size[1] - self.crop[1]) // 2
        out[:, top : top + self.crop[0], left : left + self.crop[1]] = crop
        return out
