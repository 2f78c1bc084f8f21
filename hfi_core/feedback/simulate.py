"""Simulated annotators: the toy-world oracle plays K people and writes a real Label Studio export.

The demo and the tests feed this export through the same ``ingest`` as real labels, so the
whole path from Label Studio to the reward model is exercised. Each simulated person sees the
oracle's verdict and, with probability ``noise``, gives the other answer (binary), or swaps a
pair of neighbouring images in their order (ranking).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from hfi_core.config import SimulateConfig
from hfi_core.feedback.labelstudio import CONTROL, IMAGE, RANKER, binary_tasks, ranking_tasks
from hfi_core.images import load_images
from hfi_core.models import load_oracle
from hfi_core.toyworld.oracle import ATTRIBUTES

_T0 = datetime(2026, 1, 1, tzinfo=UTC)  # fixed, so the same run writes the same export


def concept_scores(manifest: pd.DataFrame, image_root: Path, cfg: SimulateConfig) -> np.ndarray:
    """The oracle's probability that each manifest image shows the concept, (N,)."""
    classes = ATTRIBUTES[cfg.attribute]
    if cfg.value not in classes:
        raise ValueError(
            f"feedback.simulate.value: {cfg.value!r} is not one of the oracle's {cfg.attribute}s {classes}"
        )
    oracle = load_oracle(cfg.oracle)
    images = load_images(manifest, image_root)  # (N, H, W, 3) uint8
    return oracle.judge(images)[cfg.attribute][:, classes.index(cfg.value)]


def _id(*parts: object) -> int:
    """A stable id from what a task or annotation is about: exports of later batches never reuse one."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _annotation(ann_id: int, who: int, task_id: int, result: list[dict], k: int, n: int) -> dict:
    t = (_T0 + timedelta(seconds=7 * n)).isoformat().replace("+00:00", "Z")
    return {
        "id": ann_id,
        "completed_by": who,
        "result": result,
        "was_cancelled": False,
        "ground_truth": False,
        "created_at": t,
        "updated_at": t,
        "lead_time": 3.0 + k,
        "task": task_id,
    }


def simulate_export(
    manifest: pd.DataFrame,
    image_root: Path,
    cfg: SimulateConfig,
    *,
    kind: str,
    positive: str,
    negative: str,
    url_of: dict[str, str],
    group_size: int = 4,
    ranking_group: str = "prompt",
) -> list[dict]:
    """A full Label Studio JSON export: every task annotated by ``cfg.annotators`` people."""
    scores = dict(zip(manifest.image_id, concept_scores(manifest, image_root, cfg), strict=True))
    rng = np.random.default_rng(cfg.seed)
    rows = manifest.to_dict("records")
    tasks = (
        binary_tasks(rows, url_of)
        if kind == "binary"
        else ranking_tasks(rows, url_of, group_size, by=ranking_group, seed=cfg.seed)
    )
    n = 0
    for task in tasks:
        about = task["data"].get("image_id") or "|".join(it["id"] for it in task["data"]["items"])
        t_id = _id("task", about)
        task.update({"id": t_id, "predictions": [], "project": 1})
        task["annotations"] = []
        for who in range(1, cfg.annotators + 1):
            ann_id, n = _id("annotation", about, who, cfg.seed), n + 1
            if kind == "binary":
                truth = scores[task["data"]["image_id"]] >= 0.5
                said = bool(truth) != bool(rng.random() < cfg.noise)
                result = [
                    {
                        "id": f"r{ann_id}",
                        "type": "choices",
                        "from_name": CONTROL,
                        "to_name": IMAGE,
                        "origin": "manual",
                        "value": {"choices": [positive if said else negative]},
                    }
                ]
            else:
                ids = [it["id"] for it in task["data"]["items"]]
                order = sorted(ids, key=lambda i: -scores[i])
                for j in range(len(order) - 1):
                    if rng.random() < cfg.noise:
                        order[j], order[j + 1] = order[j + 1], order[j]
                result = [
                    {
                        "id": f"r{ann_id}",
                        "type": "ranker",
                        "from_name": RANKER,
                        "to_name": "images",
                        "origin": "manual",
                        "value": {"ranker": {RANKER: order}},
                    }
                ]
            task["annotations"].append(_annotation(ann_id, who, t_id, result, who, n))
    return tasks
