"""``hfi feedback simulate``: the toy-world oracle plays annotators (``export`` and ``ingest`` are
the ``publish`` and ``feedback`` stages, built from the stage table in ``tasks.stages``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from tasks.common import add_config_args, add_runtime_args, load_run_config, setup_runtime


def register(group: Callable[..., argparse._SubParsersAction]) -> None:
    s = group("feedback", "publish images for labeling, simulate annotators, ingest exports").add_parser(
        "simulate", help="let the toy-world oracle play annotators; writes a Label Studio export of the run's batch"
    )
    add_config_args(s)
    s.add_argument("--run", type=Path, required=True, help="run folder holding generate/")
    s.add_argument("--out", type=Path, required=True, help="export JSON to write")
    add_runtime_args(s)
    s.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.stages import simulate_feedback

    cfg = load_run_config(args.config, args.set)
    result = simulate_feedback(cfg, args.run, args.out)
    sim = cfg.feedback.simulate
    print(json.dumps({**result, "annotators": sim.annotators, "noise": sim.noise}, indent=2))
    return 0
