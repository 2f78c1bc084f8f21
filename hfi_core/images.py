"""The image manifest: its schema, reading it, and reading the images it lists.

Kept free of torch and diffusers so that feedback ingest and the DAGs can use it cheaply.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

MANIFEST = "manifest.parquet"
JOURNAL = ".journal.jsonl"
MANIFEST_COLUMNS = [
    "image_id", "uri", "sha256", "prompt", "group", "index", "seed", "model", "scheduler",
    "steps", "guidance", "negative_prompt", "sld", "width", "height",
]  # fmt: skip


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes (no timestamps or metadata: same pixels, same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest and check it has the documented columns.

    Raises:
        ValueError: naming the file and the missing columns.
    """
    df = pd.read_parquet(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a generation manifest, missing columns {missing}")
    return df


def load_images(manifest: pd.DataFrame, root: Path) -> np.ndarray:
    """The manifest's images as uint8 (N, H, W, 3); ``root`` is the manifest's folder."""
    return np.stack([np.asarray(Image.open(Path(root) / uri).convert("RGB")) for uri in manifest.uri])
