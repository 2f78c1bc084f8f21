"""How the hfi DAGs run a step: in-process, in Docker, or in a Kubernetes pod.

One setting, the worker's ``HFI_STEP_RUNNER`` environment variable (``local`` | ``docker`` |
``kubernetes``), chooses; no DAG file changes. ``HFI_STEP_GPUS`` (``all``, a count, or ``none``)
says what the GPU steps ask for. Every step runs the same command,
``hfi step <stage> --config ... --run-uri ...``, in the worker (local), in the step image (Docker,
with GPU device requests) or in a pod (``nvidia.com/gpu`` limits, node selector, tolerations).

Nothing here imports torch, diffusers, mlflow or boto3, and the provider modules are imported
only for the runner in use. Credentials never appear here: local steps inherit the worker's
environment; Docker steps source an env file of the worker host (``HFI_DOCKER_ENV_FILE``, a path, mounted
read-only; it must be readable by the image's user, uid 10001);
pods mount a Kubernetes Secret (``HFI_K8S_SECRET``, a name).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shlex
from pathlib import Path

RUNNER = os.environ.get("HFI_STEP_RUNNER", "local")
IMAGE = os.environ.get("HFI_IMAGE", "hfi-step:latest")
HFI_BIN = os.environ.get("HFI_BIN", "hfi")
GPU_STEPS = {"generate", "invert", "distill", "evaluate"}
# GPUs a GPU step asks for: "all", a count, or "none" (CPU-only hosts and clusters).
GPUS = os.environ.get("HFI_STEP_GPUS", "all")
STAGES = ("generate", "publish", "feedback", "reward", "invert", "distill", "evaluate", "register")
TIMEOUTS = {
    "generate": 2,
    "publish": 0.25,
    "feedback": 0.5,
    "reward": 1,
    "invert": 2,
    "distill": 6,
    "evaluate": 2,
    "register": 0.25,
}
PARAMS_FILE = Path(__file__).with_name("hfi_params.json")
SECRET_ENV = "/run/secrets/hfi-env"  # where a Docker step finds HFI_DOCKER_ENV_FILE (no ".env": see below)
# What the step reads about its Airflow run, passed explicitly to containers and pods.
CONTEXT_ENV = {
    "AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}",
    "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}",
    "AIRFLOW_CTX_TASK_ID": "{{ task.task_id }}",
    "AIRFLOW_CTX_TRY_NUMBER": "{{ ti.try_number }}",
}
PASS_THROUGH = ("MLFLOW_TRACKING_URI", "HFI_S3_ENDPOINT_URL", "HFI_IMAGE_TAG", "HFI_GIT_COMMIT", "HFI_EXPERIMENT")

log = logging.getLogger(__name__)


def notify_failure(context: dict) -> None:
    """on_failure_callback: one line naming the DAG run, task, try and where its log is."""
    ti = context.get("task_instance") or context.get("ti")
    log.error(
        "hfi step failed: dag=%s run=%s task=%s try=%s log=%s",
        getattr(ti, "dag_id", "?"),
        getattr(ti, "run_id", "?"),
        getattr(ti, "task_id", "?"),
        getattr(ti, "try_number", "?"),
        getattr(ti, "log_url", "?"),
    )


def default_args() -> dict:
    return {
        "owner": "ml-platform",
        "retries": int(os.environ.get("HFI_STEP_RETRIES", "2")),
        "retry_delay": dt.timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=30),
        "on_failure_callback": notify_failure,
    }


def params() -> dict:
    """Airflow Params: the config path, the run root, and every overridable config field.

    The fields come from ``hfi_params.json``, exported from the config schema (``hfi dags params``),
    so parsing a DAG never imports the library; a test keeps the file equal to the schema.
    """
    from airflow.sdk import Param

    out = {
        "config": Param(
            "configs/toyworld-striped.yaml", type="string", description="run config YAML (path or s3:// URI)"
        ),
        "run_root": Param(os.environ.get("HFI_RUN_ROOT", "/tmp/hfi-runs"), type="string", description="run store root"),
        "run_name": Param(None, type=["string", "null"], description="run folder under run_root (default: the run id)"),
    }
    for f in json.loads(PARAMS_FILE.read_text()):
        # null keeps the YAML's value; the schema's own default is shown for reference
        out[f["key"]] = Param(
            None, type=[f["type"], "null"], description=f"{f['doc']} (schema default: {f['default']})"
        )
    return out


def step_command(stage: str) -> str:
    """The templated ``hfi step`` command line; every Param that is set is passed as ``--set``."""
    keys = [f["key"] for f in json.loads(PARAMS_FILE.read_text())]
    run_uri = "{{ params.run_root }}/{{ params.run_name or (run_id | replace(':', '') | replace('+', '')) }}"
    cmd = f'{shlex.quote(HFI_BIN)} step {stage} --config "{{{{ params.config }}}}" --run-uri "{run_uri}"'
    for key in keys:
        value = '{{ params["' + key + '"] | tojson }}'
        cmd += '{% if params["' + key + '"] is not none %} ' + f"'--set={key}={value}'" + "{% endif %}"
    return cmd


def step_task(stage: str):
    """The operator running ``stage`` with the runner chosen by ``HFI_STEP_RUNNER``."""
    command = step_command(stage)
    common = dict(task_id=stage, execution_timeout=dt.timedelta(hours=TIMEOUTS[stage]))
    if RUNNER == "local":
        from airflow.providers.standard.operators.bash import BashOperator

        return BashOperator(bash_command=command, **common)
    env = {**CONTEXT_ENV, **{k: os.environ[k] for k in PASS_THROUGH if k in os.environ}}
    gpu = stage in GPU_STEPS and GPUS != "none"
    count = -1 if GPUS in ("all", "none") else int(GPUS)
    if RUNNER == "docker":
        from airflow.providers.docker.operators.docker import DockerOperator
        from docker.types import DeviceRequest, Mount

        # The env file is mounted read-only and sourced inside the container, so credentials go
        # from the worker host's file to the step's environment and never through Airflow
        # (rendered templates, XCom, logs).
        env_file, mounts = os.environ.get("HFI_DOCKER_ENV_FILE"), []
        if env_file:
            # ``mounts`` is a templated field and DockerOperator reads any string ending in ".env"
            # as a template file to load; a Jinja string literal renders to the path itself.
            source = "{{ " + json.dumps(env_file) + " }}"
            mounts = [Mount(target=SECRET_ENV, source=source, type="bind", read_only=True)]
            command = f"set -a && . {SECRET_ENV} && set +a && {command}"
        return DockerOperator(
            image=IMAGE,
            entrypoint=["/bin/sh", "-c"],
            command=[command],
            environment=env,
            mounts=mounts,
            docker_url=os.environ.get("HFI_DOCKER_URL", "unix://var/run/docker.sock"),
            network_mode=os.environ.get("HFI_DOCKER_NETWORK", "bridge"),
            mount_tmp_dir=False,
            auto_remove="success",
            device_requests=[DeviceRequest(count=count, capabilities=[["gpu"]])] if gpu else None,
            **common,
        )
    if RUNNER == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        secret = os.environ.get("HFI_K8S_SECRET")
        gpu_limit = str(max(count, 1))  # a pod asks for whole GPUs; "all" means one
        return KubernetesPodOperator(
            name=f"hfi-{stage}",
            namespace=os.environ.get("HFI_K8S_NAMESPACE", "hfi"),
            image=IMAGE,
            cmds=["/bin/sh", "-c"],
            arguments=[command],
            env_vars=env,
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))] if secret else None,
            container_resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": gpu_limit}) if gpu else None,
            node_selector={"nvidia.com/gpu.present": "true"} if gpu else None,
            tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
            if gpu
            else None,
            get_logs=True,
            on_finish_action="delete_succeeded_pod",
            **common,
        )
    raise ValueError(f"HFI_STEP_RUNNER={RUNNER!r}: expected local, docker or kubernetes")
