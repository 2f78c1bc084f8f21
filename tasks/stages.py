"""``hfi <stage>``: one command per pipeline stage, built from the stage table.

Every command takes the run config (``--config``, overrides only through ``--set``) and the run
folder (``--run``), and runs its stage as the nightly DAG does: a step transaction against the
local folder, so a stage whose upstream has not finished refuses to start and an unchanged one
is not run twice. The command's name comes from the table (``Stage.command``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from tasks.common import add_config_args, add_runtime_args, load_run_config, setup_runtime


def _add_sources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", type=Path, action="append", default=[],
                   help="an export to ingest (repeatable); sets feedback.source=files and feedback.files")  # fmt: skip


# Extra inputs of one command, by command path (the stage's name stays in the table).
EXTRA_ARGS: dict[tuple[str, ...], Callable[[argparse.ArgumentParser], None]] = {("feedback", "ingest"): _add_sources}


def register(group: Callable[[str, str], argparse._SubParsersAction], top: argparse._SubParsersAction) -> None:
    """One subcommand per row of the stage table, under its group (``hfi feedback ingest``) or at the top."""
    from hfi_core.stages import STAGES

    for st in STAGES.values():
        *parents, leaf = st.command
        sub = group(parents[0], "") if parents else top
        doc = (st.run.__doc__ or st.name).strip().splitlines()[0]
        p = sub.add_parser(leaf, help=doc, description=doc)
        add_config_args(p)
        # --run-dir too: torchrun reads a bare --run after its script as its own (--run-path).
        p.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                       help="run folder (one sub-folder per stage)")  # fmt: skip
        p.add_argument("--resume", action="store_true",
                       help="keep what an interrupted run left (generate's journal, distill's checkpoint)")  # fmt: skip
        if extra := EXTRA_ARGS.get(st.command):
            extra(p)
        add_runtime_args(p)
        p.set_defaults(func=lambda args, name=st.name: _run(name, args))


def _run(name: str, args: argparse.Namespace) -> int:
    setup_runtime(args, name)
    from hfi_core.steps import run_local_step

    sources = [str(s.resolve()) for s in vars(args).get("source", [])]
    extra = {"feedback.source": "files", "feedback.files": sources} if sources else None
    cfg = load_run_config(args.config, args.set, extra)
    result = run_local_step(name, cfg, args.run, resume=args.resume)
    print(json.dumps(result, indent=2, default=str))
    return 0
