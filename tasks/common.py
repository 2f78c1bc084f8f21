"""What every entry point sets up before calling the library."""

from __future__ import annotations

import argparse
import os


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("HFI_THREADS", "1")),
        help="torch CPU threads (default 1, or $HFI_THREADS): 2 threads ran 4-7x slower "
        "than 1 whenever anything else was busy on a 2-core machine",
    )


def setup_runtime(args: argparse.Namespace) -> None:
    """Threads, and quiet third-party progress bars (ours stay)."""
    import torch
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    torch.set_num_threads(max(1, args.threads))
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
