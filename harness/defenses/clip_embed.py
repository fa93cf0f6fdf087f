"""CLIP embeddings of (image, query) pairs, for AdaShield-A's prompt retrieval.

AdaShield-A keys its prompt pool by CLIP ViT-B/32 embeddings of the image and of the query,
each L2-normalised and concatenated. The cosine of two such concatenations is the mean of the
image cosine and the text cosine, which is what `pair_similarity` computes without building
the concatenation. A sample without an image has no image half: it is compared on the text
half alone (a zero image half would cap its similarity at 0.5 and silently disable retrieval).

Images and text go through the checkpoint's own image processor and tokenizer (loaded apart,
so a missing torchvision or an unusual processor class cannot break loading); text longer than
CLIP's context is truncated, as CLIP was trained.
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

    def __init__(self, name: str = DEFAULT_CLIP, device: str | None = None, batch_size: int = 32) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.name = name
        self.batch_size = batch_size
        try:
            self.model = CLIPModel.from_pretrained(name).eval()
            self.image_processor = AutoImageProcessor.from_pretrained(name)
            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load CLIP model {name!r} for AdaShield retrieval: {exc}") from exc
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


def pair_similarity(
    q_image: torch.Tensor, q_text: torch.Tensor, q_has_image: torch.Tensor,
    k_image: torch.Tensor, k_text: torch.Tensor, k_has_image: torch.Tensor,
) -> torch.Tensor:
    """[queries, keys] cosine of L2-normalised (image ++ text) concatenations.

    Where both sides have an image: (image cosine + text cosine) / 2, exactly the cosine of the
    concatenations. Where either side lacks one: the text cosine alone.
    """
    text_cos = q_text @ k_text.T
    both = q_has_image[:, None] & k_has_image[None, :]
    return torch.where(both, (q_image @ k_image.T + text_cos) / 2, text_cos)
