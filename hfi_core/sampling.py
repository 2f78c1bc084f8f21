"""Seeded batched sampling: the one loop that turns (prompt, seed) pairs into images.

Generation, evaluation, the token's sample grid and the toy-world check all draw through
``sample``, so an image depends on its prompt, its seed and the sampler settings, and on nothing
else: not on its position in a run, and not on which of those callers asked for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


@torch.no_grad()
def sample(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    guidance: float,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 64,
    negative_prompt: str | None = None,
    extra: dict[str, Any] | None = None,
    desc: str | None = None,
) -> np.ndarray:
    """One image per (prompt, seed), uint8 (N, H, W, 3).

    Args:
        pipe: a ``StableDiffusionPipeline`` (or SLD's, with its preset in ``extra``).
        seeds: image i starts from ``torch.Generator(pipe.device).manual_seed(seeds[i])``.
        height, width: pixels; ``None``: the model's native size.
        negative_prompt: the same negative prompt for every image, or none.
        extra: further call arguments (SLD's guidance settings).
        desc: show a progress bar with this label; ``None``: no bar.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=desc, disable=desc is None, unit="batch", dynamic_ncols=True):
        chunk_prompts, chunk_seeds = prompts[i : i + batch_size], seeds[i : i + batch_size]
        images = pipe(
            chunk_prompts,
            negative_prompt=[negative_prompt] * len(chunk_prompts) if negative_prompt else None,
            generator=[torch.Generator(pipe.device).manual_seed(s) for s in chunk_seeds],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            output_type="np",
            **(extra or {}),
        ).images  # (B, H, W, 3) float in [0, 1]
        out.append(np.round(np.asarray(images) * 255).clip(0, 255).astype(np.uint8))
    if not out:
        raise ValueError("sample: no prompts")
    return np.concatenate(out)
