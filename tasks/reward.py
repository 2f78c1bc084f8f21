"""``hfi reward score``: score images with a trained reward model (``train`` is the ``reward``
stage, built from the stage table in ``tasks.stages``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from tasks.common import add_runtime_args, setup_runtime


def register(group: Callable[..., argparse._SubParsersAction]) -> None:
    reward = group("reward", "train the reward model (MLP on CLIP embeddings) or score images")
    s = reward.add_parser("score", help="score a manifest's images; writes image_id, reward")
    s.add_argument("--model", type=Path, required=True, help="the reward model folder (RUN/reward/model)")
    s.add_argument("--manifest", type=Path, required=True)
    s.add_argument("--cache", type=Path, help="embedding cache folder")
    s.add_argument("--out", type=Path, required=True, help="parquet to write")
    add_runtime_args(s)
    s.set_defaults(func=_score)


def _score(args: argparse.Namespace) -> int:
    setup_runtime(args)
    import pandas as pd

    from hfi_core.images import read_manifest
    from hfi_core.reward import score_images

    manifest = read_manifest(args.manifest)
    scores = score_images(args.model, manifest, args.manifest.parent, cache_dir=args.cache)
    out = pd.DataFrame({"image_id": manifest.image_id, "sha256": manifest.sha256, "reward": scores})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(args.out, index=False)
    print(f"{len(out)} images scored (mean reward {scores.mean():.3f}) -> {args.out}")
    return 0
