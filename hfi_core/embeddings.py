"""CLIP image and text embeddings, the one place that calls a ``CLIPModel``.

Used by the toy world's checks, the reward model and the evaluation alike, on tiny CLIP and on
``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor


def _features(out: torch.Tensor | object) -> torch.Tensor:
    # transformers < 5 returned the projected tensor; 5.x returns an output whose pooler_output
    # holds it.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def text_embeddings(model: CLIPModel, processor: CLIPProcessor, texts: list[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings, (len(texts), D), on the CPU like
    ``image_embeddings``' (CLIP may run on a GPU; the products of the two must not mix devices)."""
    t = processor(text=texts, padding="max_length", truncation=True, return_tensors="pt")
    out = model.get_text_features(
        input_ids=t.input_ids.to(model.device), attention_mask=t.attention_mask.to(model.device)
    )
    return F.normalize(_features(out).float(), dim=-1).cpu()


@torch.no_grad()
def image_embeddings(
    model: CLIPModel, processor: CLIPProcessor, images: np.ndarray | list, batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised projected image embeddings, (N, D); ``images`` uint8 (N, H, W, 3) or PIL."""
    out = []
    for i in range(0, len(images), batch_size):
        pixels = processor(images=list(images[i : i + batch_size]), return_tensors="pt").pixel_values
        feats = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype))
        out.append(F.normalize(_features(feats).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)
