"""A CLIP model that embeds images and texts into unit vectors of one shared space.

Neutral ground for every component that needs CLIP embeddings: defenses (AdaShield-A retrieval,
ETA's image-text score, through harness.defenses.clip_embed) and attacks (CS-DJ's distractor
selection) load it from here, since attacks may not import defenses.

Images and text go through the checkpoint's own image processor and tokenizer (loaded apart,
so a missing torchvision or an unusual processor class cannot break loading); text longer than
CLIP's context is truncated, as CLIP was trained. `subfolder` loads a CLIP stored inside a larger
repository (sentence-transformers keeps it in `0_CLIPModel/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from harness.errors import ModelLoadError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is projected; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """A CLIP model that embeds images and texts into unit vectors of one shared space."""

    def __init__(self, name: str = DEFAULT_CLIP, device: str | None = None, batch_size: int = 32,
                 purpose: str = "AdaShield retrieval", subfolder: str | None = None) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.name = name
        self.subfolder = subfolder
        self.batch_size = batch_size
        where = {"subfolder": subfolder} if subfolder else {}
        try:
            self.model = CLIPModel.from_pretrained(name, **where).eval()
            self.image_processor = AutoImageProcessor.from_pretrained(name, **where)
            self.tokenizer = AutoTokenizer.from_pretrained(name, **where)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load CLIP model {name!r} for {purpose}: {exc}") from exc
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        text_config = self.model.config.text_config
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def identity(self) -> dict[str, Any]:
        """Embeddings are only comparable within one CLIP model: pools record and check this."""
        from harness.models.hf_loading import folder_fingerprint

        ident: dict[str, Any] = {"model": self.name, "commit": getattr(self.model.config, "_commit_hash", None)}
        if self.subfolder:
            ident["subfolder"] = self.subfolder
        folder = Path(self.name).expanduser()
        if folder.is_dir():
            ident["folder_hash"] = folder_fingerprint(folder)
        return ident

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[n, dim] unit vectors, float32 on CPU."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out.append(_features(self.model.get_text_features(**enc)).float().cpu())
        return _unit(torch.cat(out) if out else torch.zeros(0, self.dim))

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """[n, dim] unit vectors, float32 on CPU."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, dtype=self.model.dtype)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return _unit(torch.cat(out) if out else torch.zeros(0, self.dim))

    def embed_pairs(self, images: list[Image.Image | None], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image [n, dim], text [n, dim], has_image [n] bool). Rows without an image are zero."""
        has_image = torch.tensor([im is not None for im in images], dtype=torch.bool)
        image_emb = torch.zeros(len(images), self.dim)
        idx = [i for i, im in enumerate(images) if im is not None]
        if idx:
            image_emb[idx] = self.embed_images([images[i] for i in idx])  # type: ignore[misc]
        return image_emb, self.embed_texts(texts), has_image


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
