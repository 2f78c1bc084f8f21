"""``hfi run CONFIG --out RUN``: every stage of the table on one machine, one sub-folder per stage.

Each stage runs as the nightly DAG's step does (a transaction with a ``_SUCCESS`` marker), so a
re-run skips the stages whose inputs did not change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.common import add_runtime_args, load_run_config, setup_runtime


def register(top: argparse._SubParsersAction) -> None:
    r = top.add_parser("run", help="the whole chain on one machine, one sub-folder per stage")
    r.add_argument("config", type=Path, help="run config YAML")
    r.add_argument("--out", type=Path, required=True, help="run folder")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    add_runtime_args(r)
    r.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.steps import run_local

    result = run_local(load_run_config(args.config, args.set), args.out, log=print)
    print((args.out / "evaluate" / "summary.md").read_text())
    registration = result.get("register", {})
    if "gates" in registration:
        verdict = "pass" if registration["gates_passed"] else "FAIL"
        print(f"promotion gates: {verdict} " + json.dumps(registration["gates"]))
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_seconds")}, indent=2))
    return 0
