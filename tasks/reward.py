"""``hfi reward train|score``: fit the reward model on feedback; score images with it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.common import add_runtime_args, setup_runtime


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("reward", help="train the reward model (MLP on CLIP embeddings) or score images")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fit on labels.parquet / pairs.parquet; writes model/, metrics.json, roc.png")
    t.add_argument("--manifest", type=Path, required=True)
    t.add_argument("--labels", type=Path, required=True, help="feedback folder from `hfi feedback ingest`")
    t.add_argument("--clip", help="CLIP folder or id (default: the config's reward.clip)")
    t.add_argument("--config", type=Path, help="run config (its reward section)")
    t.add_argument("--cache", type=Path, help="embedding cache folder (default: OUT/../embedding_cache)")
    t.add_argument("--out", type=Path, required=True)
    add_runtime_args(t)
    t.set_defaults(func=_train)

    s = sub.add_parser("score", help="score a manifest's images; writes image_id, reward")
    s.add_argument("--model", type=Path, required=True, help="the reward model folder (OUT/model)")
    s.add_argument("--manifest", type=Path, required=True)
    s.add_argument("--cache", type=Path, help="embedding cache folder")
    s.add_argument("--out", type=Path, required=True, help="parquet to write")
    add_runtime_args(s)
    s.set_defaults(func=_score)


def _train(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.config import RewardConfig, load_config, resolve_model_path
    from hfi_core.images import read_manifest
    from hfi_core.reward import train_reward

    cfg = load_config(args.config).reward if args.config else RewardConfig()
    if args.clip:
        cfg.clip = resolve_model_path(args.clip)
    manifest = read_manifest(args.manifest)
    metrics = train_reward(cfg, manifest, args.manifest.parent, args.labels, args.out, cache_dir=args.cache)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
    print(f"reward model -> {args.out / 'model'}; plot -> {args.out / 'roc.png'}")
    return 0


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
