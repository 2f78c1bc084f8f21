"""``hfi dags params``: export the config schema's overridable fields for the DAGs' Params."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT = Path(__file__).parents[1] / "dags" / "hfi_params.json"


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("dags", help="helpers for the Airflow DAGs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    e = sub.add_parser("params", help="write dags/hfi_params.json from the config schema")
    e.add_argument("--out", type=Path, default=DEFAULT)
    e.set_defaults(func=_params)


def params_json() -> str:
    from hfi_core.config import overridable_fields

    rows = [{"key": k, "default": d, "type": t, "doc": doc} for k, d, t, doc in overridable_fields()]
    return json.dumps(rows, indent=1) + "\n"


def _params(args: argparse.Namespace) -> int:
    args.out.write_text(params_json())
    print(f"{args.out}: {len(json.loads(params_json()))} overridable fields")
    return 0
