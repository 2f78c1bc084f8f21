"""Services the end-to-end tests share: an MLflow tracking server on PostgreSQL whose artifacts,
like the run store, live in moto's S3 server; everything on 127.0.0.1, stopped by PID."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[2]


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def services(s3_endpoint, free_port, tmp_path_factory):
    if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True).returncode != 0:
        pytest.fail("PostgreSQL is not accepting connections on 127.0.0.1:5432")
    db = f"hfi_e2e_{uuid.uuid4().hex[:8]}"
    _psql(f"CREATE DATABASE {db}")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    runs_bucket, mlflow_bucket = f"runs-{db[-8:]}", f"mlflow-{db[-8:]}"
    s3.create_bucket(Bucket=runs_bucket)
    s3.create_bucket(Bucket=mlflow_bucket)
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    log = open(tmp_path_factory.mktemp("mlflow") / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
         "--artifacts-destination", f"s3://{mlflow_bucket}/artifacts"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}): {Path(log.name).read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                break
        except Exception:
            time.sleep(0.5)
    else:
        os.killpg(server.pid, signal.SIGTERM)
        pytest.fail("mlflow server did not become healthy in 120 s")
    yield {
        "mlflow": url,
        "s3": s3_endpoint,
        "runs_bucket": runs_bucket,
        "mlflow_bucket": mlflow_bucket,
        "s3_client": s3,
    }
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()
    _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _small_config(path: Path) -> Path:
    """The toy config cut to 3 prompts x 4 images per group and a few training steps: minutes, not hours."""
    cfg = yaml.safe_load((ROOT / "configs" / "toyworld-striped.yaml").read_text())
    for group in cfg["prompts"]:
        group["prompts"] = group["prompts"][:3]
        group["images_per_prompt"] = 4
    cfg["generation"]["batch_size"] = 8
    cfg["invert"].update(steps=15, batch_size=4, warm_steps=5)
    cfg["distill"].update(steps=6, warm_steps=3, sampler_steps=6, checkpoint_every=3)
    cfg["evaluate"].update(n_per_prompt=1, baselines=[])
    cfg["promotion"].update(max_concept_rate=1.0, max_preservation_drop=1.0)  # this tiny run must pass its gates
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def small_config():
    return _small_config
