"""The toy world: a tiny Stable Diffusion model, a tiny CLIP and an oracle judge.

Everything the pipeline does to SD v1.4 on a GPU it does here, unchanged, on a model small
enough to train and run on two CPU cores. Images are 32x32 drawings of a shape in a colour and
a style; "striped" is the concept to remove, and it can be asked for explicitly ("in the style
of van stripe") or implicitly ("with a zebra pattern", "like a barcode").
"""

from pathlib import Path

from hfi_core.toyworld.render import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    STYLE_PHRASES,
    STYLES,
    Scene,
    caption,
    render,
    sample_scenes,
)

ASSETS = Path(__file__).parent / "assets"
"""The committed world: ``sd/``, ``clip/``, ``oracle/``, ``manifest.json``, ``build_report.json``."""


def default_world() -> Path:
    """Where the committed toy world lies (inside the installed package)."""
    return ASSETS


__all__ = [
    "ASSETS",
    "default_world",
    "COLORS",
    "IMAGE_SIZE",
    "SHAPES",
    "STYLES",
    "STYLE_PHRASES",
    "Scene",
    "caption",
    "render",
    "sample_scenes",
]
