"""The ``hfi`` command: ``hfi <group> <command> [options]``."""

from __future__ import annotations

import argparse
import os
import sys

# transformers announces at import that torchvision is absent and it uses PIL: true, and noise.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tasks import bench, dags, feedback, pipeline, reward, sd14, stages, step, toyworld


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfi", description=__doc__)
    top = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    made: dict[str, argparse._SubParsersAction] = {}

    def group(name: str, help: str = "") -> argparse._SubParsersAction:
        """The subcommands of ``hfi <name>``, made on first use."""
        if name not in made:
            p = top.add_parser(name, help=help)
            made[name] = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
        return made[name]

    toyworld.register(top)
    feedback.register(group)  # the groups' own commands first: they name the groups
    reward.register(group)
    stages.register(group, top)
    pipeline.register(top)
    step.register(top)
    dags.register(top)
    bench.register(top)
    sd14.register(top)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was asked, for reports' provenance
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"hfi: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _unreachable(e):
            raise  # a defect: the traceback is what a developer needs
        # A dependency down or hung (S3, an HTTP service): one line, and exit 1, which is retried.
        first = str(e).splitlines()[0][:240] if str(e) else ""
        print(f"hfi: error: {type(e).__name__}: {first} (a service did not answer; the step may be retried)",
              file=sys.stderr)  # fmt: skip
        return 1


def _unreachable(e: BaseException) -> bool:
    """A connection refused, reset or timed out, from the standard library or the HTTP clients
    under boto3 and MLflow (checked by module, so that none of them is imported here)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    root = type(e).__module__.split(".")[0]
    name = type(e).__name__
    return root in ("botocore", "urllib3", "requests") and any(w in name for w in ("Connect", "Timeout", "Endpoint"))


if __name__ == "__main__":
    sys.exit(main())
