"""``hfi generate --config C --out DIR``: sample every prompt group of a run config."""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.common import add_runtime_args, setup_runtime


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("generate", help="generate seeded images + manifest.parquet for a run config")
    p.add_argument("--config", type=Path, required=True, help="run config YAML")
    p.add_argument("--out", type=Path, required=True, help="output folder (resumes if a run stopped part-way)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.config import load_config
    from hfi_core.generation import generate
    from hfi_core.images import read_manifest

    result = generate(load_config(args.config), args.out, show_progress=not args.quiet)
    df = read_manifest(result.manifest)
    print(f"{len(df)} images in {args.out / 'images'}; manifest: {result.manifest}")
    print(f"generated {result.generated}, reused {result.reused} from an earlier or interrupted run")
    print(df.groupby("group").size().to_string())
    return 0
