"""What every entry point sets up before calling the library."""

from __future__ import annotations

import argparse
import os


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default $HFI_THREADS_<STAGE> for a pipeline stage, else $HFI_THREADS, "
        "else 1): 2 threads ran 4-7x slower than 1 whenever anything else was busy on a 2-core machine",
    )


def threads_for(args: argparse.Namespace, stage: str | None = None) -> int:
    """``--threads``, else ``$HFI_THREADS_<STAGE>`` (``HFI_THREADS_DISTILL``), else ``$HFI_THREADS``, else 1.

    Per stage because what threads buy depends on the work: on an idle 2-core machine two threads
    sampled the toy world's batches of 64 1.5x faster, and ran its batch-1 ESD loop 1.14x slower."""
    if args.threads is not None:
        return max(1, args.threads)
    for var in ([f"HFI_THREADS_{stage.upper()}"] if stage else []) + ["HFI_THREADS"]:
        if (value := env_number(var, int)) is not None:
            return max(1, int(value))
    return 1


def env_number(var: str, kind: type[int] | type[float]) -> int | float | None:
    """``$var`` as a number, ``None`` when unset or empty; a ValueError naming it otherwise."""
    value = os.environ.get(var, "").strip()
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"${var}={value[:20]!r}: expected a {'whole ' if kind is int else ''}number") from None


def setup_runtime(args: argparse.Namespace, stage: str | None = None) -> None:
    """Threads, quiet third-party progress bars (ours stay) and, under a launcher that started
    several processes (``torchrun``, ``accelerate launch``: ``$WORLD_SIZE`` > 1), the process
    group a data-parallel stage trains in, through accelerate (NCCL on GPUs, one GPU each; gloo
    on CPUs)."""
    import torch
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    torch.set_num_threads(threads_for(args, stage))
    join_process_group()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()


def join_process_group() -> None:
    """Under a launcher that started several processes (``$WORLD_SIZE`` > 1), join their group
    through accelerate: NCCL on GPUs (one per process: a config's ``cuda`` is then this
    process's), gloo on CPUs. ``$HFI_DIST_INIT_METHOD`` (``file:///shared/path``) meets the
    others through a file instead of the launcher's TCP store, which listens on every interface."""
    if (env_number("WORLD_SIZE", int) or 1) <= 1:
        return
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if (method := os.environ.get("HFI_DIST_INIT_METHOD")) and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method=method, rank=int(env_number("RANK", int) or 0),
                                world_size=int(env_number("WORLD_SIZE", int) or 1))  # fmt: skip
    PartialState(cpu=not cuda)


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--config`` and the one way to override its fields, ``--set KEY=VALUE`` (repeatable)."""
    parser.add_argument("--config", required=required, help="run config YAML")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set distill.lr=1e-5 --set 'feedback.files=[a.json]' (YAML value)",
    )  # fmt: skip


def parse_overrides(items: list[str]) -> dict:
    """``["distill.lr=1e-5", "distill.method=esd"]`` -> ``{"distill.lr": 1e-05, ...}`` (values as
    YAML 1.2 reads them: ``1e-5`` is a float)."""
    from hfi_core.config import read_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.lr=1e-5")
        out[key.strip()] = read_yaml(value)
    return out


def load_run_config(path: str | os.PathLike, overrides: list[str], extra: dict | None = None):
    """The validated run config with ``--set`` overrides (and ``extra`` ones) applied."""
    from hfi_core.config import load_config

    return load_config(path, {**parse_overrides(overrides), **(extra or {})})


def local_config(config: str, tmp: str | os.PathLike, s3: object) -> str:
    """The config as a local path: an ``s3://`` URI is downloaded into ``tmp`` first."""
    if not config.startswith("s3://"):
        return config
    from pathlib import Path

    from hfi_core.store import Store

    bucket_root, _, key = config.rpartition("/")
    path = Path(tmp) / key
    Store.open(bucket_root, s3).download_file(key, path)
    return str(path)


S3_ENV = {"connect_timeout": "HFI_S3_CONNECT_TIMEOUT", "read_timeout": "HFI_S3_READ_TIMEOUT",
          "max_attempts": "HFI_S3_MAX_ATTEMPTS"}  # fmt: skip


def s3_settings():
    """``S3Settings`` from the deployment: ``HFI_S3_ENDPOINT_URL`` (MinIO, moto...) and, where set,
    ``HFI_S3_CONNECT_TIMEOUT`` / ``HFI_S3_READ_TIMEOUT`` (seconds) and ``HFI_S3_MAX_ATTEMPTS``."""
    from hfi_core.store import S3Settings

    limits = {f: env_number(var, int if f == "max_attempts" else float) for f, var in S3_ENV.items()}
    return S3Settings(endpoint_url=os.environ.get("HFI_S3_ENDPOINT_URL") or None,
                      **{f: v for f, v in limits.items() if v is not None})  # fmt: skip
