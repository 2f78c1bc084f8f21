"""``hfi invert|distill|evaluate|run``: the stages that change and measure the model.

Each takes the run config and the run folder; a stage reads what earlier stages left under it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.common import add_runtime_args, setup_runtime


def register(groups: argparse._SubParsersAction) -> None:
    def stage(name: str, help: str) -> argparse.ArgumentParser:
        p = groups.add_parser(name, help=help)
        p.add_argument("--config", type=Path, required=True, help="run config YAML")
        p.add_argument("--run", type=Path, required=True, help="run folder (holds generate/, feedback/, reward/...)")
        add_runtime_args(p)
        return p

    stage("invert", "HFI: reward-weighted textual inversion -> invert/learned_embeds.safetensors").set_defaults(
        func=_invert
    )
    d = stage("distill", "erase the concept: SDD (default) or ESD-x -> distill/unet, delta, model card")
    d.add_argument("--method", choices=["sdd", "esd"], help="overrides distill.method")
    d.add_argument("--no-token", action="store_true", help="text prompts only (no HFI token): text-only removal")
    d.add_argument("--resume", action="store_true", help="continue from distill/checkpoint")
    d.set_defaults(func=_distill)
    stage("evaluate", "measure base, distilled and baselines with fixed seeds -> evaluate/").set_defaults(
        func=_evaluate
    )

    r = groups.add_parser("run", help="the whole chain on one machine, one sub-folder per stage")
    r.add_argument("config", type=Path, help="run config YAML")
    r.add_argument("--out", type=Path, required=True, help="run folder")
    add_runtime_args(r)
    r.set_defaults(func=_run)


def _load(path: Path):
    from hfi_core.config import load_config

    return load_config(path)


def _print(result) -> None:
    print(json.dumps(result, indent=2, default=str))


def _invert(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.stages import stage_invert

    _print(stage_invert(_load(args.config), args.run))
    return 0


def _distill(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.stages import stage_distill

    cfg = _load(args.config)
    cfg.distill.method = args.method or cfg.distill.method
    cfg.distill.use_token = cfg.distill.use_token and not args.no_token
    _print(stage_distill(cfg, args.run, resume=args.resume))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.stages import stage_evaluate

    stage_evaluate(_load(args.config), args.run)
    print((args.run / "evaluate" / "summary.md").read_text())
    return 0


def _run(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.stages import run_all

    result = run_all(_load(args.config), args.out)
    print((args.out / "evaluate" / "summary.md").read_text())
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_seconds")}, indent=2))
    return 0
