"""The ``hfi`` command: ``hfi <group> <command> [options]``."""

from __future__ import annotations

import argparse
import os
import sys

# transformers announces at import that torchvision is absent and it uses PIL: true, and noise.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tasks import bench, dags, feedback, generate, pipeline, reward, step, toyworld


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hfi", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    toyworld.register(groups)
    generate.register(groups)
    feedback.register(groups)
    reward.register(groups)
    pipeline.register(groups)
    step.register(groups)
    dags.register(groups)
    bench.register(groups)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"hfi: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
