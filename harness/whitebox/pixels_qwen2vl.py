"""Qwen2-VL / Qwen2.5-VL preprocessing: normalise, then flatten into the vision encoder's patches.

Why the geometry is per image: the processor keeps each image's aspect ratio, resizing it to the
nearest size whose sides are multiples of patch_size * merge_size within its pixel budget
(`smart_resize`). An image already at such a size is sent unresized, so the attack optimises the
clean image at the processor's own target for it (read back from the processor's output, not
recomputed), and a fill start (no image) at the target of a DEFAULT_SIDE square. (A target the
processor would resize again, which a budget with min_pixels == max_pixels allows, is handled by
`Pipeline.initial`.)

The flattening, as transformers' Qwen2VLImageProcessor(Pil).patchify: the image [C, H, W] with
gh = H / patch, gw = W / patch is cut into [C, gh/m, m, patch, gw/m, m, patch] (m = merge_size),
ordered merge window by merge window, row-major inside each window ([gh/m, gw/m, m, m, C, patch,
patch]), each patch repeated temporal_patch_size times after the channel axis (a still image is a
clip of identical frames) and flattened to [gh * gw, C * temporal * patch * patch]. The model takes
the images' patch rows concatenated, with `image_grid_thw` [1, gh, gw] per image.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from harness.contracts.backend import user_request
from harness.errors import CapabilityError
from harness.whitebox.pixels import Normalise, Pipeline, Pixels, family


@family("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
class PatchPipeline(Pipeline):
    """[N, 3, H, W] in [0, 1] -> pixel values [N, gh * gw, C * T * p * p] and image_grid_thw [N, 1, 3]."""

    def __init__(self, backend: Any, ip: Any) -> None:
        super().__init__(backend, ip)
        self.patch, self.merge = int(ip.patch_size), int(ip.merge_size)
        self.temporal = int(ip.temporal_patch_size)
        self.norm = Normalise.of(ip)
        self.size = self.default_size()

    def forward(self, x: torch.Tensor) -> Pixels:
        n, c, h, w = x.shape
        p, m, t = self.patch, self.merge, self.temporal
        if h % (p * m) or w % (p * m):
            raise CapabilityError(f"{self.processor}: an image of {(h, w)} is not a multiple of {p * m} pixels a side")
        gh, gw = h // p, w // p
        z = self.norm(x).reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        z = z.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1).reshape(n, gh * gw, c * t * p * p)
        grid = torch.tensor([1, gh, gw], dtype=torch.long, device=x.device).expand(n, 1, 3)
        return Pixels(z, {"image_grid_thw": grid}, concat=True)

    def view(self, backend: Any, image: Image.Image) -> torch.Tensor:
        """The processor's resize of `image`, read back from its patches (the first temporal copy)."""
        batch = backend.encode([user_request("x", image)])
        _, gh, gw = (int(v) for v in batch["image_grid_thw"][0].tolist())
        p, m, t = self.patch, self.merge, self.temporal
        patches = batch["pixel_values"].detach().cpu().reshape(gh // m, gw // m, m, m, -1, t, p, p)[:, :, :, :, :, 0]
        image_chw = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, gh * p, gw * p)
        return self.norm.to_units(image_chw)
