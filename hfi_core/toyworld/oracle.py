"""The oracle: a small CNN that reads a toy-world image's shape, colour and style.

It is the ground truth of every toy-world measurement and plays the human annotators. It is
trained on clean renders *and* their VAE reconstructions, so it stays accurate on what the
diffusion model produces (which always passes through the VAE decoder).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from hfi_core.toyworld.render import COLORS, SHAPES, STRIPES, STYLES

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "style": STYLES,
    "stripes": ("none", *STRIPES),
}
"""The oracle's heads. ``style`` judges as people do (every stripe variant is "striped");
``stripes`` says which variant it saw ("none" for a scene that is not striped)."""


def labels(scene: object) -> dict[str, str]:
    """A scene's class name per oracle head."""
    return {
        "shape": scene.shape,
        "color": scene.color,
        "style": scene.style,
        "stripes": scene.variant or "none",
    }


class Oracle(ModelMixin, ConfigMixin):
    """Four softmax heads (shape, colour, style, stripe variant) on a shared conv trunk.

    Input: float images in [0, 1], (B, 3, 32, 32). Saved as ``config.json`` +
    ``diffusion_pytorch_model.safetensors``; load with ``Oracle.from_pretrained(path)``.
    """

    @register_to_config
    def __init__(self, width: int = 32, image_size: int = 32) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * w * (image_size // 8) ** 2, 4 * w), nn.GELU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: ``{"shape": (B, 3), "color": (B, 3), "style": (B, 3), "stripes": (B, 4)}``."""
        h = self.trunk(images * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def judge(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Class probabilities per attribute for images.

        Args:
            images: uint8 (N, H, W, 3) or float in [0, 1] (N, H, W, 3), as pipelines return them;
                other sizes than the oracle's are resized to it.
        Returns:
            ``{attribute: (N, n_classes) float array}``; class order as in ``ATTRIBUTES``.
        """
        x = torch.as_tensor(np.asarray(images))
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = x.permute(0, 3, 1, 2).to(self.device, self.dtype)  # (N, 3, H, W)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):  # another model's images: judged at the oracle's own size
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out: dict[str, list[np.ndarray]] = {k: [] for k in ATTRIBUTES}
        for i in range(0, len(x), batch_size):
            for k, logits in self(x[i : i + batch_size]).items():
                out[k].append(logits.softmax(-1).float().cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros((0, len(ATTRIBUTES[k]))) for k, v in out.items()}

    def predict(self, images: np.ndarray | torch.Tensor) -> dict[str, list[str]]:
        """The most likely class name per attribute: ``{"style": ["striped", ...], ...}``."""
        probs = self.judge(images)
        return {k: [ATTRIBUTES[k][i] for i in p.argmax(-1)] for k, p in probs.items()}
