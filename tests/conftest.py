"""Shared test setup: one torch thread, offline hub, quiet third-party logs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

torch.set_num_threads(1)
transformers_logging.disable_progress_bar()
diffusers_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def world():
    """The committed toy world (tests never retrain it)."""
    from hfi_core.toyworld import default_world

    path = default_world()
    assert (path / "manifest.json").exists(), f"{path}: the committed toy world is missing"
    return path
