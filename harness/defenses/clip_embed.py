"""CLIP embeddings of (image, query) pairs, for AdaShield-A's prompt retrieval.

AdaShield-A keys its prompt pool by CLIP ViT-B/32 embeddings of the image and of the query,
each L2-normalised and concatenated. The cosine of two such concatenations is the mean of the
image cosine and the text cosine, which is what `pair_similarity` computes without building
the concatenation. A sample without an image has no image half: it is compared on the text
half alone (a zero image half would cap its similarity at 0.5 and silently disable retrieval).

The embedder itself (`ClipEmbedder`) lives in harness.models.clip, shared with attacks (which may
not import defenses); it is re-exported here unchanged.
"""

from __future__ import annotations

import torch

from harness.models.clip import DEFAULT_CLIP, ClipEmbedder  # noqa: F401  (re-exported: defenses import them here)


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
