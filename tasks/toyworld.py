"""``hfi toyworld build|check|verify``: train, measure and verify the toy world."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from tasks.common import add_runtime_args, setup_runtime


def register(top: argparse._SubParsersAction) -> None:
    p = top.add_parser("toyworld", help="the tiny Stable Diffusion world the project tests on")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="train the world from scratch (about 2 hours on 2 CPU cores)")
    b.add_argument("--out", type=Path, default=Path("toyworld-build"), help="output folder (default ./toyworld-build)")
    b.add_argument("--config", type=Path, help="YAML with BuildConfig fields to override (e.g. unet_steps: 100)")
    add_runtime_args(b)
    b.set_defaults(func=_build)

    c = sub.add_parser("check", help="measure how well the world draws what its captions ask")
    c.add_argument("--world", type=Path, help="a built world (default: the committed one)")
    c.add_argument("--n", type=int, default=64, help="images per prompt group (default 64)")
    c.add_argument("--guidance", type=float, default=5.0)
    c.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    c.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    add_runtime_args(c)
    c.set_defaults(func=_check)

    v = sub.add_parser("verify", help="check a world's files against its manifest.json")
    v.add_argument("--world", type=Path, help="a built world (default: the committed one)")
    v.set_defaults(func=_verify)


def _world(path: Path | None) -> Path:
    from hfi_core.toyworld import default_world

    return path or default_world()


def _build(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.toyworld.build import BuildConfig, build_world

    overrides = yaml.safe_load(args.config.read_text()) if args.config else {}
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"{args.config}: expected a mapping of BuildConfig fields, got {type(overrides).__name__}")
    report = build_world(args.out, BuildConfig.from_dict(overrides or {}))
    print(json.dumps({k: report[k] for k in ("seconds", "final_losses", "heldout")}, indent=2))
    print(
        f"world written to {args.out} (report: {args.out / 'build_report.json'}, samples: {args.out / 'samples.png'})"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.toyworld.check import check_world

    if args.n < 1:
        raise ValueError(f"--n: must be >= 1, got {args.n}")
    result = check_world(
        _world(args.world), args.n, guidance=args.guidance, steps=args.steps, show_progress=not args.json
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    cols = ("striped", "striped:horizontal", "striped:vertical", "striped:diagonal", "dotted", "plain", "shape_acc",
            "color_acc")  # fmt: skip
    print(f"{'group':30s}" + "".join(f"{c.replace('striped:', ''):>11s}" for c in cols))
    for name, g in result["groups"].items():
        print(f"{name:30s}" + "".join(f"{g[c]:11.2f}" for c in cols))
    print(f"oracle style accuracy on VAE-decoded held-out renders: {result['oracle_style_acc_decoded']:.3f}")
    print(f"tiny-CLIP zero-shot style accuracy on held-out renders: {result['clip_zero_shot_style_acc']:.3f}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from hfi_core.toyworld.manifest import verify_manifest

    problems = verify_manifest(_world(args.world))
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{_world(args.world)}: every file matches manifest.json")
    return 1 if problems else 0
