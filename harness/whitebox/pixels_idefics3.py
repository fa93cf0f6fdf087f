"""Idefics3 / SmolVLM preprocessing: split into encoder tiles plus a global tile, or squash to one.

What the processor does (transformers' Idefics3ImageProcessor(Pil); SmolVLM's is the same code):
  1. resize so the longest edge is `size["longest_edge"]` (L), aspect kept;
  2. with splitting: resize both sides up to multiples of the encoder's tile `max_image_size`
     (M), cut the image into rows x cols tiles of M x M (row-major) and append the whole image
     resized to M x M (the global tile); an image no larger than M is sent as it is. Without
     splitting: resize to M x M;
  3. rescale and normalise, pad every tile to the batch's largest, with `pixel_attention_mask`.

The geometry is chosen so that steps 1 and 2's first resize are identities: with splitting, the
clean image at the size the processor tiles (rows * M x cols * M, read back from its tiles, whose
longest side is L when L is a multiple of M, as in the released checkpoints); without splitting,
the L x L square. The resizes that remain (the global tile; the squash when L differs from M) are
reproduced exactly on 8-bit images by `resample.LatticeResize`. Every tile of one image is M x M,
so nothing is padded and the attention mask is all ones.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from harness.whitebox.pixels import Normalise, Pipeline, Pixels, family
from harness.whitebox.resample import LatticeResize


def _edge(value: Any) -> int:
    return int(value["longest_edge"] if isinstance(value, dict) else value.longest_edge)


@family("Idefics3ImageProcessor", "Idefics3ImageProcessorFast", "Idefics3ImageProcessorPil",
        "SmolVLMImageProcessor", "SmolVLMImageProcessorFast", "SmolVLMImageProcessorPil")
class TilePipeline(Pipeline):
    """[N, 3, H, W] in [0, 1] -> pixel values [N, tiles, 3, M, M] and pixel_attention_mask [N, tiles, M, M]."""

    def __init__(self, backend: Any, ip: Any) -> None:
        super().__init__(backend, ip)
        self.tile = _edge(ip.max_image_size)
        self.split = bool(getattr(ip, "do_image_splitting", True))
        self.longest = _edge(ip.size) if getattr(ip, "do_resize", True) else self.tile
        self.norm = Normalise.of(ip)
        self.resize = LatticeResize(ip)
        self.size = self.default_size()

    def frames(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tiles of [N, 3, H, W] in [0, 1], in the processor's order, before normalisation."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        m = self.tile
        if not self.split:
            return [self.resize(x, (m, m))]
        if h <= m and w <= m:
            return [x]
        rows, cols = (h - m) // m + 1, (w - m) // m + 1
        tiles = [x[..., r * m : (r + 1) * m, c * m : (c + 1) * m] for r in range(rows) for c in range(cols)]
        return [*tiles, self.resize(x, (m, m))]

    def forward(self, x: torch.Tensor) -> Pixels:
        values = self.norm(torch.stack(self.frames(x), 1))  # [N, tiles, 3, h, w]
        mask = torch.ones((*values.shape[:2], *values.shape[-2:]), dtype=torch.long, device=x.device)
        return Pixels(values, {"pixel_attention_mask": mask})

    def view(self, backend: Any, image: Image.Image) -> torch.Tensor:
        """The image the processor tiles, read back from its tiles; without splitting, the tile
        brought to the L x L geometry by the processor's own resize (the identity when L == M)."""
        out = self.ip(images=[[image]], return_row_col_info=True, return_tensors="pt")
        values, mask = out["pixel_values"][0].detach().cpu(), out["pixel_attention_mask"][0].cpu()
        rows = int(torch.as_tensor(out["rows"]).reshape(-1)[0])
        cols = int(torch.as_tensor(out["cols"]).reshape(-1)[0])
        if rows:
            m = values.shape[-1]
            tiles = values[: rows * cols].reshape(rows, cols, 3, m, m).permute(2, 0, 3, 1, 4)
            return self.norm.to_units(tiles.reshape(3, rows * m, cols * m))
        valid = mask[0].bool()
        h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        u = self.norm.to_units(values[0, :, :h, :w])
        if self.split or self.longest == self.tile:
            return u
        return self.resize.exact(u.unsqueeze(0).double(), (self.longest, self.longest))[0].to(torch.int16)
