"""What a distillation run leaves behind: a diffusers UNet folder, a delta, a model card.

The delta holds the trained parameters' *values*, not differences: ``base + (new - base)`` is
not bitwise ``new`` in floating point, and applying the delta must reproduce the saved UNet
exactly. It is small (cross-attention is ~5% of SD's UNet) and loads onto any copy of the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

DELTA = "delta.safetensors"


def save_distilled(out: Path, unet: UNet2DConditionModel, trained: list[str], card: dict[str, Any]) -> dict[str, Path]:
    """Write ``unet/`` (``UNet2DConditionModel.from_pretrained``), ``delta.safetensors`` and ``README.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    state = unet.state_dict()
    save_file(
        {n: state[n].detach().cpu().contiguous() for n in trained}, out / DELTA, metadata={"format": "hfi-delta-v1"}
    )
    (out / "README.md").write_text(model_card(card))
    (out / "card.json").write_text(json.dumps(card, indent=2, default=str))
    return {"unet": out / "unet", "delta": out / DELTA, "card": out / "README.md"}


def apply_delta(unet: UNet2DConditionModel, delta: Path) -> UNet2DConditionModel:
    """Load a delta's tensors into ``unet`` in place (every name must exist in it).

    Raises:
        ValueError: naming the first parameter the UNet does not have or whose shape differs.
    """
    tensors = load_file(delta)
    params = dict(unet.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(f"{delta}: parameter {name!r} is not in this UNet (another base model?)")
        if params[name].shape != value.shape:
            raise ValueError(
                f"{delta}: {name!r} has shape {tuple(value.shape)}, the UNet's is {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
    return unet


def model_card(card: dict[str, Any]) -> str:
    """A Markdown model card: what was removed, with what, how, and how it measured."""
    lines = [
        f"# {card.get('name', 'hfi model')}: concept removed: {card.get('concept', '?')}",
        "",
        f"Base model: `{card.get('base_model', '?')}`. Method: **{card.get('method', '?').upper()}**"
        + (
            " with the HFI token(s) " + ", ".join(f"`{t}`" for t in card["tokens"]) + " (one per look people flagged)"
            if card.get("tokens")
            else " (text prompts only)"
        )  # fmt: skip
        + ".",
        "",
        "Concept prompts erased (cycled):",
        *[f"- `{p}`" for p in card.get("concept_prompts", [])],
        "",
        "## Files",
        "- `unet/`: the fine-tuned UNet (`UNet2DConditionModel.from_pretrained`). For SDD this is the EMA teacher.",
        "- `delta.safetensors`: only the trained parameters;",
        "  `apply_delta(base_unet, path)` reproduces `unet/` exactly.",
        "",
        "## Hyperparameters",
        "```json",
        json.dumps(card.get("hyperparameters", {}), indent=2),
        "```",
    ]
    if card.get("evaluation"):
        lines += ["", "## Evaluation", "```json", json.dumps(card["evaluation"], indent=2), "```"]
    lines += ["", "Made with hfi (Human Feedback Inversion + self-distillation)."]
    return "\n".join(lines) + "\n"
