"""``hfi dags export``: write what the DAGs read instead of importing the library.

``dags/hfi_params.json``: every overridable config field with its JSON schema (the Params);
``dags/hfi_stages.json``: the stage table (tasks, edges, GPU needs, timeouts). A test keeps both
equal to the code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DAGS = Path(__file__).parents[1] / "dags"


def register(top: argparse._SubParsersAction) -> None:
    p = top.add_parser("dags", help="helpers for the Airflow DAGs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    e = sub.add_parser("export", help="write dags/hfi_params.json and dags/hfi_stages.json from the code")
    e.add_argument("--out", type=Path, default=DAGS, help="folder to write them to (default: dags/)")
    e.set_defaults(func=_export)


def params_json() -> str:
    from hfi_core.config import overridable_fields

    return json.dumps(overridable_fields(), indent=1) + "\n"


def stages_json() -> str:
    from hfi_core.stages import stage_table

    return json.dumps(stage_table(), indent=1) + "\n"


def _export(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hfi_params.json").write_text(params_json())
    (args.out / "hfi_stages.json").write_text(stages_json())
    print(f"{args.out / 'hfi_params.json'}: {len(json.loads(params_json()))} overridable fields")
    print(f"{args.out / 'hfi_stages.json'}: {len(json.loads(stages_json()))} stages")
    return 0
