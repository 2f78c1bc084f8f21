"""``hfi feedback simulate``: the toy-world oracle plays annotators (``export`` and ``ingest`` are
the ``publish`` and ``feedback`` stages, built from the stage table in ``tasks.stages``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from tasks.common import (
    add_config_args,
    add_runtime_args,
    load_run_config,
    local_config,
    s3_settings,
    setup_runtime,
)


def register(group: Callable[..., argparse._SubParsersAction]) -> None:
    sub = group("feedback", "publish images for labeling, simulate annotators, ingest exports")
    p = sub.add_parser(
        "pull",
        help="pull the Label Studio project's export into the concept's feedback inbox; exits 99 if nothing is new",
    )
    p.add_argument("--config", required=True, help="run config: an absolute path or an s3:// URI")
    p.add_argument("--run-uri", required=True, help="the night whose batch was published (s3://bucket/runs/NIGHT)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--params-json", default="{}", metavar="JSON", help="overrides as one JSON object (the DAG's)")
    p.add_argument("--env-file", type=Path, help="KEY=VALUE lines (credentials) for the environment")
    p.add_argument("--wait-minutes", type=float, default=0, help="poll this long for new annotations (0: once)")
    p.add_argument("--poll-seconds", type=float, default=60, help="between polls")
    p.set_defaults(func=_pull)
    s = sub.add_parser(
        "simulate", help="let the toy-world oracle play annotators; writes a Label Studio export of the run's batch"
    )
    add_config_args(s)
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", type=Path, help="local run folder holding generate/")
    where.add_argument("--run-uri", help="a run in a store (s3://bucket/runs/NIGHT): its generate/ is fetched")
    to = s.add_mutually_exclusive_group(required=True)
    to.add_argument("--out", type=Path, help="export JSON to write")
    to.add_argument(
        "--labelstudio", action="store_true",
        help="label in the Label Studio project instead, through its API (feedback.labelstudio.url; "
        "token from $LABEL_STUDIO_API_KEY), each simulated person as a user",
    )  # fmt: skip
    s.add_argument("--share", type=float, default=1.0, help="with --labelstudio: label up to this share of the batch")
    add_runtime_args(s)
    s.set_defaults(func=_simulate)


def _fetch_batch(run_uri: str, tmp: str, s3: object) -> tuple[object, Path]:
    """The store a night lives in, and a local copy of the night's ``generate/`` under ``tmp``."""
    from hfi_core.store import Store

    root, _, night = run_uri.rstrip("/").rpartition("/")
    store = Store.open(root, s3)
    run = Path(tmp) / night
    if store.download_dir(f"{night}/generate", run / "generate") == 0:
        raise ValueError(f"{run_uri}/generate: no generated batch there")
    return store, run


def _pull(args: argparse.Namespace) -> int:
    """Poll until the project's export holds annotations the inbox does not, then add it."""
    import os
    import tempfile
    import time

    from tasks.step import params_overrides, read_env_file

    if args.env_file:
        os.environ.update(read_env_file(args.env_file))
    from hfi_core.stages import StageContext, collect_feedback

    s3 = s3_settings()
    with tempfile.TemporaryDirectory(prefix="hfi-pull-") as tmp:
        overrides = {**params_overrides(args.params_json), "feedback.source": "labelstudio"}
        cfg = load_run_config(local_config(args.config, tmp, s3), args.set, overrides)
    if not cfg.feedback.labelstudio.url:
        print("feedback.labelstudio.url is not set: nothing to pull. Without the API, drop exports into the "
              "inbox and record an event on the hfi_feedback_batch asset (Airflow's UI or REST API).")  # fmt: skip
        return 99
    deadline = time.time() + 60 * args.wait_minutes
    with tempfile.TemporaryDirectory(prefix="hfi-pull-") as tmp:
        store, run = _fetch_batch(args.run_uri, tmp, s3)
        ctx = StageContext.on(store, cfg, labelstudio_token=os.environ.get("LABEL_STUDIO_API_KEY"))
        while True:
            result = collect_feedback(cfg, run, ctx)
            if result["exports_added"] or time.time() >= deadline:
                break
            time.sleep(args.poll_seconds)
    print(json.dumps(result, indent=2))
    return 0 if result["exports_added"] else 99


def _simulate(args: argparse.Namespace) -> int:
    setup_runtime(args)
    import os
    import tempfile

    from hfi_core.stages import simulate_feedback, simulate_in_labelstudio

    if not 0 < args.share <= 1:
        raise ValueError(f"--share {args.share}: must be in (0, 1]")
    cfg = load_run_config(args.config, args.set)
    with tempfile.TemporaryDirectory(prefix="hfi-simulate-") as tmp:
        run = args.run
        if run is None:
            s3 = s3_settings()
            _, run = _fetch_batch(args.run_uri, tmp, s3)
        if args.labelstudio:
            result = simulate_in_labelstudio(cfg, run, os.environ.get("LABEL_STUDIO_API_KEY"), args.share)
        else:
            result = simulate_feedback(cfg, run, args.out)
    sim = cfg.feedback.simulate
    print(json.dumps({**result, "annotators": sim.annotators, "noise": sim.noise}, indent=2))
    return 0
