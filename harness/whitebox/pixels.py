"""The processor's image preprocessing, reimplemented in torch so the loss reaches the pixels.

Why not call the processor: it works on PIL images and numpy arrays, so the gradient stops there.
The attack therefore optimises an image in [0, 1] at a resolution (its geometry) that the processor
sends without resizing it, and a family pipeline applies in torch what the processor still does to
such an image, producing every image tensor the model takes (`Pixels`):
  - `pixels_clip`: CLIP/LLaVA/SigLIP-style processors: a centre crop and the normalisation, one
    fixed geometry (the resize target);
  - `pixels_qwen2vl`: Qwen2-VL/Qwen2.5-VL: normalisation and the patch flattening, with
    `image_grid_thw`; the geometry is the processor's own resize target of the clean image;
  - `pixels_idefics3`: Idefics3/SmolVLM: the tiles of a split image plus its downscaled global
    tile (reproduced exactly, `resample`), or the squash to the encoder's square, with
    `pixel_attention_mask`.
That claim is checked, not assumed: before a geometry is used, the real processor is run on a
random image of that size and the pipeline is refused (with the processor's name) when any tensor
differs by more than the tolerance, so an unsupported processor or setting fails with a clear
error instead of attacking the wrong input.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from harness.contracts.backend import user_request
from harness.errors import CapabilityError

#: Largest |difference| allowed between the processor's pixel values and ours (8-bit input, float32).
TOLERANCE = 1e-4
#: Side of the square whose processed geometry is a family's default (fill starts with no image).
DEFAULT_SIDE = 448
#: How often a processed image is sent again to reach a size the processor keeps.
SETTLE_TRIES = 3
#: processor class name -> its family's pipeline (filled by `family`; the modules load in `for_backend`).
FAMILIES: dict[str, type[Pipeline]] = {}


def family(*names: str) -> Callable[[type[Pipeline]], type[Pipeline]]:
    def register(cls: type[Pipeline]) -> type[Pipeline]:
        FAMILIES.update(dict.fromkeys(names, cls))
        return cls
    return register


@dataclass(frozen=True)
class Pixels:
    """The image inputs of N images: `values` [N, ...] carry the graph to the pixels; `constants`
    ([N, ...] each) are fixed by the geometry. `concat`: the model takes the rows' images joined
    along the first axis (Qwen2-VL's patch sequence) instead of stacked."""

    values: torch.Tensor
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    concat: bool = False

    @property
    def device(self) -> torch.device:
        return self.values.device

    def for_rows(self, owner: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for rows owned by images `owner` [R]."""
        def join(t: torch.Tensor) -> torch.Tensor:
            picked = t[owner.to(t.device)]
            return picked.flatten(0, 1) if self.concat else picked
        values = join(self.values)
        return {"pixel_values": values if dtype is None else values.to(dtype),
                **{k: join(v) for k, v in self.constants.items()}}


@dataclass(frozen=True)
class Normalise:
    """x in [0, 1] -> (x * 255 * rescale - mean) / std per channel, as the processor's rescale and normalise."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0  # 255 * rescale_factor (1 for the usual 1/255)

    @classmethod
    def of(cls, ip: Any) -> Normalise:
        on = getattr(ip, "do_normalize", True)
        mean = tuple(float(v) for v in (ip.image_mean if on else (0.0,) * 3))
        std = tuple(float(v) for v in (ip.image_std if on else (1.0,) * 3))
        scale = 255 * float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 255.0
        return cls(mean, std, 1.0 if abs(scale - 1.0) < 1e-12 else scale)  # type: ignore[arg-type]

    def _stats(self, like: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = [1] * like.dim()
        shape[channel_dim] = 3
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        return mean, torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)

    def __call__(self, x: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
        mean, std = self._stats(x, channel_dim)
        return ((x * self.scale if self.scale != 1.0 else x) - mean) / std

    def to_units(self, v: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
        """Normalised values -> 8-bit units [0, 255] int16 (rounded: the processor saw 8-bit pixels)."""
        mean, std = self._stats(v.double(), channel_dim)
        x = (v.double() * std + mean) / (self.scale if self.scale != 1.0 else 1.0)
        return x.mul(255).round().clamp(0, 255).to(torch.int16)


class Pipeline:
    """One processor's preprocessing at one geometry `size` (H, W); `at` gives another geometry."""

    #: Whether the family has one geometry only (the processor resizes every image to it).
    fixed: ClassVar[bool] = False
    size: tuple[int, int]

    def __init__(self, backend: Any, ip: Any) -> None:
        self.backend, self.ip, self.processor = backend, ip, type(ip).__name__
        self._verified: set[tuple[int, int]] = set()  # shared by every geometry's copy

    @classmethod
    def for_backend(cls, backend: Any) -> Pipeline:
        """The pipeline of this backend's image processor at its default geometry, verified against
        the processor itself."""
        from harness.whitebox import pixels_clip, pixels_idefics3, pixels_qwen2vl  # noqa: F401  (register)

        ip = getattr(getattr(backend, "processor", None), "image_processor", None)
        name = type(ip).__name__ if ip is not None else "none"
        if ip is None or name not in FAMILIES:
            raise CapabilityError(
                f"white-box attacks reimplement the image preprocessing in torch, and {name} (model "
                f"{getattr(backend, 'spec', '?')}) is not supported; supported: CLIP/LLaVA/SigLIP-style "
                "(resize, centre crop, normalise), Qwen2-VL/Qwen2.5-VL and Idefics3/SmolVLM processors")
        pipe = FAMILIES[name](backend, ip)
        pipe.verify(backend)
        return pipe

    def at(self, size: tuple[int, int]) -> Pipeline:
        """This pipeline at geometry `size` (verified against the processor the first time)."""
        size = (int(size[0]), int(size[1]))
        if self.fixed and size != self.size:
            raise CapabilityError(f"{self.processor} resizes every image to {self.size}; an image of {size} "
                                  "cannot be optimised")
        other = self
        if size != self.size:
            other = copy.copy(self)
            other.size = size
        if size not in self._verified:
            other.verify(self.backend)
        return other

    def __call__(self, x: torch.Tensor) -> Pixels:
        """[N, 3, H, W] pixels in [0, 1] -> the model's image inputs (a geometry seen first is verified)."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size not in self._verified:
            self.at(size)
        return self.forward(x)

    # ---- what a family defines ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Pixels:
        raise NotImplementedError

    def view(self, backend: Any, image: Image.Image) -> torch.Tensor:
        """What the processor makes of `image`, read back from its output in 8-bit units [3, H, W]."""
        raise NotImplementedError

    # ---- the clean image ----------------------------------------------------------------------------
    def initial(self, backend: Any, image: Image.Image) -> torch.Tensor:
        """The clean image as the model sees it, in 8-bit units [3, H, W], at a geometry the processor
        keeps. When no size of the image's aspect is kept (a Qwen2-VL pixel budget with min == max
        keeps only a few shapes), the image is first resized to the default geometry."""
        u = self.settle(backend, image)
        if u is None:
            u = self.settle(backend, image.convert("RGB").resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC))
        if u is None:
            raise CapabilityError(f"{self.processor} resizes every image it is sent again; no geometry to optimise at")
        return u

    def settle(self, backend: Any, image: Image.Image) -> torch.Tensor | None:
        """The processor's view of `image`, sent again until the processor keeps its size (None if it
        never does within SETTLE_TRIES)."""
        u = self.view(backend, image.convert("RGB"))
        for _ in range(SETTLE_TRIES):
            again = self.view(backend, to_image(u))
            if again.shape == u.shape:
                return u
            u = again
        return None

    def default_size(self) -> tuple[int, int]:
        """The geometry of a DEFAULT_SIDE square: what fill starts (gray, noise) are optimised at."""
        u = self.settle(self.backend, Image.new("RGB", (DEFAULT_SIDE, DEFAULT_SIDE), (128, 128, 128)))
        if u is None:
            raise CapabilityError(f"{self.processor} keeps no size of a square image; no geometry to optimise at")
        return int(u.shape[-2]), int(u.shape[-1])

    # ---- the check ------------------------------------------------------------------------------
    def verify(self, backend: Any) -> None:
        """Refuse when the processor does not send an image of `size` as this pipeline computes it."""
        rng = np.random.default_rng(0)
        u = torch.from_numpy(rng.integers(0, 256, size=(3, *self.size), dtype=np.uint8))
        batch = backend.encode([user_request("x", to_image(u))])
        seq = tuple(batch["input_ids"].shape)
        got = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask") and tuple(v.shape) != seq}
        want = self.forward(u.double().unsqueeze(0) / 255).for_rows(torch.tensor([0]))
        if set(got) != set(want):
            raise CapabilityError(f"{self.processor}: the processor sends {sorted(got)}, this pipeline computes "
                                  f"{sorted(want)}; the attack would optimise the wrong input")
        for key, mine in want.items():
            theirs = got[key]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise CapabilityError(f"{self.processor}: {key} of shape {tuple(theirs.shape)} for a {self.size} image, "
                                      f"this pipeline computes {tuple(mine.shape)}")
            if theirs.is_floating_point():
                err = float((theirs.double().cpu() - mine.double().cpu()).abs().max())
                if err > max(TOLERANCE, _dtype_tolerance(theirs.dtype)):
                    raise CapabilityError(f"{self.processor}: our torch preprocessing differs from the processor's by "
                                          f"{err:.2e} ({key}) on an image of {self.size}; the attack would optimise "
                                          "the wrong input")
            elif not torch.equal(theirs.cpu().long(), mine.cpu().long()):
                raise CapabilityError(f"{self.processor}: {key} differs from the processor's on an image of {self.size}")
        self._verified.add(self.size)


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
