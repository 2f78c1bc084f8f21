"""``hfi bench removal`` and ``hfi bench tune``: the paper's comparison on the committed toy world.

    hfi bench removal --out bench-out            # full: 3 seeds, 90 images per group and seed
    hfi bench removal --quick --out bench-quick  # smoke run: 1 seed, 24 images per group, fewer steps
    hfi bench tune --out tune-out                # each trained method's settings, on validation data
    hfi bench seeds --out seeds-out              # the toy config's promotion gates on seeds 0, 1, 2
    hfi bench perf --out perf-out                # speed side by side: UCE, generation, SDD loops

MLflow: a parent run for the benchmark and a child per method, at $MLFLOW_TRACKING_URI or, by
default, a sqlite store in the output folder (``mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from tasks.common import add_runtime_args, setup_runtime, threads_for

DEFAULT_CONFIG = Path(__file__).parents[1] / "benchmarks" / "removal.yaml"
TOY_CONFIG = Path(__file__).parents[1] / "configs" / "toyworld-striped.yaml"


def register(top: argparse._SubParsersAction) -> None:
    g = top.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = g.add_parser("removal", help="every removal method on the toy world, judged by the oracle")
    p.add_argument("--out", type=Path, required=True, help="output folder (results.md, results.json, grid.png)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer images and steps (about 10 min)")
    p.add_argument("--resume", action="store_true",
                   help="reuse OUT's upstream run and unchanged trainings (not after upstream edits)")  # fmt: skip
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="benchmark settings (benchmarks/removal.yaml)")
    p.add_argument("--jobs", type=int, default=2, help="processes training/evaluating side by side (default 2)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite in --out)")  # fmt: skip
    p.add_argument("--experiment", default="hfi-bench-removal", help="MLflow experiment")
    add_runtime_args(p)
    p.set_defaults(func=_removal)

    t = g.add_parser("tune", help="choose each trained method's settings on validation prompts and seeds")
    t.add_argument("--out", type=Path, required=True, help="output folder (tuning.md, tuning.json, tuned.yaml)")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="benchmark settings (benchmarks/removal.yaml)")
    t.add_argument("--jobs", type=int, default=2, help="processes training/evaluating side by side (default 2)")
    add_runtime_args(t)
    t.set_defaults(func=_tune)

    s = g.add_parser("seeds", help="a run config end to end on several seeds: do its promotion gates pass on each?")
    s.add_argument("--out", type=Path, required=True, help="output folder (seeds.md, seeds.json, a run per seed)")
    s.add_argument("--config", type=Path, default=TOY_CONFIG, help="run config (configs/toyworld-striped.yaml)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="replicate seeds (default 0 1 2)")
    s.add_argument("--jobs", type=int, default=2, help="replicates side by side (default 2)")
    add_runtime_args(s)
    s.set_defaults(func=_seeds)

    f = g.add_parser("perf", help="speed side by side: closed-form edit, generation vs diffusers, SDD loops")
    f.add_argument("--out", type=Path, required=True, help="output folder (perf.md, perf.json)")
    f.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, nothing is measured")
    f.add_argument("--only", nargs="+", choices=["uce", "generation", "sdd"], help="these sections (default all)")
    f.add_argument("--sdd-steps", type=int, help="the default SDD loop's steps in the comparison (default: the "
                   "benchmark's; the reference runs as many training states)")  # fmt: skip
    f.add_argument("--sdd-lr", type=float, help="the default SDD loop's learning rate in the comparison (default: "
                   "the benchmark's; the reference keeps the benchmark's)")  # fmt: skip
    f.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="benchmark settings (benchmarks/removal.yaml)")
    add_runtime_args(f)
    f.set_defaults(func=_perf)


def _removal(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from benchmarks.removal import load_bench_config, run_removal_bench
    from hfi_core.tracking import Tracker

    bench, cfg = load_bench_config(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{args.out.resolve()}/mlflow.db"
    artifacts = None if args.tracking_uri else (args.out.resolve() / "mlartifacts").as_uri()
    tracker = Tracker(uri, args.experiment, artifact_location=artifacts)
    provenance = {"command": " ".join(["hfi", *args.argv]), "commit": _commit(), "machine": _machine()}
    results = run_removal_bench(cfg, bench, args.out, quick=args.quick, resume=args.resume, jobs=args.jobs,
                                threads=threads_for(args), tracker=tracker, provenance=provenance)  # fmt: skip
    print((args.out / "results.md").read_text())
    print(f"grid: {args.out / 'grid.png'}   MLflow: mlflow ui --backend-store-uri {uri}")
    return 0 if results else 1


def _tune(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from benchmarks.removal import load_bench_config
    from benchmarks.tune import run_tuning

    bench, cfg = load_bench_config(args.config)
    if not bench.tuning.candidates:
        raise ValueError(f"{args.config}: tuning.candidates is empty; list each family's candidate settings")
    args.out.mkdir(parents=True, exist_ok=True)
    run_tuning(cfg, bench, args.out, jobs=args.jobs, threads=threads_for(args))
    print((args.out / "tuning.md").read_text())
    print(f"copy {args.out / 'tuned.yaml'} into {args.config} as its `tuned:` section")
    return 0


def _seeds(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from benchmarks.seeds import run_seeds
    from hfi_core.config import load_config

    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: {args.seeds} repeats a seed; replicates must be independent")
    cfg = load_config(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = {"command": " ".join(["hfi", *args.argv]), "commit": _commit(), "machine": _machine()}
    report = run_seeds(cfg, args.seeds, args.out, jobs=args.jobs, threads=threads_for(args), provenance=provenance)
    print((args.out / "seeds.md").read_text())
    return 0 if report["passed_every_seed"] else 1


def _perf(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from benchmarks.perf import SECTIONS, run_perf
    from benchmarks.removal import load_bench_config

    bench, cfg = load_bench_config(args.config)
    provenance = {"command": " ".join(["hfi", *args.argv]), "commit": _commit(), "machine": _machine()}
    run_perf(cfg, bench, args.out, quick=args.quick, sections=tuple(args.only or SECTIONS), sdd_steps=args.sdd_steps,
             sdd_lr=args.sdd_lr, provenance=provenance)  # fmt: skip
    print((args.out / "perf.md").read_text())
    return 0


def _commit() -> str:
    """The commit the benchmark ran from (+ "-dirty" with uncommitted changes), or "unknown"."""
    root = Path(__file__).parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HFI_GIT_COMMIT", "unknown")


def _machine() -> str:
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    return f"{platform.machine()} {device}, torch {torch.__version__}"
