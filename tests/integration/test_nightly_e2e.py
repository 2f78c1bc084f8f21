"""The nightly removal DAG end to end, against real services on 127.0.0.1.

- S3: moto's server (HTTP), holding the run store and MLflow's artifacts;
- MLflow: a tracking server with a PostgreSQL backend store (PostgreSQL runs at 127.0.0.1:5432);
- Airflow: ``airflow dags test hfi_concept_removal`` on a sqlite metadata DB, steps in-process.

Before the DAG runs, one step is started by hand and SIGKILLed half-way; the DAG's own run of
that step must then give the same outputs as an unbroken run, with one finished child run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def nightly(services, world, small_config, free_port, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nightly")
    config = small_config(tmp / "night.yaml")
    run_root = f"s3://{services['runs_bucket']}/runs"
    airflow_home = tmp / "airflow"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "HFI_STEP_RUNNER": "local",
        "HFI_BIN": str(BIN / "hfi"),
        "MLFLOW_TRACKING_URI": services["mlflow"],
        "HFI_S3_ENDPOINT_URL": services["s3"],
        "HFI_EXPERIMENT": "hfi-e2e",
        "HFI_GIT_COMMIT": "test-commit",
        "HFI_IMAGE_TAG": "local",
        "OMP_NUM_THREADS": "1",
    }
    run_id = "manual__e2e"
    run_uri = f"{run_root}/{run_id}"
    # 1. A generate step killed half-way, as a crashed worker would leave it.
    step = subprocess.Popen(
        [str(BIN / "hfi"), "step", "generate", "--config", str(config), "--run-uri", run_uri,
         "--scratch", str(tmp / "killed")],
        env={**env, "AIRFLOW_CTX_DAG_ID": "hfi_concept_removal", "AIRFLOW_CTX_DAG_RUN_ID": run_id},
    )  # fmt: skip
    journal = tmp / "killed" / "generate" / ".journal.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and step.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 8:
            step.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    step.wait()
    killed = step.returncode == -signal.SIGKILL
    # 2. The nightly DAG, every step.
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    conf = json.dumps({"config": str(config), "run_root": run_root, "run_name": run_id})
    result = subprocess.run(
        [str(BIN / "airflow"), "dags", "test", "hfi_concept_removal", "--conf", conf],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    (tmp / "dags_test.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"killed": killed, "run_uri": run_uri, "run_id": run_id, "config": config, "tmp": tmp, **services}


def _keys(s3, bucket, prefix=""):
    return {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    }


def test_every_step_finished_and_left_its_outputs_and_marker_in_the_bucket(nightly):
    keys = _keys(nightly["s3_client"], nightly["runs_bucket"], f"runs/{nightly['run_id']}/")
    for stage in ("generate", "publish", "feedback", "reward", "invert", "distill", "evaluate", "register"):
        assert f"runs/{nightly['run_id']}/{stage}/_SUCCESS" in keys, stage
    for rel in ("generate/manifest.parquet", "invert/learned_embeds.safetensors", "distill/delta.safetensors",
                "distill/unet/diffusion_pytorch_model.safetensors", "evaluate/summary.json", "register/registration.json"):  # fmt: skip
        assert f"runs/{nightly['run_id']}/{rel}" in keys, rel
    assert _keys(nightly["s3_client"], nightly["mlflow_bucket"])  # MLflow's artifacts went to S3 too


def test_one_parent_run_and_one_finished_child_per_step_with_metrics_and_airflow_tags(nightly):
    client = MlflowClient(nightly["mlflow"])
    exp = client.get_experiment_by_name("hfi-e2e")
    parents = client.search_runs([exp.experiment_id], "tags.`hfi.level` = 'parent'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["distill.method"] == yaml.safe_load(nightly["config"].read_text())["distill"]["method"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {}
    for c in children:
        by_stage.setdefault(c.data.tags["hfi.stage"], []).append(c)
    assert set(by_stage) == {"generate", "publish", "feedback", "reward", "invert", "distill", "evaluate", "register"}
    for stage, runs in by_stage.items():
        assert len(runs) == 1, f"{stage}: {len(runs)} child runs"
        run = runs[0]
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["airflow.dag_id"] == "hfi_concept_removal" and run.data.tags["airflow.task_id"] == stage
        assert run.data.tags["git_commit"] == "test-commit" and "airflow.try_number" in run.data.tags
    assert "holdout_auc" in by_stage["reward"][0].data.metrics
    evaluate = by_stage["evaluate"][0].data.metrics
    assert any(k.startswith("sd.target") for k in evaluate) and any(k.startswith("distilled.target") for k in evaluate)
    artifacts = {a.path for a in client.list_artifacts(by_stage["evaluate"][0].info.run_id, "evaluate")}
    assert "evaluate/summary.md" in artifacts


def test_the_distilled_model_is_registered_with_the_alias_its_gates_deserve(nightly):
    client = MlflowClient(nightly["mlflow"])
    registration = json.loads(
        nightly["s3_client"]
        .get_object(Bucket=nightly["runs_bucket"], Key=f"runs/{nightly['run_id']}/register/registration.json")["Body"]
        .read()
    )
    assert registration["champion"] is True  # the gates of this tiny run are wide open
    assert client.get_model_version_by_alias("hfi-toyworld-striped", "champion").version == registration["version"]


def test_a_step_killed_half_way_reran_to_the_same_outputs_as_an_unbroken_run(nightly, world):
    assert nightly["killed"], "the generate step finished before it could be killed"
    from hfi_core.config import load_config
    from hfi_core.generation import generate

    unbroken = generate(load_config(nightly["config"]), nightly["tmp"] / "unbroken", show_progress=False)
    stored = nightly["s3_client"].get_object(
        Bucket=nightly["runs_bucket"], Key=f"runs/{nightly['run_id']}/generate/manifest.parquet"
    )
    local = nightly["tmp"] / "stored_manifest.parquet"
    local.write_bytes(stored["Body"].read())
    assert pd.read_parquet(local).equals(pd.read_parquet(unbroken.manifest))
