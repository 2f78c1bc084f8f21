"""``hfi step STAGE --config C --run-uri URI [--params-json J] [--set K=V]``: one pipeline step, as
the DAGs, a container or a pod run it.

Reads its orchestration context from the environment (Airflow sets ``AIRFLOW_CTX_*`` in every
task; ``MLFLOW_TRACKING_URI``, ``HFI_S3_ENDPOINT_URL``, ``HFI_IMAGE_TAG``, ``HFI_GIT_COMMIT`` come
from the deployment) and calls ``hfi_core.steps.run_step``. Credentials stay in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from tasks.common import add_runtime_args, load_run_config, local_config, s3_settings, setup_runtime


def register(top: argparse._SubParsersAction) -> None:
    from hfi_core.stages import STAGES

    p = top.add_parser("step", help="run one pipeline step against a run store (local path or s3://)")
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--config", required=True, help="run config: a path, or a URI in the store (s3://.../config.yaml)")
    p.add_argument(
        "--run-uri", required=True, help="the run's folder: /data/runs/2026-11-28 or s3://bucket/runs/2026-11-28"
    )
    p.add_argument(
        "--scratch", type=Path, help="local working folder (default: a temporary one; local stores work in place)"
    )
    p.add_argument(
        "--tracking-uri", help="MLflow (default $MLFLOW_TRACKING_URI, read after --env-file, which may set it)"
    )
    p.add_argument("--experiment", default=os.environ.get("HFI_EXPERIMENT", "hfi"), help="MLflow experiment")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (YAML value)"
    )
    p.add_argument(
        "--params-json", default="{}", metavar="JSON",
        help="overrides as one JSON object of dotted keys (the DAG's Params; null keeps the YAML's value)",
    )  # fmt: skip
    p.add_argument(
        "--env-file", type=Path,
        help="KEY=VALUE lines (credentials) to put in the step's environment before anything runs",
    )  # fmt: skip
    p.add_argument("--run-key", help="unique key of the pipeline run, for its MLflow parent (default: the run URI)")
    add_runtime_args(p)
    p.set_defaults(func=run)


def _context() -> dict[str, str]:
    env = {
        "airflow.dag_id": "AIRFLOW_CTX_DAG_ID",
        "airflow.run_id": "AIRFLOW_CTX_DAG_RUN_ID",
        "airflow.task_id": "AIRFLOW_CTX_TASK_ID",
        "airflow.try_number": "AIRFLOW_CTX_TRY_NUMBER",
        "image_tag": "HFI_IMAGE_TAG",
        "git_commit": "HFI_GIT_COMMIT",
    }
    return {tag: os.environ[var] for tag, var in env.items() if os.environ.get(var)}


def _credentials_to_environment(uri: str) -> str:
    """A tracking URI with a user part (``http://user:pass@host``) becomes the URI without it, and
    the user and password MLflow's own variables (unless set): MLflow puts its URI into messages
    and error lines, and no log may hold the password."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password or ""))
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def params_overrides(text: str) -> dict:
    """The DAG's ``--params-json``: set Params as overrides (JSON keeps ``1e-05`` a float)."""
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--params-json: not JSON: {e}") from None
    if not isinstance(params, dict):
        raise ValueError(f"--params-json: expected a JSON object of dotted keys, got {type(params).__name__}")
    return {k: v for k, v in params.items() if v is not None}


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export``, blank lines, ``#`` comments and one pair of surrounding
    quotes allowed), as a container's env file holds them. Nothing is evaluated: no shell reads it.

    Raises:
        ValueError: naming the file and the line (never its value: it may be a secret).
    """
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"{path}: line {n}: expected KEY=VALUE with KEY made of letters, digits and _")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


MLFLOW_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 # MLflow prints "View run ... at: <tracking URI>" into the task log otherwise.
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # fmt: skip
"""How long a step waits for MLflow (unless the deployment says otherwise): 20 s a request, two
retries, so one call gives up within about 65 s. MLflow's own defaults (120 s, 7 retries with
doubling back-off) let a hung server hold a step for over an hour. The first call that gives up
turns the step untracked (``hfi_core.steps``): a step spends at most two such waits on MLflow."""


def run(args: argparse.Namespace) -> int:
    if args.env_file:
        os.environ.update(read_env_file(args.env_file))  # before boto3 or MLflow read the environment
    for var, value in MLFLOW_LIMITS.items():
        os.environ.setdefault(var, value)
    setup_runtime(args, args.stage)
    from hfi_core.steps import TrackingContext, run_step
    from hfi_core.store import Store

    s3 = s3_settings()
    root, _, run_name = args.run_uri.rstrip("/").rpartition("/")
    store = Store.open(root, s3)
    if not args.config or not (args.config.startswith("s3://") or Path(args.config).is_absolute()):
        raise ValueError(
            f"--config {args.config!r}: a step needs an absolute path or an s3:// URI (a scheduled run takes it "
            "from the deployment: set HFI_CONFIG on the scheduler and workers, or the Airflow Variable hfi_config)"
        )
    with tempfile.TemporaryDirectory(prefix="hfi-step-") as tmp:
        cfg = load_run_config(local_config(args.config, tmp, s3), args.set, params_overrides(args.params_json))
        scratch = args.scratch or (Path(args.run_uri) if not args.run_uri.startswith("s3://") else Path(tmp) / "run")
        tracking = None
        args.tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # maybe from --env-file
        if args.tracking_uri:
            args.tracking_uri = _credentials_to_environment(args.tracking_uri)
            ctx = _context()
            tracking = TrackingContext(
                args.tracking_uri,
                args.experiment,
                args.run_key or args.run_uri,
                ctx,
                os.environ.get("HFI_MLFLOW_ARTIFACT_ROOT"),
            )
        token = os.environ.get("LABEL_STUDIO_API_KEY") or None
        result = run_step(args.stage, cfg, store, run_name, scratch, tracking, labelstudio_token=token)
    print(json.dumps(result, indent=2, default=str))
    return 0
